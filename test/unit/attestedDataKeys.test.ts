import { generateKeyPairSync, X509Certificate } from 'node:crypto'
import { connect, createServer, type AddressInfo } from 'node:net'
import { existsSync } from 'node:fs'
import { DecryptCommand, GenerateDataKeyCommand, KMSClient } from '@aws-sdk/client-kms'
import { decode, encode } from 'cborg'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { AttestationDocumentError, verifyAttestationDocument } from '../../enclave-origin/attestationDocument.js'
import { CmsError, openRecipientCiphertext } from '../../enclave-origin/enclave/cms.js'
import { developmentAttestation, KmsDataKeys, type AttestationProvider } from '../../enclave-origin/enclave/dataKey.js'
import { DeliveredCredentials } from '../../enclave-origin/enclave/deliveredCredentials.js'
import { enclaveKmsClient } from '../../enclave-origin/enclave/kmsClient.js'
import { openNitroAttestation } from '../../enclave-origin/enclave/nitroAttestation.js'
import { encodeLength, sealForRecipient } from '../support/cmsEnvelope.js'
import { startLocalKms, type KmsFault, type LocalKms } from '../support/kmsServer.js'
import { startTestNsm, type TestNsm } from '../support/nitroAttestation.js'

/**
 * The enclave's recipient-bound data key: an attestation document in each KMS
 * call, `CiphertextForRecipient` back (CMS, BER), opened only with the
 * enclave's own RSA key. Against the local KMS over HTTP, with documents from
 * the test NSM (real COSE signatures over certificates made at test time).
 */

let kms: LocalKms
let client: KMSClient
let nsm: TestNsm
/** Another "enclave" whose root the KMS also trusts, but with a different image (PCR0). */
let otherImage: TestNsm
/** One whose root the KMS does not trust. */
let stranger: TestNsm

beforeAll(async () => {
  nsm = startTestNsm()
  otherImage = startTestNsm()
  stranger = startTestNsm()
  kms = await startLocalKms({ port: 18623, attestationRoots: [nsm.rootPem, otherImage.rootPem] })
  client = new KMSClient({ endpoint: kms.url, region: kms.credentials.region, credentials: kms.credentials, maxAttempts: 1 })
})
afterAll(async () => {
  client?.destroy()
  await kms?.stop()
  for (const each of [nsm, otherImage, stranger]) each?.close()
})

const dataKeys = (attestation: AttestationProvider, kmsKeyId = kms.createSymmetricKey()) => new KmsDataKeys({ client, kmsKeyId, attestation })

describe('KmsDataKeys with a Nitro attestation provider', () => {
  it('generates a data key and unwraps it again, both through CiphertextForRecipient', async () => {
    const keys = dataKeys(nsm.provider)
    const { dek, wrapped } = await keys.generate()
    expect(dek).toHaveLength(32)
    expect(Buffer.from(await keys.unwrap(wrapped))).toEqual(Buffer.from(dek))
    // A process without attestation, allowed by this key's policy, reads the same key in the clear.
    expect(Buffer.from(await dataKeys(developmentAttestation).unwrap(wrapped))).toEqual(Buffer.from(dek))
  })

  it('never gets the plaintext on the wire for an attested request', async () => {
    const { publicKey, privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 })
    const document = await nsm.provider.attestationDocument({ publicKey: publicKey.export({ type: 'spki', format: 'der' }) })
    const Recipient = { AttestationDocument: document, KeyEncryptionAlgorithm: 'RSAES_OAEP_SHA_256' as const }
    const KeyId = kms.createSymmetricKey()
    const generated = await client.send(new GenerateDataKeyCommand({ KeyId, KeySpec: 'AES_256', Recipient }))
    expect(generated.Plaintext ?? new Uint8Array()).toHaveLength(0)
    const dek = openRecipientCiphertext(generated.CiphertextForRecipient!, privateKey)
    const decrypted = await client.send(new DecryptCommand({ KeyId, CiphertextBlob: generated.CiphertextBlob, Recipient }))
    expect(decrypted.Plaintext ?? new Uint8Array()).toHaveLength(0)
    expect(openRecipientCiphertext(decrypted.CiphertextForRecipient!, privateKey)).toEqual(dek)
  })

  it('makes its RSA pair again after a failure to make it, rather than failing every KMS call for the life of the process', async () => {
    let attempts = 0
    const keys = new KmsDataKeys({
      client,
      kmsKeyId: kms.createSymmetricKey(),
      attestation: nsm.provider,
      makeRecipientKey: async () => {
        attempts += 1
        if (attempts === 1) throw new Error('out of memory')
        const { privateKey, publicKey } = generateKeyPairSync('rsa', { modulusLength: 2048 })
        return { privateKey, publicKey: publicKey.export({ type: 'spki', format: 'der' }) }
      },
    })
    await expect(keys.generate()).rejects.toThrow('out of memory')
    const { dek, wrapped } = await keys.generate()
    expect(Buffer.from(await keys.unwrap(wrapped))).toEqual(Buffer.from(dek))
    // Made once more, then kept.
    expect(attempts).toBe(2)
  })

  it('is the only way to a key whose policy requires this image: no attestation and another PCR0 are denied', async () => {
    const kmsKeyId = kms.createSymmetricKey({ recipientPcr0: nsm.pcr0 })
    const { wrapped } = await dataKeys(nsm.provider, kmsKeyId).generate()
    await expect(dataKeys(developmentAttestation, kmsKeyId).unwrap(wrapped)).rejects.toThrow(/not authorized.*kms:Decrypt.*PCR0/)
    await expect(dataKeys(otherImage.provider, kmsKeyId).unwrap(wrapped)).rejects.toThrow(/not authorized.*kms:Decrypt.*PCR0/)
    await expect(dataKeys(developmentAttestation, kmsKeyId).generate()).rejects.toThrow(/not authorized.*kms:GenerateDataKey/)
    expect(await dataKeys(nsm.provider, kmsKeyId).unwrap(wrapped)).toHaveLength(32)
  })

  it('is refused with a document from an untrusted root, or one altered after signing', async () => {
    await expect(dataKeys(stranger.provider).generate()).rejects.toThrow(/attestation document is not valid: the cabundle does not start at a trusted root/)
    const altered: AttestationProvider = {
      kind: 'nitro',
      async attestationDocument(options) {
        // Swap the attested public key for another (a parent trying to read the answer): the signature no longer holds.
        const document = Buffer.from((await nsm.provider.attestationDocument(options))!)
        const at = document.indexOf(Buffer.from(options.publicKey))
        document[at + options.publicKey.length - 1]! ^= 1
        return document
      },
    }
    await expect(dataKeys(altered).generate()).rejects.toThrow(/attestation document is not valid: the signature does not verify/)
  })

  it('fails clearly when the provider has no document to give', async () => {
    const empty: AttestationProvider = { kind: 'nitro', attestationDocument: async () => undefined }
    await expect(dataKeys(empty).generate()).rejects.toThrow('the attestation provider returned no document')
  })
})

describe('KmsDataKeys with a key ARN', () => {
  /** The ARN of a new local KMS key, as KMS itself writes it in its answers. */
  const newKeyArn = async () => (await client.send(new GenerateDataKeyCommand({ KeyId: kms.createSymmetricKey(), KeySpec: 'AES_256' }))).KeyId!

  it('takes answers from that key, and refuses an answer from any other', async () => {
    const [ours, theirs] = [await newKeyArn(), await newKeyArn()]
    expect(ours).toMatch(/^arn:aws:kms:[a-z0-9-]+:\d{12}:key\//)
    const { dek, wrapped } = await dataKeys(developmentAttestation, ours).generate()
    expect(Buffer.from(await dataKeys(developmentAttestation, ours).unwrap(wrapped))).toEqual(Buffer.from(dek))
    // A data key wrapped under another key (one the parent controls, say) is not unwrapped as ours.
    const { wrapped: foreign } = await dataKeys(developmentAttestation, theirs).generate()
    await expect(dataKeys(developmentAttestation, ours).unwrap(foreign)).rejects.toThrow(`KMS Decrypt answered with key ${theirs}, not ${ours}`)
  })
})

/** A client of the same local KMS that hands each answer to `tamper` (to look at, or to break) before KmsDataKeys sees it. */
function clientTampering(tamper: (answer: { Plaintext?: Uint8Array; CiphertextBlob?: Uint8Array }) => void): KMSClient {
  const tampering = new KMSClient({ endpoint: kms.url, region: kms.credentials.region, credentials: kms.credentials, maxAttempts: 1 })
  tampering.middlewareStack.add(
    (next) => async (args) => {
      const result = await next(args)
      tamper(result.output as { Plaintext?: Uint8Array; CiphertextBlob?: Uint8Array })
      return result
    },
    { step: 'initialize' },
  )
  return tampering
}

describe('KmsDataKeys zeroes a data key it was given but refuses', () => {
  it('one of the wrong length', async () => {
    const kmsKeyId = kms.createSymmetricKey()
    // A 16-byte data key under the same KMS key: Decrypt gives back 16 bytes.
    const short = await client.send(new GenerateDataKeyCommand({ KeyId: kmsKeyId, KeySpec: 'AES_128' }))
    let given: Uint8Array | undefined
    const tampering = clientTampering((answer) => void (given = answer.Plaintext))
    try {
      const keys = new KmsDataKeys({ client: tampering, kmsKeyId, attestation: developmentAttestation })
      await expect(keys.unwrap({ keyId: kmsKeyId, ciphertext: short.CiphertextBlob! })).rejects.toThrow('KMS Decrypt returned no 32-byte data key')
      expect(Buffer.from(short.Plaintext!)).not.toEqual(Buffer.alloc(16))
      expect(given).toEqual(new Uint8Array(16))
    } finally {
      tampering.destroy()
    }
  })

  it('one whose wrapped form is missing from the answer', async () => {
    let given: Uint8Array | undefined
    let seen: Uint8Array | undefined
    const tampering = clientTampering((answer) => {
      given = answer.Plaintext
      seen = new Uint8Array(given!)
      delete answer.CiphertextBlob
    })
    try {
      const keys = new KmsDataKeys({ client: tampering, kmsKeyId: kms.createSymmetricKey(), attestation: developmentAttestation })
      await expect(keys.generate()).rejects.toThrow('KMS GenerateDataKey returned no wrapped key')
      expect(seen).not.toEqual(new Uint8Array(32))
      expect(given).toEqual(new Uint8Array(32))
    } finally {
      tampering.destroy()
    }
  })
})

describe('verifyAttestationDocument', () => {
  const trusted = () => [new X509Certificate(nsm.rootPem)]
  const documentFor = async (publicKey = Uint8Array.of(1, 2, 3)) => (await nsm.provider.attestationDocument({ publicKey }))!

  it('answers the module, the PCRs and the bound key of a good document, tagged (18) or not', async () => {
    const document = await documentFor()
    const tagged = new Uint8Array([0xd2, ...document]) // CBOR tag 18, COSE_Sign1
    for (const each of [document, tagged]) {
      const fields = verifyAttestationDocument(each, { roots: trusted() })
      expect(fields.moduleId).toBe('i-test-enc0123456789')
      expect(Buffer.from(fields.pcrs.get(0)!)).toEqual(Buffer.from(nsm.pcr0))
      expect(fields.publicKey).toEqual(Uint8Array.of(1, 2, 3))
    }
  })

  it('refuses, saying why: not COSE, another algorithm, an expired chain, no cabundle, another digest, an issuer that is not a CA', async () => {
    const document = await documentFor()
    const refusal = (bytes: Uint8Array, now?: number) => {
      try {
        verifyAttestationDocument(bytes, { roots: trusted(), now })
        return 'accepted'
      } catch (error) {
        return error instanceof AttestationDocumentError ? error.message : `not an AttestationDocumentError: ${String(error)}`
      }
    }
    expect(refusal(new TextEncoder().encode('not cbor at all'))).toBe('not a COSE_Sign1 structure')
    expect(refusal(encode([1, 2, 3]))).toBe('not a COSE_Sign1 structure')
    const [protectedHeader, unprotected, payload, signature] = decode(document) as [Uint8Array, unknown, Uint8Array, Uint8Array]
    expect(refusal(encode([encode(new Map([[1, -7]])), unprotected, payload, signature]))).toBe('not signed with ES384')
    const fields = decode(payload, { useMaps: true }) as Map<string, unknown>
    fields.delete('cabundle')
    expect(refusal(encode([protectedHeader, unprotected, encode(fields), signature]))).toBe('no cabundle')
    // The test chain is valid for one day.
    expect(refusal(document, Date.now() + 3 * 24 * 3_600_000)).toBe('a certificate is outside its validity')
    expect(refusal(document)).toBe('accepted')
    // Signed as a good one is, but naming another hash for its PCRs.
    const otherDigest = startTestNsm({ digest: 'SHA256' })
    try {
      const signed = (await otherDigest.provider.attestationDocument({ publicKey: Uint8Array.of(1) }))!
      expect(() => verifyAttestationDocument(signed, { roots: [new X509Certificate(otherDigest.rootPem)] })).toThrow(new AttestationDocumentError('its PCRs are not SHA-384 digests'))
    } finally {
      otherDigest.close()
    }
    // A chain whose leaf an end-entity certificate issued: each signature checks, but the issuer may not issue.
    const notCa = startTestNsm({ intermediateIsCa: false })
    try {
      const signed = (await notCa.provider.attestationDocument({ publicKey: Uint8Array.of(1) }))!
      expect(() => verifyAttestationDocument(signed, { roots: [new X509Certificate(notCa.rootPem)] })).toThrow(new AttestationDocumentError('a certificate in the cabundle is not a CA'))
    } finally {
      notCa.close()
    }
  })
})

describe('openNitroAttestation', () => {
  // Outside a Nitro Enclave; inside one, this test would find the NSM.
  it.skipIf(existsSync('/dev/nsm'))('loads the real NSM addon, finds no /dev/nsm here, and says so', () => {
    // A missing or broken addon would fail with "cannot load …" instead.
    expect(() => openNitroAttestation()).toThrow('no Nitro Secure Module: /dev/nsm cannot be opened (this is not a Nitro Enclave, or its nsm driver is not loaded)')
  })

  it('asks the NSM for a document that binds the recipient key alone, and names the module', async () => {
    expect(nsm.provider.module).toEqual({ id: 'i-test-enc0123456789', version: '1.0.0' })
    const publicKey = generateKeyPairSync('rsa', { modulusLength: 2048 }).publicKey.export({ type: 'spki', format: 'der' })
    const [, , payload] = decode((await nsm.provider.attestationDocument({ publicKey }))!) as [unknown, unknown, Uint8Array]
    const fields = decode(payload, { useMaps: true }) as Map<string, unknown>
    expect(Buffer.from(fields.get('public_key') as Uint8Array)).toEqual(publicKey)
    expect([fields.get('user_data'), fields.get('nonce')]).toEqual([null, null])
  })

  it('passes on the NSM\u2019s refusal by its code', async () => {
    await expect(nsm.provider.attestationDocument({ publicKey: new Uint8Array(1025) })).rejects.toThrow('the Nitro Secure Module gave no attestation document: InputTooLarge')
  })

  it('closes its descriptor once, and gives no document after', async () => {
    const before = nsm.openDescriptors()
    const provider = openNitroAttestation(nsm.device)
    expect(nsm.openDescriptors()).toBe(before + 1)
    provider.close()
    provider.close()
    expect(nsm.openDescriptors()).toBe(before)
    await expect(provider.attestationDocument({ publicKey: new Uint8Array(32) })).rejects.toThrow('the Nitro attestation provider is closed')
  })

  it('closes the descriptor again when the module does not describe itself', () => {
    const before = nsm.openDescriptors()
    const silent = { ...nsm.device, getDescription: () => { throw new Error('InternalError') } }
    expect(() => openNitroAttestation(silent)).toThrow('the Nitro Secure Module does not describe itself: InternalError')
    expect(nsm.openDescriptors()).toBe(before)
  })
})

describe('openRecipientCiphertext', () => {
  const recipient = generateKeyPairSync('rsa', { modulusLength: 2048 })
  const secret = Buffer.from('a 32-byte data key, for the test')

  it('opens the DER form and the BER form (indefinite lengths, segmented content) KMS sends', () => {
    expect(openRecipientCiphertext(sealForRecipient(secret, recipient.publicKey), recipient.privateKey)).toEqual(secret)
    const ber = sealForRecipient(secret, recipient.publicKey, { ber: true })
    expect([ber[0], ber[1]]).toEqual([0x30, 0x80]) // indefinite length, as KMS writes it
    expect(openRecipientCiphertext(ber, recipient.privateKey)).toEqual(secret)
  })

  it('opens into memory only the caller holds, as unsealPrivateKey does, not a slice of Node\u2019s shared pool', () => {
    const opened = openRecipientCiphertext(sealForRecipient(secret, recipient.publicKey), recipient.privateKey)
    expect(opened).toEqual(secret)
    expect([opened.byteOffset, opened.buffer.byteLength]).toEqual([0, secret.length])
  })

  it('refuses an envelope for another key', () => {
    const other = generateKeyPairSync('rsa', { modulusLength: 2048 })
    expect(() => openRecipientCiphertext(sealForRecipient(secret, other.publicKey), recipient.privateKey)).toThrow('the content key does not open with this recipient key')
  })

  it('names an algorithm it does not accept', () => {
    const envelope = sealForRecipient(secret, recipient.publicKey)
    // aes256-CBC, 2.16.840.1.101.3.4.1.42, as a DER OID; its last arc made 2 is aes128-CBC.
    const oid = Buffer.from('060960864801650304012a', 'hex')
    const at = envelope.indexOf(oid)
    expect(at).toBeGreaterThan(0)
    const changed = Buffer.from(envelope)
    changed[at + oid.length - 1] = 0x02
    expect(() => openRecipientCiphertext(changed, recipient.privateKey)).toThrow('the content is not encrypted with AES-256-CBC')
  })

  it('refuses segments nested past any real envelope (without exhausting the stack), and segments that are no OCTET STRING', () => {
    // 50,000 constructed OCTET STRINGs, each holding the next, the innermost the ciphertext: headers written once, outside in.
    const nested = (ciphertext: Buffer) => {
      const heads: Buffer[] = []
      let length = ciphertext.length + 2
      for (let level = 0; level < 50_000; level++) {
        const head = Buffer.concat([Buffer.from([0x24]), encodeLength(length)])
        heads.push(head)
        length += head.length
      }
      return [Buffer.concat([...heads.reverse(), Buffer.from([0x04, ciphertext.length]), ciphertext])]
    }
    expect(() => openRecipientCiphertext(sealForRecipient(secret, recipient.publicKey, { ber: true, segments: nested }), recipient.privateKey)).toThrow(new CmsError('BER nested too deeply'))
    const asInteger = (ciphertext: Buffer) => [Buffer.concat([Buffer.from([0x02, ciphertext.length]), ciphertext])]
    expect(() => openRecipientCiphertext(sealForRecipient(secret, recipient.publicKey, { ber: true, segments: asInteger }), recipient.privateKey)).toThrow(new CmsError('a segment of an OCTET STRING has tag 0x2'))
    // Segments of segments, within bounds, still open.
    const twoLevels = (ciphertext: Buffer) => [Buffer.concat([Buffer.from([0x24, ciphertext.length + 2, 0x04, ciphertext.length]), ciphertext])]
    expect(openRecipientCiphertext(sealForRecipient(secret, recipient.publicKey, { ber: true, segments: twoLevels }), recipient.privateKey)).toEqual(secret)
  })

  it('throws only CmsError, never anything else, for every truncation and every single-byte change', () => {
    for (const ber of [false, true]) {
      const envelope = sealForRecipient(secret, recipient.publicKey, { ber })
      for (let length = 0; length < envelope.length; length++) {
        expect(() => openRecipientCiphertext(envelope.subarray(0, length), recipient.privateKey), `${length} bytes`).toThrow(CmsError)
      }
      for (let at = 0; at < envelope.length; at++) {
        const changed = Buffer.from(envelope)
        changed[at]! ^= 0x5a
        try {
          openRecipientCiphertext(changed, recipient.privateKey)
        } catch (error) {
          // A changed ciphertext byte can still unpad to garbage (CBC has no integrity; the DEK's own GCM seals catch that).
          expect(error, `byte ${at}`).toBeInstanceOf(CmsError)
        }
      }
    }
  })
})

describe('the enclave\u2019s KMS client against a KMS that fails', () => {
  it('fails a data key call with what KMS said (throttled, 5xx, denied), or within its time bounds when KMS never answers, and works once KMS does', { timeout: 20_000 }, async () => {
    const credentials = new DeliveredCredentials()
    credentials.set(kms.credentials)
    const enclaveClient = enclaveKmsClient({ region: kms.credentials.region, endpoint: kms.url, credentials, timeoutMs: 2_000 })
    const kmsKeyId = kms.createSymmetricKey()
    const keys = new KmsDataKeys({ client: enclaveClient, kmsKeyId, attestation: developmentAttestation })
    const { dek, wrapped } = await keys.generate()
    try {
      const refusals: Array<[KmsFault, RegExp]> = [
        ['throttle', /exceeded the rate at which you may call KMS/],
        ['internal-error', /An internal error occurred/],
        ['access-denied', /not authorized to perform: kms:Decrypt/],
      ]
      for (const [fault, message] of refusals) {
        kms.setFault(fault, kmsKeyId)
        await expect(keys.unwrap(wrapped)).rejects.toThrow(message)
      }
      kms.setFault('hang', kmsKeyId)
      const started = performance.now()
      await expect(keys.generate()).rejects.toThrow()
      // Two attempts of 2 s each (and the SDK's backoff between them), not a wait for ever.
      expect(performance.now() - started).toBeLessThan(8_000)
      kms.setFault('none', kmsKeyId)
      expect(Buffer.from(await keys.unwrap(wrapped))).toEqual(Buffer.from(dek))
    } finally {
      kms.setFault('none', kmsKeyId)
      enclaveClient.destroy()
    }
  })

  it('gives a call up after callTimeoutMs in all when its answer trickles in, which no wait for bytes alone would', { timeout: 20_000 }, async () => {
    // A relay that passes the answer's head at once and its body a byte every 100 ms: never silent for 300 ms.
    const relay = createServer((client) => {
      const upstream = connect(Number(new URL(kms.url).port), '127.0.0.1')
      client.pipe(upstream)
      let seen = Buffer.alloc(0)
      let headDone = false
      const queue: number[] = []
      const drip = setInterval(() => {
        const byte = queue.shift()
        if (byte !== undefined && !client.destroyed) client.write(Uint8Array.of(byte))
      }, 100)
      upstream.on('data', (chunk: Buffer) => {
        if (headDone) return void queue.push(...chunk)
        seen = Buffer.concat([seen, chunk])
        const end = seen.indexOf('\r\n\r\n')
        if (end < 0) return
        headDone = true
        client.write(seen.subarray(0, end + 4))
        queue.push(...seen.subarray(end + 4))
      })
      const close = () => {
        clearInterval(drip)
        upstream.destroy()
        client.destroy()
      }
      client.on('close', close)
      client.on('error', close)
      upstream.on('error', close)
    })
    await new Promise<void>((resolve) => relay.listen(0, '127.0.0.1', resolve))
    const credentials = new DeliveredCredentials()
    credentials.set(kms.credentials)
    const relayed = enclaveKmsClient({ region: kms.credentials.region, endpoint: `http://127.0.0.1:${(relay.address() as AddressInfo).port}`, credentials, timeoutMs: 300 })
    try {
      const keys = new KmsDataKeys({ client: relayed, kmsKeyId: kms.createSymmetricKey(), attestation: developmentAttestation, callTimeoutMs: 1_500 })
      const started = performance.now()
      await expect(keys.generate()).rejects.toThrow('KMS GenerateDataKey took over 1500 ms in all, and was given up')
      // A few hundred bytes of body at 10 a second would take most of a minute.
      expect(performance.now() - started).toBeLessThan(5_000)
    } finally {
      relayed.destroy()
      relay.close()
    }
  })

  it('signs its calls with the session token of temporary credentials the parent delivered, which a KMS that issued them requires', async () => {
    const temporary = await startLocalKms({ port: 0, sessionToken: 'a-session-token-from-the-instance-role' })
    const credentials = new DeliveredCredentials()
    const client = enclaveKmsClient({ region: temporary.credentials.region, endpoint: temporary.url, credentials, timeoutMs: 2_000 })
    try {
      const keys = new KmsDataKeys({ client, kmsKeyId: temporary.createSymmetricKey(), attestation: developmentAttestation })
      const { accessKeyId, secretAccessKey } = temporary.credentials
      credentials.set({ accessKeyId, secretAccessKey })
      await expect(keys.generate()).rejects.toThrow('The security token included in the request is invalid.')
      credentials.set({ accessKeyId, secretAccessKey, sessionToken: 'a-session-token-from-the-instance-role' })
      expect((await keys.generate()).dek).toHaveLength(32)
    } finally {
      client.destroy()
      await temporary.stop()
    }
  })
})

