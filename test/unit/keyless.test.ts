import { createServer, type Server } from 'node:http'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { secp256k1 } from '@noble/curves/secp256k1'
import { bytesToHex, hexToBytes, keccak256, recoverAddress, toHex, type Hex } from 'viem'
import { generatePrivateKey, privateKeyToAddress } from 'viem/accounts'
import { FallbackSigner } from '../../backends/fallback.js'
import { KeylessSigner } from '../../backends/keyless.js'
import { LocalSigner } from '../../backends/local.js'
import { SignerMetrics } from '../../backends/signerMetrics.js'
import { RequestVerifier } from '../../enclave-origin/protocol/requestSigning.js'

/**
 * The keyless backend against a scripted parent that verifies our HMAC for
 * real and answers as the parent does: 503 with Retry-After while the key
 * unlocks, then the signature.
 */

const originKey = generatePrivateKey()
const hmac = { keyId: 'worker', secret: 'keyless-unit-test-secret' }
let server: Server
let url: string
let unlockingFor = 0
let retryAfterMs = 30
/** Answer 503s with the standard Retry-After (seconds) alone, as a proxy in front of the parent might. */
let secondsOnly = false
const seen: string[] = []

beforeAll(async () => {
  const verifier = new RequestVerifier({ secrets: { [hmac.keyId]: hmac.secret } })
  server = createServer(async (request, response) => {
    const chunks: Buffer[] = []
    for await (const chunk of request) chunks.push(chunk as Buffer)
    const body = new Uint8Array(Buffer.concat(chunks))
    const failure = await verifier.verify({ method: request.method!, path: request.url!, headers: (name) => request.headers[name] as string | undefined, body })
    seen.push(failure ?? 'ok')
    if (failure) return response.writeHead(401).end(JSON.stringify({ error: failure }))
    if (request.method === 'GET') return response.writeHead(200).end(JSON.stringify({ address: privateKeyToAddress(originKey) }))
    if (unlockingFor > 0) {
      unlockingFor--
      const headers: Record<string, string> = secondsOnly ? { 'retry-after': '1' } : { 'retry-after': '1', 'retry-after-ms': String(retryAfterMs) }
      return response.writeHead(503, headers).end(JSON.stringify({ error: 'needs_unlock' }))
    }
    const { digest } = JSON.parse(new TextDecoder().decode(body)) as { digest: Hex }
    const signature = secp256k1.sign(hexToBytes(digest), hexToBytes(originKey))
    response.writeHead(200).end(JSON.stringify({ signature: bytesToHex(signature.toCompactRawBytes()), recoveryId: signature.recovery }))
  })
  await new Promise<void>((resolve) => server.listen(18661, '127.0.0.1', resolve))
  url = 'http://127.0.0.1:18661'
})

afterAll(async () => {
  server.closeAllConnections()
  await new Promise((resolve) => server.close(resolve))
})

const keyless = (deadlineMs = 500) => new KeylessSigner({ name: 'origin', url, keyId: 'k1', hmacKeyId: hmac.keyId, hmacSecret: hmac.secret, deadlineMs })
const digest = keccak256(toHex('keyless'))

describe('keyless backend', () => {
  it('signs through the parent with HMAC-authenticated requests', async () => {
    const signed = await keyless().signDigest(digest)
    expect(signed).toMatchObject({ signedBy: 'origin', address: privateKeyToAddress(originKey) })
    expect(await recoverAddress({ hash: digest, signature: signed.signature })).toBe(privateKeyToAddress(originKey))
    expect(seen.every((outcome) => outcome === 'ok')).toBe(true)
  })

  it('waits out a Retry-After that fits its deadline, then signs', async () => {
    const signer = keyless()
    await signer.address()
    unlockingFor = 2
    retryAfterMs = 30
    const started = Date.now()
    await expect(signer.signDigest(digest)).resolves.toMatchObject({ signedBy: 'origin' })
    expect(Date.now() - started).toBeGreaterThanOrEqual(60)
    expect(unlockingFor).toBe(0)
  })

  it('honours a plain Retry-After in seconds when the origin sends no Retry-After-Ms', async () => {
    const signer = keyless(5_000)
    await signer.address()
    unlockingFor = 1
    secondsOnly = true
    const started = Date.now()
    try {
      await expect(signer.signDigest(digest)).resolves.toMatchObject({ signedBy: 'origin' })
    } finally {
      secondsOnly = false
    }
    expect(Date.now() - started).toBeGreaterThanOrEqual(1_000)
    expect(unlockingFor).toBe(0)
  })

  it('fails at once when the Retry-After would pass its deadline, so a fallback backup signs instead', async () => {
    // A deadline with room for a slow answer on a loaded machine (100 ms once failed a CI run), but
    // far short of the Retry-After: waiting it out would fail later, with "no signature within".
    const signer = keyless(1_000)
    await signer.address()
    unlockingFor = 1
    retryAfterMs = 5_000
    const started = Date.now()
    await expect(signer.signDigest(digest)).rejects.toThrow('answered 503 (needs_unlock)')
    expect(Date.now() - started).toBeLessThan(1_000)

    unlockingFor = 1
    const backup = new LocalSigner({ name: 'kms-stand-in', privateKey: originKey, secretName: 'KEY', allowEphemeral: false })
    const chain = new FallbackSigner({
      name: 'primary',
      members: [keyless(1_000), backup],
      timeoutMs: 2_000,
      failureThreshold: 3,
      coolDownMs: 30_000,
      requireSameAddress: true,
      metrics: new SignerMetrics(),
    })
    expect((await chain.signDigest(digest)).signedBy).toBe('kms-stand-in')
  })
})
