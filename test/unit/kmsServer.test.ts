import { createHash, createPublicKey } from 'node:crypto'
import {
  CreateKeyCommand,
  DecryptCommand,
  DescribeKeyCommand,
  GenerateDataKeyCommand,
  GetPublicKeyCommand,
  KMSClient,
  SignCommand,
} from '@aws-sdk/client-kms'
import { p256 } from '@noble/curves/p256'
import { secp256k1 } from '@noble/curves/secp256k1'
import { keccak256, toBytes, toHex } from 'viem'
import { generatePrivateKey, privateKeyToAddress, publicKeyToAddress } from 'viem/accounts'
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest'
import { startLocalKms, type LocalKms } from '../support/kmsServer.js'

const halfN = secp256k1.CURVE.n >> 1n
const digest = toBytes(keccak256(toHex('a user operation hash')))

let kms: LocalKms
let client: KMSClient
const clientFor = (server: LocalKms, credentials: Partial<LocalKms['credentials']> = {}) => {
  const c = { ...server.credentials, ...credentials }
  return new KMSClient({ endpoint: server.url, region: c.region, credentials: { accessKeyId: c.accessKeyId, secretAccessKey: c.secretAccessKey }, maxAttempts: 1 })
}
/** The error a promise rejects with (fails the test if it resolves). */
const failure = async (p: Promise<unknown>): Promise<Error & { $metadata?: { httpStatusCode?: number } }> => {
  try {
    await p
  } catch (e) {
    return e as Error
  }
  throw new Error('expected a rejection')
}
const sign = (KeyId: string, message: Uint8Array = digest) =>
  client.send(new SignCommand({ KeyId, Message: message, MessageType: 'DIGEST', SigningAlgorithm: 'ECDSA_SHA_256' }))

beforeAll(async () => {
  kms = await startLocalKms({ port: 18620 })
  client = clientFor(kms)
})
afterAll(async () => {
  client?.destroy()
  await kms?.stop()
})
beforeEach(() => kms.setFault('none'))

describe('local KMS (real @aws-sdk/client-kms, real crypto)', () => {
  it('serves an imported secp256k1 key as SPKI whose address matches, and signs verifiable DER over the digest', async () => {
    const privateKey = generatePrivateKey()
    const keyId = kms.createKey({ privateKey })
    expect(keyId).toMatch(/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/)

    const pub = await client.send(new GetPublicKeyCommand({ KeyId: keyId }))
    expect(pub).toMatchObject({ KeyId: `arn:aws:kms:us-east-1:111122223333:key/${keyId}`, KeySpec: 'ECC_SECG_P256K1', KeyUsage: 'SIGN_VERIFY', SigningAlgorithms: ['ECDSA_SHA_256'] })
    const der = Buffer.from(pub.PublicKey!)
    expect(der.subarray(0, 23).toString('hex')).toBe('3056301006072a8648ce3d020106052b8104000a034200')
    const jwk = createPublicKey({ key: der, format: 'der', type: 'spki' }).export({ format: 'jwk' }) // OpenSSL parses it too
    expect(jwk.crv).toBe('secp256k1')
    const point = der.subarray(-65)
    expect(Buffer.from(jwk.x!, 'base64url')).toEqual(point.subarray(1, 33))
    expect(publicKeyToAddress(toHex(point))).toBe(privateKeyToAddress(privateKey))

    const out = await sign(pub.KeyId!)
    expect(out.KeyId).toBe(pub.KeyId)
    expect(out.SigningAlgorithm).toBe('ECDSA_SHA_256')
    const sig = secp256k1.Signature.fromDER(out.Signature!)
    expect(secp256k1.verify(sig, digest, point, { lowS: false })).toBe(true)
    expect(kms.calls).toMatchObject({ GetPublicKey: 1, Sign: 1 })
  })

  it('creates keys over the wire too, and describes them', async () => {
    const created = await client.send(new CreateKeyCommand({ KeySpec: 'ECC_SECG_P256K1', KeyUsage: 'SIGN_VERIFY' }))
    expect(created.KeyMetadata).toMatchObject({ KeySpec: 'ECC_SECG_P256K1', KeyUsage: 'SIGN_VERIFY', KeyState: 'Enabled', Enabled: true, Origin: 'AWS_KMS' })
    expect(created.KeyMetadata!.CreationDate).toBeInstanceOf(Date)
    const described = await client.send(new DescribeKeyCommand({ KeyId: created.KeyMetadata!.Arn! }))
    expect(described.KeyMetadata!.KeyId).toBe(created.KeyMetadata!.KeyId)
    const pub = await client.send(new GetPublicKeyCommand({ KeyId: created.KeyMetadata!.KeyId! }))
    const out = await sign(created.KeyMetadata!.KeyId!)
    expect(secp256k1.verify(secp256k1.Signature.fromDER(out.Signature!), digest, Buffer.from(pub.PublicKey!).subarray(-65), { lowS: false })).toBe(true)
  })

  it('serves a P-256 key with its own curve OID and P-256 signatures (clients must reject it by KeySpec)', async () => {
    const keyId = kms.createKey({ keySpec: 'ECC_NIST_P256' })
    const pub = await client.send(new GetPublicKeyCommand({ KeyId: keyId }))
    expect(pub.KeySpec).toBe('ECC_NIST_P256')
    const der = Buffer.from(pub.PublicKey!)
    expect(der.toString('hex')).toContain('06082a8648ce3d030107')
    expect(createPublicKey({ key: der, format: 'der', type: 'spki' }).asymmetricKeyDetails?.namedCurve).toBe('prime256v1')
    const out = await sign(keyId)
    expect(p256.verify(p256.Signature.fromDER(out.Signature!), digest, der.subarray(-65), { lowS: false })).toBe(true)
  })

  it("'high-s' returns s > n/2 (still a valid signature), 'wrong-key' signs with another key", async () => {
    const privateKey = generatePrivateKey()
    const keyId = kms.createKey({ privateKey })
    const publicKey = secp256k1.getPublicKey(toBytes(privateKey), false)
    kms.setFault('high-s', keyId)
    for (let i = 0; i < 5; i++) {
      const message = toBytes(keccak256(toHex(`high-s ${i}`)))
      const sig = secp256k1.Signature.fromDER((await sign(keyId, message)).Signature!)
      expect(sig.s > halfN).toBe(true)
      expect(secp256k1.verify(sig, message, publicKey, { lowS: false })).toBe(true)
      expect(secp256k1.verify(sig.normalizeS(), message, publicKey)).toBe(true)
    }
    kms.setFault('wrong-key', keyId)
    const wrong = secp256k1.Signature.fromDER((await sign(keyId)).Signature!)
    expect(secp256k1.verify(wrong, digest, publicKey, { lowS: false })).toBe(false)
  })

  it('surfaces throttling, access denial and internal errors with their AWS names and statuses', async () => {
    const keyId = kms.createKey()
    kms.setFault('throttle')
    const throttled = await failure(sign(keyId))
    expect(throttled.name).toBe('ThrottlingException')
    expect(throttled.$metadata?.httpStatusCode).toBe(400)
    expect((await failure(client.send(new GetPublicKeyCommand({ KeyId: keyId })))).name).toBe('ThrottlingException')

    kms.setFault('access-denied')
    const denied = await failure(sign(keyId))
    expect(denied.name).toBe('AccessDeniedException')
    expect(denied.message).toContain('kms:Sign')
    expect((await failure(client.send(new GetPublicKeyCommand({ KeyId: keyId })))).name).toBe('AccessDeniedException')

    kms.setFault('internal-error')
    const internal = await failure(sign(keyId))
    expect(internal.name).toBe('KMSInternalException')
    expect(internal.$metadata?.httpStatusCode).toBe(500)
  })

  it('scopes a fault to one key when given a key id', async () => {
    const faulty = kms.createKey()
    const healthy = kms.createKey()
    kms.setFault('access-denied', faulty)
    expect((await failure(sign(faulty))).name).toBe('AccessDeniedException')
    await expect(sign(healthy)).resolves.toMatchObject({ SigningAlgorithm: 'ECDSA_SHA_256' })
    kms.setFault('none')
    await expect(sign(faulty)).resolves.toMatchObject({ SigningAlgorithm: 'ECDSA_SHA_256' })
  })

  it('rejects unknown keys, non-digest messages, and unknown operations', async () => {
    expect((await failure(sign('00000000-0000-4000-8000-000000000000'))).name).toBe('NotFoundException')
    const keyId = kms.createKey()
    expect((await failure(sign(keyId, digest.subarray(0, 31)))).name).toBe('ValidationException')
    const raw = client.send(new SignCommand({ KeyId: keyId, Message: digest, MessageType: 'RAW', SigningAlgorithm: 'ECDSA_SHA_256' }))
    expect((await failure(raw)).name).toBe('ValidationException')

    const renamed = clientFor(kms)
    renamed.middlewareStack.add(
      (next) => async (args) => {
        ;(args.request as { headers: Record<string, string> }).headers['x-amz-target'] = 'TrentService.DoesNotExist'
        return next(args)
      },
      { step: 'build' }, // before the signer, so the renamed request is still correctly signed
    )
    expect((await failure(renamed.send(new GetPublicKeyCommand({ KeyId: keyId })))).name).toBe('UnknownOperationException')
    renamed.destroy()
  })

  it('rejects requests with wrong or missing credentials (SigV4 is verified)', async () => {
    const keyId = kms.createKey()
    const wrongSecret = clientFor(kms, { secretAccessKey: 'not-the-secret' })
    expect((await failure(wrongSecret.send(new GetPublicKeyCommand({ KeyId: keyId })))).name).toBe('InvalidSignatureException')
    const wrongKeyId = clientFor(kms, { accessKeyId: 'AKIAWRONGWRONGWRONG1' })
    const unrecognized = await failure(wrongKeyId.send(new GetPublicKeyCommand({ KeyId: keyId })))
    expect(unrecognized.name).toBe('UnrecognizedClientException')
    expect(unrecognized.$metadata?.httpStatusCode).toBe(400)
    const wrongRegion = clientFor(kms, { region: 'eu-west-1' })
    expect((await failure(wrongRegion.send(new GetPublicKeyCommand({ KeyId: keyId })))).name).toBe('InvalidSignatureException')
    for (const c of [wrongSecret, wrongKeyId, wrongRegion]) c.destroy()

    // A correctly signed request whose body is swapped afterwards (same length, other key, fresh payload hash) must fail.
    const otherKey = kms.createKey()
    const swapped = clientFor(kms)
    swapped.middlewareStack.add(
      (next) => async (args) => {
        const request = args.request as { body: Uint8Array | string; headers: Record<string, string> }
        const body = (typeof request.body === 'string' ? request.body : new TextDecoder().decode(request.body)).replace(keyId, otherKey)
        request.body = body
        request.headers['x-amz-content-sha256'] = createHash('sha256').update(body).digest('hex')
        return next(args)
      },
      { step: 'finalizeRequest', priority: 'low' }, // after the signer
    )
    const swappedError = await failure(swapped.send(new GetPublicKeyCommand({ KeyId: keyId })))
    expect(swappedError.name).toBe('InvalidSignatureException')
    expect(swappedError.message).toContain('does not match the signature you provided')
    swapped.destroy()

    const headers = { 'content-type': 'application/x-amz-json-1.1', 'x-amz-target': 'TrentService.GetPublicKey' }
    const body = JSON.stringify({ KeyId: keyId })
    const unsigned = await fetch(kms.url, { method: 'POST', headers, body })
    expect(unsigned.status).toBe(400)
    expect(await unsigned.json()).toMatchObject({ __type: 'MissingAuthenticationTokenException' })
    const malformed = await fetch(kms.url, { method: 'POST', headers: { ...headers, authorization: 'AWS4-HMAC-SHA256 nonsense', 'x-amz-date': '20250101T000000Z' }, body })
    expect(malformed.status).toBe(400)
    expect(await malformed.json()).toMatchObject({ __type: 'IncompleteSignatureException' })
  })

  it('round-trips GenerateDataKey / Decrypt with real AES-256-GCM envelope encryption', async () => {
    const created = await client.send(new CreateKeyCommand({ KeySpec: 'SYMMETRIC_DEFAULT', KeyUsage: 'ENCRYPT_DECRYPT' }))
    const KeyId = created.KeyMetadata!.KeyId!
    const context = { purpose: 'paymaster-enclave' }
    const dataKey = await client.send(new GenerateDataKeyCommand({ KeyId, KeySpec: 'AES_256', EncryptionContext: context }))
    expect(dataKey.Plaintext).toHaveLength(32)
    expect(dataKey.KeyId).toBe(created.KeyMetadata!.Arn)
    const blob = dataKey.CiphertextBlob!
    expect(Buffer.from(blob).includes(Buffer.from(dataKey.Plaintext!))).toBe(false)

    const decrypted = await client.send(new DecryptCommand({ CiphertextBlob: blob, EncryptionContext: context }))
    expect(Buffer.from(decrypted.Plaintext!)).toEqual(Buffer.from(dataKey.Plaintext!))
    expect(decrypted.KeyId).toBe(created.KeyMetadata!.Arn)

    const tampered = Uint8Array.from(blob)
    tampered[tampered.length - 1]! ^= 1
    expect((await failure(client.send(new DecryptCommand({ CiphertextBlob: tampered, EncryptionContext: context })))).name).toBe('InvalidCiphertextException')
    expect((await failure(client.send(new DecryptCommand({ CiphertextBlob: blob })))).name).toBe('InvalidCiphertextException') // context is bound
    const other = kms.createKey()
    expect((await failure(client.send(new GenerateDataKeyCommand({ KeyId: other, KeySpec: 'AES_256' })))).name).toBe('InvalidKeyUsageException')
  })

  it("'hang' never answers, and stop() still ends promptly by destroying the open socket", async () => {
    const other = await startLocalKms({ port: 18621 })
    const c = clientFor(other)
    try {
      const keyId = other.createKey()
      other.setFault('hang')
      const pending = failure(c.send(new GetPublicKeyCommand({ KeyId: keyId })))
      await expect.poll(() => other.calls.GetPublicKey, { timeout: 10_000, interval: 10 }).toBe(1)
      const started = Date.now()
      await other.stop()
      expect(Date.now() - started).toBeLessThan(1000)
      expect((await pending).message).toMatch(/socket|ECONNRESET|hang up|aborted/i)
    } finally {
      c.destroy()
    }
  })
})
