import { X509Certificate } from 'node:crypto'
import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import path from 'node:path'
import { Encrypter } from 'age-encryption'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { keccak256, recoverAddress, toHex, type Hex } from 'viem'
import { generatePrivateKey, privateKeyToAddress } from 'viem/accounts'
import type { KmsDataKeys } from '../../enclave-origin/enclave/dataKey.js'
import { DeliveredCredentials } from '../../enclave-origin/enclave/deliveredCredentials.js'
import { SignEngine } from '../../enclave-origin/enclave/engine.js'
import { KeyCache } from '../../enclave-origin/enclave/keyCache.js'
import { EnclaveService } from '../../enclave-origin/enclave/server.js'
import { opcodes, statuses } from '../../enclave-origin/protocol/frames.js'
import { decodeAttestResponse, decodeErrorMessage, decodeSignResponse, emptyPayload, encodeGetRequest, encodeSignRequest, encodeUnlockRequest } from '../../enclave-origin/protocol/messages.js'
import { generatePreloadIdentity, sealPreloadIdentity, sealShareFile, type EnclaveAttestation } from '../../enclave-origin/preloadFiles.js'
import { startTestNsm, type TestNsm } from '../support/nitroAttestation.js'

/**
 * The preload identity reaches the enclave sealed to a recipient that only the
 * enclave holds, and the operator seals it only once the enclave's attestation
 * document (from the test NSM, through the Nitro provider) binds that
 * recipient. The enclave service runs in-process; the parent only carries
 * these bytes.
 */

let nsm: TestNsm
let otherImage: TestNsm
let engine: SignEngine
let service: EnclaveService
let dir: string
let identity: string
const accounts = Array.from({ length: 3 }, (_, i) => ({ account_id: `account-${i}`, share: generatePrivateKey() }))
const noKms = { generate: () => Promise.reject(new Error('no KMS here')), unwrap: () => Promise.reject(new Error('no KMS here')) } as unknown as KmsDataKeys

beforeAll(async () => {
  nsm = startTestNsm()
  otherImage = startTestNsm()
  engine = new SignEngine({ threads: 1 })
  await engine.start()
  dir = await mkdtemp(path.join(tmpdir(), 'preload-delivery-'))
  const generated = await generatePreloadIdentity()
  identity = generated.identity
  await writeFile(path.join(dir, 'shares.age'), await sealShareFile({ entries: accounts, recipient: generated.recipient }))
  const cache = new KeyCache({ now: Date.now, unlock: () => Promise.reject(new Error('no unlock in this test')) })
  service = new EnclaveService({ cache, engine, dataKeys: noKms, kmsKeyId: 'test', credentials: new DeliveredCredentials(), attestation: nsm.provider, preloadFile: path.join(dir, 'shares.age') })
})

afterAll(async () => {
  await engine?.stop()
  service?.clear()
  for (const each of [nsm, otherImage]) each?.close()
  await rm(dir, { recursive: true, force: true })
})

let requestId = 0
const call = (opcode: number, payload: Uint8Array) => service.handle({ requestId: ++requestId, opcode, status: 0, payload })
const attest = async (): Promise<EnclaveAttestation> => {
  const answer = await call(opcodes.ATTEST, emptyPayload)
  expect(answer.status).toBe(statuses.OK)
  const { recipient, attestationDocument } = decodeAttestResponse(answer.payload)
  return { id: 'enclave-a', recipient, attestationDocument }
}
const trust = () => ({ roots: [new X509Certificate(nsm.rootPem)], pcr0: nsm.pcr0 })
const unlock = (sealed: Uint8Array) => call(opcodes.UNLOCK, encodeUnlockRequest({ wrappedDek: new Uint8Array(), sealedPreloadIdentity: sealed }))

describe('sealPreloadIdentity', () => {
  it('seals to the recipient the enclave attests, and the enclave then signs with the preloaded accounts', async () => {
    const enclave = await attest()
    expect(enclave.recipient).toMatch(/^age1[02-9ac-hj-np-z]{58}$/)
    // The same recipient on every ATTEST of one process.
    expect((await attest()).recipient).toBe(enclave.recipient)
    const sealed = await sealPreloadIdentity({ identity, enclaves: [enclave], trust: trust() })
    expect(Buffer.from(sealed.get('enclave-a')!).includes(Buffer.from(identity))).toBe(false)
    expect((await unlock(sealed.get('enclave-a')!)).status).toBe(statuses.OK)

    const digest = keccak256(toHex('delivered'))
    const answer = await call(opcodes.SIGN, encodeSignRequest({ keyId: 'account-2', digest: Buffer.from(digest.slice(2), 'hex') }))
    expect(answer.status).toBe(statuses.OK)
    const { signature, recoveryId } = decodeSignResponse(answer.payload)
    const recovered = await recoverAddress({ hash: digest, signature: `0x${Buffer.from(signature).toString('hex')}${(27 + recoveryId).toString(16)}` as Hex })
    expect(recovered).toBe(privateKeyToAddress(accounts[2]!.share as Hex))
  })

  it('refuses a document from an untrusted root, of another image, or binding another recipient, and an unattested unlock of an attested enclave', async () => {
    const enclave = await attest()
    await expect(sealPreloadIdentity({ identity, enclaves: [enclave], trust: { ...trust(), roots: [new X509Certificate(otherImage.rootPem)] } })).rejects.toThrow(
      'enclave enclave-a: the attestation document is not valid: the cabundle does not start at a trusted root',
    )
    await expect(sealPreloadIdentity({ identity, enclaves: [enclave], trust: { ...trust(), pcr0: otherImage.pcr0 } })).rejects.toThrow(
      'enclave enclave-a: the attestation document is of another enclave image (PCR0)',
    )
    // A parent that swaps in its own recipient, keeping the enclave's genuine document.
    const swapped = { ...enclave, recipient: (await generatePreloadIdentity()).recipient }
    await expect(sealPreloadIdentity({ identity, enclaves: [swapped], trust: trust() })).rejects.toThrow(
      'enclave enclave-a: the attestation document binds another recipient than the one reported',
    )
    await expect(sealPreloadIdentity({ identity, enclaves: [{ ...enclave, attestationDocument: undefined }], trust: trust() })).rejects.toThrow(
      'enclave enclave-a: no attestation document (a development enclave?); only an unattested unlock can seal to it',
    )
    await expect(sealPreloadIdentity({ identity, enclaves: [{ ...enclave, recipient: 'age1notarecipient' }], trust: 'unattested' })).rejects.toThrow(
      'enclave enclave-a: its delivery recipient is not an X25519 age recipient',
    )
    await expect(sealPreloadIdentity({ identity, enclaves: [enclave], trust: 'unattested' })).rejects.toThrow(
      'enclave enclave-a: it presents an attestation document: check it with --nitro-root-file and --pcr0, not --allow-unattested',
    )
  })

  it('refuses a debug-mode enclave, whose documents report a zeroed PCR0', async () => {
    const debug = startTestNsm({ pcr0: new Uint8Array(48) })
    try {
      const { recipient } = await generatePreloadIdentity()
      const attestationDocument = await debug.provider.attestationDocument({ publicKey: new TextEncoder().encode(recipient) })
      await expect(
        sealPreloadIdentity({ identity, enclaves: [{ id: 'debug', recipient, attestationDocument }], trust: { roots: [new X509Certificate(debug.rootPem)], pcr0: new Uint8Array(48) } }),
      ).rejects.toThrow('enclave debug: the attestation document has no PCR0 (a debug-mode enclave?)')
    } finally {
      debug.close()
    }
  })

  it('unattested, seals to the recipient as reported', async () => {
    const enclave = await attest()
    const sealed = await sealPreloadIdentity({ identity, enclaves: [{ ...enclave, attestationDocument: undefined }], trust: 'unattested' })
    expect((await unlock(sealed.get('enclave-a')!)).status).toBe(statuses.OK)
  })
})

describe('the enclave', () => {
  it('refuses an identity sealed to any other recipient, and says so', async () => {
    const encrypter = new Encrypter()
    encrypter.addRecipient((await generatePreloadIdentity()).recipient)
    const answer = await unlock(await encrypter.encrypt(identity))
    expect(answer.status).toBe(statuses.BAD_REQUEST)
    expect(decodeErrorMessage(answer.payload)).toBe("the preload identity is not sealed to this enclave's delivery recipient (ATTEST gives it; it changes at every enclave start)")
    expect(decodeErrorMessage((await unlock(new Uint8Array([1, 2, 3]))).payload)).toContain('not sealed to this enclave')
  })

  it('serves no preloaded account when the delivered identity does not open the file, and logs why', async () => {
    const logged: Array<Record<string, unknown>> = []
    const cache = new KeyCache({ now: Date.now, unlock: () => Promise.reject(new Error('no unlock in this test')) })
    const wrongOne = new EnclaveService({ cache, engine, dataKeys: noKms, kmsKeyId: 'test', credentials: new DeliveredCredentials(), attestation: nsm.provider, preloadFile: path.join(dir, 'shares.age'), log: (fields) => logged.push(fields) })
    try {
      const ask = (opcode: number, payload: Uint8Array) => wrongOne.handle({ requestId: ++requestId, opcode, status: 0, payload })
      const { recipient } = decodeAttestResponse((await ask(opcodes.ATTEST, emptyPayload)).payload)
      const encrypter = new Encrypter()
      encrypter.addRecipient(recipient)
      const answer = await ask(opcodes.UNLOCK, encodeUnlockRequest({ wrappedDek: new Uint8Array(), sealedPreloadIdentity: await encrypter.encrypt((await generatePreloadIdentity()).identity) }))
      expect(answer.status).not.toBe(statuses.OK)
      const reason = decodeErrorMessage(answer.payload)
      expect(reason).toMatch(/^preload failed: /)
      expect(logged).toContainEqual({ level: 'error', event: 'preload_failed', reason })
      // An id it does not hold may be one of the accounts it does not serve: not NOT_FOUND, so the parent answers 503 (once the store has no such key).
      for (const request of [ask(opcodes.SIGN, encodeSignRequest({ keyId: 'account-0', digest: new Uint8Array(32) })), ask(opcodes.GET, encodeGetRequest({ keyId: 'account-0' }))]) {
        const refused = await request
        expect({ status: refused.status, reason: decodeErrorMessage(refused.payload) }).toEqual({ status: statuses.NOT_FOUND_PRELOAD_NOT_SERVED, reason })
      }
    } finally {
      wrongOne.clear()
    }
  })

  it('refuses an ATTEST request with a payload (the server answers BAD_REQUEST with this)', async () => {
    await expect(call(opcodes.ATTEST, new Uint8Array([0]))).rejects.toThrow('ATTEST request: 1 trailing bytes')
  })
})
