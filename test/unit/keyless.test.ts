import { createServer, type Server } from 'node:http'
import type { AddressInfo } from 'node:net'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { secp256k1 } from '@noble/curves/secp256k1'
import { bytesToHex, hexToBytes, keccak256, recoverAddress, toHex, type Hex } from 'viem'
import { generatePrivateKey, privateKeyToAddress } from 'viem/accounts'
import { FallbackSigner } from '../../backends/fallback.js'
import { createSigners } from '../../backends/factory.js'
import { KeylessSigner } from '../../backends/keyless.js'
import { LocalSigner } from '../../backends/local.js'
import { SignerError } from '../../backends/signer.js'
import { SignerMetrics } from '../../backends/signerMetrics.js'
import { RequestVerifier } from '../../enclave-origin/protocol/requestSigning.js'
import { loadConfig } from '../../config/load.js'

/**
 * The keyless backend against a scripted parent that verifies our HMAC for
 * real and answers as the parent does: 503 with Retry-After while the key
 * unlocks, then the signature.
 */

const originKey = generatePrivateKey()
/** Another key on the same origin, which a mistyped key id could name. */
const otherKey = generatePrivateKey()
const keys: Record<string, Hex> = { k1: originKey, k2: otherKey }
const hmac = { keyId: 'worker', secret: 'keyless-unit-test-secret' }
let server: Server
let url: string
let unlockingFor = 0
let retryAfterMs = 30
/** Why the origin answers those 503s: the parent says needs_unlock, or overloaded when it sheds load. */
let busyReason = 'needs_unlock'
/** Answer 503s with the standard Retry-After (seconds) alone, as a proxy in front of the parent might. */
let secondsOnly = false
/** When set, the origin reports this address for k1, as it would once the key id named another key. */
let reportedAddress: string | undefined
/** The key's state as GET reports it; the parent says active, frozen or archived. */
let reportedState = 'active'
/** When set, the origin answers a sign with this signature instead of a real one. */
let signatureOverride: string | undefined
const seen: string[] = []
let keyLookUps = 0

beforeAll(async () => {
  const verifier = new RequestVerifier({ secrets: { [hmac.keyId]: hmac.secret }, maxFutureSkewMs: 0 })
  server = createServer(async (request, response) => {
    const chunks: Buffer[] = []
    for await (const chunk of request) chunks.push(chunk as Buffer)
    const body = new Uint8Array(Buffer.concat(chunks))
    const failure = await verifier.verify({ method: request.method!, path: request.url!, headers: (name) => request.headers[name] as string | undefined, body })
    seen.push(failure ?? 'ok')
    if (failure) return response.writeHead(401).end(JSON.stringify({ error: failure }))
    // Key ids that make the origin answer a status of the test's choosing, with a body of its own words.
    const scriptedStatus = /^\/v1\/keys\/status-(\d{3})\//.exec(request.url!)
    if (scriptedStatus) return response.writeHead(Number(scriptedStatus[1])).end(JSON.stringify({ error: 'the origin\u2019s own words' }))
    // A proxy's 503 whose Retry-After this backend cannot use (a fraction, or a date): as none at all.
    const unusableRetryAfter = /^\/v1\/keys\/retry-after-(fraction|date)\//.exec(request.url!)
    if (unusableRetryAfter) {
      const retryAfter = unusableRetryAfter[1] === 'fraction' ? '0.05' : new Date(Date.now() + 50).toUTCString()
      return response.writeHead(503, { 'retry-after': retryAfter }).end(JSON.stringify({ error: 'busy' }))
    }
    // A key the origin has moved elsewhere: a redirect to k1's route, which would sign were it followed.
    if (request.url!.startsWith('/v1/keys/moved')) return response.writeHead(307, { location: `${url}/v1/keys/k1${request.url!.slice('/v1/keys/moved'.length)}` }).end()
    const key = keys[/^\/v1\/keys\/([^/]+)/.exec(request.url!)![1]!]!
    if (request.method === 'GET') {
      keyLookUps++
      return response.writeHead(200).end(JSON.stringify({ address: (key === originKey && reportedAddress) || privateKeyToAddress(key), state: reportedState }))
    }
    if (unlockingFor > 0) {
      unlockingFor--
      const headers: Record<string, string> = secondsOnly ? { 'retry-after': '1' } : { 'retry-after': '1', 'retry-after-ms': String(retryAfterMs) }
      return response.writeHead(503, headers).end(JSON.stringify({ error: busyReason }))
    }
    if (signatureOverride) return response.writeHead(200).end(JSON.stringify({ signature: signatureOverride }))
    const { digest } = JSON.parse(new TextDecoder().decode(body)) as { digest: Hex }
    const signature = secp256k1.sign(hexToBytes(digest), hexToBytes(key))
    response.writeHead(200).end(JSON.stringify({ signature: bytesToHex(signature.toCompactRawBytes()), recoveryId: signature.recovery }))
  })
  await new Promise<void>((resolve) => server.listen(18661, '127.0.0.1', resolve))
  url = 'http://127.0.0.1:18661'
})

afterAll(async () => {
  server.closeAllConnections()
  await new Promise((resolve) => server.close(resolve))
})

const keyless = (deadlineMs = 500, baseUrl = url) =>
  new KeylessSigner({ name: 'origin', url: baseUrl, keyId: 'k1', address: privateKeyToAddress(originKey), hmacKeyId: hmac.keyId, hmacSecret: hmac.secret, deadlineMs })
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
    await expect(signer.signDigest(digest)).rejects.toThrow('answered 503 (the key is still being unlocked)')
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

  it("judges a Retry-After against its caller's deadline when that is earlier: in a chain, the attempt's timeout", async () => {
    const signer = keyless(5_000)
    await signer.address()
    unlockingFor = 1
    retryAfterMs = 1_500
    await expect(signer.signDigest(digest, { deadline: Date.now() + 1_000 })).rejects.toThrow('answered 503 (the key is still being unlocked)')
    expect(unlockingFor).toBe(0)

    // A chain whose attempts time out at 1 s, before the origin's own 5 s deadline: the origin fails as soon as its
    // 503 comes (a failure, not a timeout), and the backup signs at once rather than after the chain's timeout.
    unlockingFor = 1
    const metrics = new SignerMetrics()
    const backup = new LocalSigner({ name: 'kms-stand-in', privateKey: originKey, secretName: 'KEY', allowEphemeral: false })
    const chain = new FallbackSigner({ name: 'primary', members: [keyless(5_000), backup], timeoutMs: 1_000, failureThreshold: 3, coolDownMs: 30_000, requireSameAddress: true, metrics })
    expect((await chain.signDigest(digest)).signedBy).toBe('kms-stand-in')
    expect([metrics.count('origin', 'failure'), metrics.count('origin', 'timeout')]).toEqual([1, 0])
    expect(unlockingFor).toBe(0)
  })

  it("in a chain whose timeout comes before its own deadline, an origin that never answers is the chain's timeout, not a failure of its own", async () => {
    const silent = createServer((request) => request.resume())
    await new Promise<void>((resolve) => silent.listen(0, '127.0.0.1', resolve))
    try {
      const metrics = new SignerMetrics()
      const backup = new LocalSigner({ name: 'kms-stand-in', privateKey: originKey, secretName: 'KEY', allowEphemeral: false })
      const hung = keyless(5_000, `http://127.0.0.1:${(silent.address() as AddressInfo).port}`)
      const chain = new FallbackSigner({ name: 'primary', members: [hung, backup], timeoutMs: 300, failureThreshold: 3, coolDownMs: 30_000, requireSameAddress: true, metrics })
      expect((await chain.signDigest(digest)).signedBy).toBe('kms-stand-in')
      expect([metrics.count('origin', 'timeout'), metrics.count('origin', 'failure')]).toEqual([1, 0])
    } finally {
      silent.closeAllConnections()
      silent.close()
    }
  })

  it('does not wait out a Retry-After that would leave too little of its deadline for the retry', async () => {
    const signer = keyless(300)
    await signer.address()
    unlockingFor = 1
    retryAfterMs = 270
    await expect(signer.signDigest(digest)).rejects.toThrow('answered 503 (the key is still being unlocked)')
    expect(unlockingFor).toBe(0)
  })

  it('says the origin is overloaded when it shed the request and the wait would not fit', async () => {
    const signer = keyless(300)
    await signer.address()
    unlockingFor = 1
    retryAfterMs = 270
    busyReason = 'overloaded'
    try {
      await expect(signer.signDigest(digest)).rejects.toThrow('answered 503 (it is overloaded)')
    } finally {
      busyReason = 'needs_unlock'
    }
  })

  it('stops waiting out a Retry-After, and asks the origin no more, once its caller no longer waits', async () => {
    const signer = keyless(5_000)
    await signer.address()
    unlockingFor = 100
    retryAfterMs = 200
    const caller = new AbortController()
    const asked = seen.length
    try {
      const signing = signer.signDigest(digest, { signal: caller.signal })
      for (let i = 0; i < 100 && seen.length === asked; i++) await new Promise((resolve) => setTimeout(resolve, 5))
      caller.abort()
      const stopped = Date.now()
      await expect(signing).rejects.toThrow('keyless signer origin: stopped, as its caller no longer waits for the signature')
      expect(Date.now() - stopped).toBeLessThan(100)
      await new Promise((resolve) => setTimeout(resolve, 300))
      expect(seen.length).toBe(asked + 1)
    } finally {
      unlockingFor = 0
    }
  })

  it('never asks the origin for its address to sign: one request per signature, checked against the configured address', async () => {
    const lookUps = keyLookUps
    const signer = keyless()
    expect(await signer.address()).toBe(privateKeyToAddress(originKey))
    const signed = await signer.signDigest(digest)
    expect(keyLookUps).toBe(lookUps)
    expect(await recoverAddress({ hash: digest, signature: signed.signature })).toBe(privateKeyToAddress(originKey))
  })

  it('does not start waiting out a Retry-After once its caller has stopped waiting while the 503 came in', async () => {
    const caller = new AbortController()
    // The caller gives up just as the 503 arrives: the abort has happened before the wait begins.
    const abortingOn503: typeof fetch = async (input, init) => {
      const response = await fetch(input, init)
      if (response.status === 503) caller.abort()
      return response
    }
    const signer = new KeylessSigner({ name: 'origin', url, keyId: 'k1', address: privateKeyToAddress(originKey), hmacKeyId: hmac.keyId, hmacSecret: hmac.secret, deadlineMs: 5_000, fetch: abortingOn503 })
    await signer.address()
    unlockingFor = 1
    retryAfterMs = 2_000
    try {
      const started = Date.now()
      await expect(signer.signDigest(digest, { signal: caller.signal })).rejects.toThrow('keyless signer origin: stopped, as its caller no longer waits for the signature')
      expect(Date.now() - started).toBeLessThan(1_000)
    } finally {
      unlockingFor = 0
    }
  })

  it('asks again after a 503 whose body fails to cancel, and signs', async () => {
    let broken = 0
    // The first sign is answered by a 503 whose body cannot be cancelled (its stream errors), as a connection that broke off might leave it.
    const brokenOnce: typeof fetch = async (input, init) => {
      if (init?.method !== 'POST' || broken++ > 0) return fetch(input, init)
      const body = new ReadableStream({
        cancel() {
          throw new Error('the stream broke')
        },
      })
      return new Response(body, { status: 503, headers: { 'retry-after': '1', 'retry-after-ms': '20' } })
    }
    const signer = new KeylessSigner({ name: 'origin', url, keyId: 'k1', address: privateKeyToAddress(originKey), hmacKeyId: hmac.keyId, hmacSecret: hmac.secret, deadlineMs: 2_000, fetch: brokenOnce })
    const signed = await signer.signDigest(digest)
    expect(broken).toBe(2)
    expect(await recoverAddress({ hash: digest, signature: signed.signature })).toBe(privateKeyToAddress(originKey))
  })

  it('refuses a signature that is not two in-range 32-byte values as malformed, without trying to recover it', async () => {
    const signer = keyless()
    const cases = {
      [`0x${'00'.repeat(32)}${'11'.repeat(32)}`]: 'compact signature values are out of range',
      [`0x${'11'.repeat(32)}${'ff'.repeat(32)}`]: 'compact signature values are out of range',
      [`0x${'a'.repeat(127)}`]: 'compact signature is not whole bytes of hex',
    }
    try {
      for (const [signature, why] of Object.entries(cases)) {
        signatureOverride = signature
        await expect(signer.signDigest(digest)).rejects.toThrow(new SignerError(`keyless signer origin: the origin returned a malformed signature (${why})`))
      }
    } finally {
      signatureOverride = undefined
    }
  })

  it('health is not ok while the key is frozen or archived: it signs nothing then', async () => {
    const signer = keyless()
    try {
      for (const state of ['frozen', 'archived']) {
        reportedState = state
        expect(await signer.health()).toEqual({ ok: false, error: `keyless signer origin: key k1 is ${state}, and signs nothing` })
      }
      // A state the parent does not have is named as unknown, not quoted: the origin's words stay out of /health.
      reportedState = 'melted <b>by an upgrade</b>'
      expect(await signer.health()).toEqual({ ok: false, error: 'keyless signer origin: key k1 is in a state this signer does not know, and signs nothing' })
    } finally {
      reportedState = 'active'
    }
    expect((await signer.health()).ok).toBe(true)
  })

  it("tells the wallet what a refusal means in its own words, not the origin's text", async () => {
    // The scripted origin answers a 401 with the verifier's reason, as the parent once did.
    const signer = new KeylessSigner({ name: 'origin', url, keyId: 'k1', address: privateKeyToAddress(originKey), hmacKeyId: hmac.keyId, hmacSecret: 'not-the-worker-secret', deadlineMs: 500 })
    await expect(signer.signDigest(digest)).rejects.toThrow(/^keyless signer origin: the origin answered 401 \(it refused this Worker's credentials\)$/)
    expect(seen.at(-1)).toBe('bad-signature')
  })

  it('says a url that reaches no route of the parent is the url at fault, not the key', async () => {
    // As the parent answers any path it does not serve.
    const elsewhere = createServer((request, response) => {
      request.resume()
      response.writeHead(404, { 'content-type': 'application/json' }).end(JSON.stringify({ error: 'no such route' }))
    })
    await new Promise<void>((resolve) => elsewhere.listen(0, '127.0.0.1', resolve))
    try {
      const signer = keyless(500, `http://127.0.0.1:${(elsewhere.address() as AddressInfo).port}/wrong-prefix`)
      await expect(signer.signDigest(digest)).rejects.toThrow('keyless signer origin: the origin answered 404 (no such route: check the url)')
    } finally {
      elsewhere.close()
    }
  })

  it('counts an answer cut short by its deadline after a 200 as a timeout to fail over from, not a malformed signature', async () => {
    // The status and the start of the body, then nothing until the Worker's deadline has passed.
    const stalling = createServer((request, response) => {
      request.resume()
      if (request.method === 'GET') return response.writeHead(200).end(JSON.stringify({ address: privateKeyToAddress(originKey) }))
      response.writeHead(200, { 'content-type': 'application/json', 'content-length': '200' })
      response.write('{"signature":"0x')
    })
    await new Promise<void>((resolve) => stalling.listen(0, '127.0.0.1', resolve))
    try {
      const stalled = keyless(300, `http://127.0.0.1:${(stalling.address() as AddressInfo).port}`)
      const failure = await stalled.signDigest(digest).catch((error: unknown) => error)
      expect(failure).toBeInstanceOf(SignerError)
      expect((failure as SignerError).message).toBe("keyless signer origin: the origin's answer broke off or did not arrive in time")
      expect((failure as SignerError).options.retryable).toBe(true)
      // Its caller giving up while the body comes is said as that, not as a broken answer.
      const caller = new AbortController()
      setTimeout(() => caller.abort(), 100)
      await expect(stalled.signDigest(digest, { signal: caller.signal })).rejects.toThrow('keyless signer origin: stopped, as its caller no longer waits for the signature')
    } finally {
      stalling.closeAllConnections()
      stalling.close()
    }
  })

  it.each([
    [400, 'it could not read the request', false],
    [401, "it refused this Worker's credentials", false],
    [403, "this Worker's credentials may not do that", false],
    [404, 'it has no such key', false],
    [409, 'the key is frozen or archived', false],
    [429, 'too many requests', true],
    [500, 'an unexpected answer', true],
    [502, 'an unexpected answer', true],
    [503, 'the origin is unavailable', true],
  ])('answers a %i from the origin after one request, in its own words, retryable by a fallback chain: %s (%s)', async (status, meaning, retryable) => {
    const asked = seen.length
    const signer = new KeylessSigner({ name: 'origin', url, keyId: `status-${status}`, address: privateKeyToAddress(originKey), hmacKeyId: hmac.keyId, hmacSecret: hmac.secret, deadlineMs: 500 })
    const failure = await signer.signDigest(digest).catch((error: unknown) => error)
    expect(failure).toBeInstanceOf(SignerError)
    expect((failure as SignerError).message).toBe(`keyless signer origin: the origin answered ${status} (${meaning})`)
    expect((failure as SignerError).options.retryable).toBe(retryable)
    // A 503 without a Retry-After is not waited on: nothing says when to ask again.
    expect(seen.length).toBe(asked + 1)
  })

  it.each(['fraction', 'date'])('does not wait on a Retry-After it cannot read (a %s), and fails at once, retryable', async (form) => {
    const asked = seen.length
    const signer = new KeylessSigner({ name: 'origin', url, keyId: `retry-after-${form}`, address: privateKeyToAddress(originKey), hmacKeyId: hmac.keyId, hmacSecret: hmac.secret, deadlineMs: 2_000 })
    const failure = await signer.signDigest(digest).catch((error: unknown) => error)
    expect((failure as SignerError).message).toBe('keyless signer origin: the origin answered 503 (the origin is unavailable)')
    expect((failure as SignerError).options.retryable).toBe(true)
    expect(seen.length).toBe(asked + 1)
  })

  it('follows no redirect: the signed request goes nowhere else, and the url is said to be at fault', async () => {
    const asked = seen.length
    const moved = new KeylessSigner({ name: 'origin', url, keyId: 'moved', address: privateKeyToAddress(originKey), hmacKeyId: hmac.keyId, hmacSecret: hmac.secret, deadlineMs: 500 })
    await expect(moved.signDigest(digest)).rejects.toThrow(/^keyless signer origin: the origin answered 307 \(a redirect, which it does not follow: check the url\)$/)
    expect(seen.length).toBe(asked + 1)
  })

  it('accepts its url with a trailing slash', async () => {
    const signer = keyless(500, `${url}//`)
    await expect(signer.signDigest(digest)).resolves.toMatchObject({ address: privateKeyToAddress(originKey) })
  })

  it('health asks the origin each time, and is not ok once the key id names another key than the one it signs as', async () => {
    const signer = keyless()
    expect(await signer.health()).toEqual({ ok: true, address: privateKeyToAddress(originKey) })
    const before = keyLookUps
    expect((await signer.health()).ok).toBe(true)
    expect(keyLookUps).toBe(before + 1)
    reportedAddress = privateKeyToAddress(otherKey)
    try {
      expect(await signer.health()).toEqual({
        ok: false,
        error: `keyless signer origin: key k1 has address ${privateKeyToAddress(otherKey)}, but this signer signs as ${privateKeyToAddress(originKey)}`,
      })
    } finally {
      reportedAddress = undefined
    }
  })

  it('from the config, a key id naming another origin key neither signs nor reports healthy, whatever address the origin reports for it', async () => {
    const config = loadConfig({
      PAYMASTER_CONFIG: {
        chains: [{ chainId: 8453, paymasters: [{ entryPointVersion: '0.7', contract: 'pimlico-singleton', address: '0xd8a5406e24dcdc93656c1ef20e491a1fcf43b558' }] }],
        signers: { primary: { kind: 'keyless', url, keyId: 'k2', address: privateKeyToAddress(originKey) } },
      },
    })
    const signer = createSigners({ config, env: { ORIGIN_HMAC_SECRET: hmac.secret }, metrics: new SignerMetrics() }).get('primary')!
    await expect(signer.signDigest(digest)).rejects.toThrow(`the signature does not recover to the key's address ${privateKeyToAddress(originKey)}`)
    expect(await signer.health()).toEqual({ ok: false, error: `keyless signer primary: key k2 has address ${privateKeyToAddress(otherKey)}, but this signer signs as ${privateKeyToAddress(originKey)}` })
  })

  it('says a secret the parent could never share is the fault, before sending anything: white space at an end, or under 16 bytes', async () => {
    const requests = seen.length
    for (const [hmacSecret, fault] of [
      [`${hmac.secret}\n`, 'begins or ends with white space'],
      [' a-secret-of-enough-bytes', 'begins or ends with white space'],
      ['fifteen-bytes!!', 'is shorter than 16 bytes'],
      ['a-secret-of,enough-bytes', 'holds ","'],
    ]) {
      const signer = new KeylessSigner({ name: 'origin', url, keyId: 'k1', address: privateKeyToAddress(originKey), hmacKeyId: hmac.keyId, hmacSecret, deadlineMs: 500 })
      await expect(signer.signDigest(digest)).rejects.toThrow(`keyless signer origin: its HMAC secret ${fault}`)
    }
    expect(seen.length).toBe(requests)
  })

  it('refuses a keyless config without the address of its key', () => {
    expect(() =>
      loadConfig({
        PAYMASTER_CONFIG: {
          chains: [{ chainId: 8453, paymasters: [{ entryPointVersion: '0.7', contract: 'pimlico-singleton', address: '0xd8a5406e24dcdc93656c1ef20e491a1fcf43b558' }] }],
          signers: { primary: { kind: 'keyless', url, keyId: 'k1' } },
        },
      }),
    ).toThrow('signers.primary.address')
  })
})
