import { execFileSync } from 'node:child_process'
import { createPrivateKey, randomBytes, sign } from 'node:crypto'
import { mkdtempSync, readFileSync, rmSync } from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import { encode } from 'cborg'
import type { AttestationProvider } from '../../enclave-origin/enclave/dataKey.js'

/**
 * A stand-in for the Nitro Secure Module, for tests only: attestation
 * documents in the NSM's documented format (COSE_Sign1, ES384, over a CBOR map
 * of module_id, digest, timestamp, pcrs, certificate, cabundle, public_key,
 * user_data, nonce), signed by a P-384 leaf certificate that chains to a root
 * CA made with openssl at test time. The local KMS trusts that root as AWS KMS
 * trusts the AWS Nitro root, so the enclave's recipient-bound Decrypt runs
 * with real cryptography end to end. It proves nothing about a real enclave.
 */
export type TestNsm = {
  /** The root CA certificate (PEM) a KMS must trust to accept these documents. */
  rootPem: string
  /** This "enclave image" measurement. */
  pcr0: Uint8Array
  provider: AttestationProvider
  close(): void
}

export function startTestNsm(): TestNsm {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'test-nsm-'))
  const openssl = (args: string[]) => execFileSync('openssl', args, { cwd: dir, stdio: 'ignore' })
  const p384 = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-384', '-nodes']
  openssl(['req', '-x509', ...p384, '-keyout', 'root.key', '-out', 'root.crt', '-days', '1', '-subj', '/CN=test nitro root', '-addext', 'basicConstraints=critical,CA:TRUE'])
  openssl(['req', ...p384, '-keyout', 'leaf.key', '-out', 'leaf.csr', '-subj', '/CN=test enclave'])
  openssl(['x509', '-req', '-in', 'leaf.csr', '-CA', 'root.crt', '-CAkey', 'root.key', '-CAcreateserial', '-out', 'leaf.crt', '-days', '1'])
  const rootPem = readFileSync(path.join(dir, 'root.crt'), 'utf8')
  const der = (file: string) => Buffer.from(readFileSync(path.join(dir, file), 'utf8').replace(/-----[^-]+-----|\s/g, ''), 'base64')
  const leafKey = createPrivateKey(readFileSync(path.join(dir, 'leaf.key')))
  const certificate = der('leaf.crt')
  const root = der('root.crt')
  const pcr0 = new Uint8Array(randomBytes(48))

  const provider: AttestationProvider = {
    kind: 'nitro',
    async attestationDocument({ publicKey }) {
      const payload = encode(
        new Map<string, unknown>([
          ['module_id', 'i-test-enc0123456789'],
          ['digest', 'SHA384'],
          ['timestamp', Date.now()],
          ['pcrs', new Map([[0, pcr0], [1, new Uint8Array(48)], [2, new Uint8Array(48)]])],
          ['certificate', certificate],
          ['cabundle', [root]],
          ['public_key', publicKey],
          ['user_data', null],
          ['nonce', null],
        ]),
      )
      const protectedHeader = encode(new Map([[1, -35]])) // alg: ES384
      const toBeSigned = encode(['Signature1', protectedHeader, new Uint8Array(0), payload])
      const signature = sign('sha384', toBeSigned, { key: leafKey, dsaEncoding: 'ieee-p1363' })
      return encode([protectedHeader, new Map(), payload, signature])
    },
  }
  return { rootPem, pcr0, provider, close: () => rmSync(dir, { recursive: true, force: true }) }
}
