import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest'
import { keccak256, recoverAddress, toHex } from 'viem'
import { AwsKmsSigner } from '../../backends/awsKms.js'
import { startLocalKms, type LocalKms } from '../support/kmsServer.js'

/**
 * The KMS signer's time limits, with the real @aws-sdk/client-kms in Node against the local KMS server (real
 * SigV4, real secp256k1). The Worker tests (test/worker/signerBackends.test.ts) run the same signer in workerd.
 */

let kms: LocalKms
const digest = keccak256(toHex('within one deadline'))

beforeAll(async () => {
  kms = await startLocalKms({ port: 0 })
})

afterEach(() => {
  kms.setLatency(0)
  kms.setFault('none')
})

afterAll(async () => {
  await kms.stop()
})

/** A signer that has not looked its address up yet (a new isolate's). */
function coldSigner(deadlineMs: number): AwsKmsSigner {
  const { accessKeyId, secretAccessKey, region } = kms.credentials
  return new AwsKmsSigner({ name: 'kms', keyId: kms.createKey(), region, endpoint: kms.url, credentials: { accessKeyId, secretAccessKey }, deadlineMs, maxAttempts: 1 })
}

describe('AWS KMS signer', () => {
  it('signs when cold within its deadline, its address looked up once', async () => {
    const signer = coldSigner(3_000)
    const before = kms.calls.GetPublicKey ?? 0
    const signed = await signer.signDigest(digest)
    expect(await recoverAddress({ hash: digest, signature: signed.signature })).toBe(signed.address)
    await signer.signDigest(digest)
    expect((kms.calls.GetPublicKey ?? 0) - before).toBe(1)
  })

  it('gives a cold signature one deadline in all: the address lookup and the Sign share it', { timeout: 20_000 }, async () => {
    // Each call alone fits the deadline, with room for a busy machine; the two together do not. Given a deadline
    // each, this would sign.
    const signer = coldSigner(2_500)
    kms.setLatency(1_400)
    await expect(signer.signDigest(digest)).rejects.toMatchObject({ message: 'kms: AWS KMS did not answer within 2500 ms', options: { retryable: true } })
    // The lookup went on for the next call: once the address is known, a Sign alone fits.
    await expect.poll(() => signer.signDigest(digest).then(() => 'signed', (error: Error) => error.message), { timeout: 15_000 }).toBe('signed')
  })

  it("stops waiting for a shared address lookup when its caller's signal aborts, and the lookup serves the others", async () => {
    const signer = coldSigner(5_000)
    kms.setLatency(600)
    const caller = new AbortController()
    const started = performance.now()
    const stopped = signer.signDigest(digest, { signal: caller.signal })
    const patient = signer.signDigest(digest)
    setTimeout(() => caller.abort(), 50)
    await expect(stopped).rejects.toMatchObject({ message: 'AWS KMS signer kms: stopped, as its caller no longer waits for the signature', options: { retryable: true } })
    // Before the lookup could have answered: the caller was not held for it.
    expect(performance.now() - started).toBeLessThan(600)
    const signed = await patient
    expect(await recoverAddress({ hash: digest, signature: signed.signature })).toBe(signed.address)
  })

  it("stops a Sign in flight when its caller's signal aborts", async () => {
    const signer = coldSigner(5_000)
    await signer.address()
    kms.setFault('hang')
    const caller = new AbortController()
    const signing = signer.signDigest(digest, { signal: caller.signal })
    setTimeout(() => caller.abort(), 50)
    await expect(signing).rejects.toMatchObject({ message: 'AWS KMS signer kms: stopped, as its caller no longer waits for the signature' })
  })
})
