import { execFileSync } from 'node:child_process'
import { createPrivateKey, randomBytes, sign } from 'node:crypto'
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import { encode } from 'cborg'
import { openNitroAttestation, type NitroAttestation, type NsmDevice } from '../../enclave-origin/enclave/nitroAttestation.js'

/**
 * A stand-in for the Nitro Secure Module, for tests only: attestation
 * documents in the NSM's documented format (COSE_Sign1, ES384, over a CBOR map
 * of module_id, digest, timestamp, pcrs, certificate, cabundle, public_key,
 * user_data, nonce), signed by a P-384 leaf certificate that chains to a root
 * CA made with openssl at test time. The local KMS trusts that root as AWS KMS
 * trusts the AWS Nitro root, so the enclave's recipient-bound Decrypt runs
 * with real cryptography end to end. It answers the calls of the NSM addon
 * (`NsmDevice`) that the enclave's Nitro provider makes on /dev/nsm, so that
 * provider runs as it would in an enclave. It proves nothing about a real
 * enclave.
 */
export type TestNsm = {
  /** The root CA certificate (PEM) a KMS must trust to accept these documents. */
  rootPem: string
  /** This "enclave image" measurement. */
  pcr0: Uint8Array
  /** The NSM addon's calls, answered by this stand-in (for `openNitroAttestation`). */
  device: NsmDevice
  /** `openNitroAttestation` over `device`: the provider the enclave uses, on this stand-in. */
  provider: NitroAttestation
  /** Descriptors opened on `device` and not closed. */
  openDescriptors(): number
  close(): void
}

/**
 * `pcr0`: the image measurement its documents report; random unless given (zeros: a debug-mode enclave). `digest`:
 * the hash its documents name for their PCRs (SHA384, as the NSM's; another for a verifier's refusal).
 * `intermediateIsCa: false` issues the leaf from an intermediate that is not a CA (for a verifier's refusal).
 */
export function startTestNsm(options: { pcr0?: Uint8Array; digest?: string; intermediateIsCa?: boolean } = {}): TestNsm {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'test-nsm-'))
  const openssl = (args: string[]) => execFileSync('openssl', args, { cwd: dir, stdio: 'ignore' })
  const p384 = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-384', '-nodes']
  openssl(['req', '-x509', ...p384, '-keyout', 'root.key', '-out', 'root.crt', '-days', '1', '-subj', '/CN=test nitro root', '-addext', 'basicConstraints=critical,CA:TRUE'])
  // root → intermediate → leaf, as the NSM's chain runs (its cabundle holds the root and the intermediates).
  writeFileSync(path.join(dir, 'intermediate.ext'), `basicConstraints=critical,CA:${options.intermediateIsCa === false ? 'FALSE' : 'TRUE'}\n`)
  openssl(['req', ...p384, '-keyout', 'intermediate.key', '-out', 'intermediate.csr', '-subj', '/CN=test nitro intermediate'])
  openssl(['x509', '-req', '-in', 'intermediate.csr', '-CA', 'root.crt', '-CAkey', 'root.key', '-CAcreateserial', '-out', 'intermediate.crt', '-days', '1', '-extfile', 'intermediate.ext'])
  openssl(['req', ...p384, '-keyout', 'leaf.key', '-out', 'leaf.csr', '-subj', '/CN=test enclave'])
  openssl(['x509', '-req', '-in', 'leaf.csr', '-CA', 'intermediate.crt', '-CAkey', 'intermediate.key', '-CAcreateserial', '-out', 'leaf.crt', '-days', '1'])
  const rootPem = readFileSync(path.join(dir, 'root.crt'), 'utf8')
  const der = (file: string) => Buffer.from(readFileSync(path.join(dir, file), 'utf8').replace(/-----[^-]+-----|\s/g, ''), 'base64')
  const leafKey = createPrivateKey(readFileSync(path.join(dir, 'leaf.key')))
  const certificate = der('leaf.crt')
  const root = der('root.crt')
  const intermediate = der('intermediate.crt')
  const pcr0 = options.pcr0 ?? new Uint8Array(randomBytes(48))

  const moduleId = 'i-test-enc0123456789'
  const document = (userData: Uint8Array | null, nonce: Uint8Array | null, publicKey: Uint8Array | null) => {
    const payload = encode(
      new Map<string, unknown>([
        ['module_id', moduleId],
        ['digest', options.digest ?? 'SHA384'],
        ['timestamp', Date.now()],
        ['pcrs', new Map([[0, pcr0], [1, new Uint8Array(48)], [2, new Uint8Array(48)]])],
        ['certificate', certificate],
        ['cabundle', [root, intermediate]],
        ['public_key', publicKey],
        ['user_data', userData],
        ['nonce', nonce],
      ]),
    )
    const protectedHeader = encode(new Map([[1, -35]])) // alg: ES384
    const toBeSigned = encode(['Signature1', protectedHeader, new Uint8Array(0), payload])
    const signature = sign('sha384', toBeSigned, { key: leafKey, dsaEncoding: 'ieee-p1363' })
    return encode([protectedHeader, new Map(), payload, signature])
  }

  // The addon's calls as the NSM answers them: descriptors it did not open, and fields past their limits, are errors named by the NSM's code.
  const openFds = new Set<number>()
  let nextFd = 40
  const fdOpen = (fd: number) => {
    if (!openFds.has(fd)) throw new Error('InternalError')
  }
  const device: NsmDevice = {
    open: () => {
      openFds.add(nextFd)
      return nextFd++
    },
    close: (fd) => void openFds.delete(fd),
    getDescription: (fd) => {
      fdOpen(fd)
      return { moduleId, digest: 'SHA384', versionMajor: 1, versionMinor: 0, versionPatch: 0 }
    },
    getAttestationDoc: (fd, userData, nonce, publicKey) => {
      fdOpen(fd)
      if ((userData?.length ?? 0) > 512 || (nonce?.length ?? 0) > 512 || (publicKey?.length ?? 0) > 1024) throw new Error('InputTooLarge')
      return Buffer.from(document(userData, nonce, publicKey))
    },
  }
  const provider = openNitroAttestation(device)
  return {
    rootPem,
    pcr0,
    device,
    provider,
    openDescriptors: () => openFds.size,
    close: () => {
      provider.close()
      rmSync(dir, { recursive: true, force: true })
    },
  }
}
