import { createHash, createHmac, randomBytes } from 'node:crypto'
import { describe, expect, it } from 'vitest'
import { nodeHashing } from '../../enclave-origin/protocol/nodeHashing.js'
import { nobleHashing, RequestVerifier, signRequest, signatureHeaders } from '../../enclave-origin/protocol/requestSigning.js'

const body = new TextEncoder().encode('{"digest":"0x01"}')

/** No window ahead unless asked: these tests sign at the verifier's own clock. */
function verifierAt(clock: { now: number }, maxFutureSkewMs = 0) {
  return new RequestVerifier({ secrets: { worker: 'shared-secret-for-tests' }, maxSkewMs: 30_000, maxFutureSkewMs, now: () => clock.now })
}

async function signed(overrides: Partial<Parameters<typeof signRequest>[0]> = {}) {
  return signRequest({ keyId: 'worker', secret: 'shared-secret-for-tests', method: 'POST', path: '/v1/keys/k/sign', body, now: 1_000_000, ...overrides })
}

const check = (verifier: RequestVerifier, headers: Record<string, string>, change: { method?: string; path?: string; body?: Uint8Array } = {}) =>
  verifier.verify({ method: change.method ?? 'POST', path: change.path ?? '/v1/keys/k/sign', headers: (name) => headers[name], body: change.body ?? body })

describe('HMAC request signing between the Worker and the parent', () => {
  it('accepts a fresh, correctly signed request once, and rejects its replay', async () => {
    const clock = { now: 999_000 }
    const verifier = verifierAt(clock)
    clock.now = 1_000_500
    const headers = await signed()
    expect(await check(verifier, headers)).toBeUndefined()
    expect(await check(verifier, headers)).toBe('replayed')
  })

  it('refuses a request timestamped before the verifier was made: a parent restarted meanwhile cannot know it was not seen', async () => {
    const clock = { now: 1_000_000 }
    const before = verifierAt(clock)
    const unfreeze = await signed({ path: '/v1/keys/k/unfreeze' })
    expect(await check(before, unfreeze, { path: '/v1/keys/k/unfreeze' })).toBeUndefined()
    clock.now = 1_005_000
    const after = verifierAt(clock)
    // Well inside the skew window, and a nonce the new process never saw: only its timestamp gives it away.
    expect(await check(after, unfreeze, { path: '/v1/keys/k/unfreeze' })).toBe('before-start')
    expect(await check(after, await signed({ now: 1_004_999 }))).toBe('before-start')
    // Only a request its client really signed counts as one from before the start: a forgery is just that.
    expect(await check(after, await signed({ now: 1_004_999, secret: 'wrong' }))).toBe('bad-signature')
    expect(await check(after, await signed({ now: 1_005_000 }))).toBeUndefined()
  })

  it('accepts a timestamp up to 5 s ahead (by default), and after a restart refuses one the process before may have accepted so, until 5 s past the start', async () => {
    const clock = { now: 1_000_000 }
    const before = new RequestVerifier({ secrets: { worker: 'shared-secret-for-tests' }, now: () => clock.now })
    clock.now = before.acceptsFrom
    expect(before.acceptsFrom).toBe(1_005_000)
    const ahead = await signed({ now: clock.now + 5_000, path: '/v1/keys/k/unfreeze' })
    expect(await check(before, await signed({ now: clock.now + 5_001 }))).toBe('stale')
    expect(await check(before, ahead, { path: '/v1/keys/k/unfreeze' })).toBeUndefined()
    // The process restarts at once: the new one has never seen that nonce, and the timestamp is still ahead of its clock.
    clock.now += 1
    const after = new RequestVerifier({ secrets: { worker: 'shared-secret-for-tests' }, now: () => clock.now })
    expect(await check(after, ahead, { path: '/v1/keys/k/unfreeze' })).toBe('before-start')
    clock.now = after.acceptsFrom
    expect(await check(after, ahead, { path: '/v1/keys/k/unfreeze' })).toBe('before-start')
    expect(await check(after, await signed({ now: clock.now }))).toBeUndefined()
  })

  it('says how long to wait before serving on the monotonic clock, whatever the wall clock does meanwhile', () => {
    const wall = { now: 1_000_000 }
    const monotonic = { now: 50 }
    const verifier = new RequestVerifier({ secrets: { worker: 'shared-secret-for-tests' }, now: () => wall.now, monotonicNow: () => monotonic.now })
    expect(verifier.msUntilServing()).toBe(5_000)
    monotonic.now += 2_000
    // An NTP step back by an hour, and then one forward by a day: neither moves the wait.
    wall.now -= 3_600_000
    expect(verifier.msUntilServing()).toBe(3_000)
    wall.now += 86_400_000
    expect(verifier.msUntilServing()).toBe(3_000)
    monotonic.now += 3_000
    expect(verifier.msUntilServing()).toBe(0)
    monotonic.now += 1
    expect(verifier.msUntilServing()).toBe(0)
  })

  it('refuses a window ahead longer than the one behind, which its nonce memory would not cover', () => {
    expect(() => new RequestVerifier({ secrets: {}, maxSkewMs: 1_000, maxFutureSkewMs: 1_001 })).toThrow('maxFutureSkewMs may not exceed maxSkewMs')
  })

  it('refuses a replay after the clock is stepped back, though its nonce has been forgotten', async () => {
    const clock = { now: 1_000_000 }
    const verifier = verifierAt(clock)
    const unfreeze = await signed({ path: '/v1/keys/k/unfreeze' })
    expect(await check(verifier, unfreeze, { path: '/v1/keys/k/unfreeze' })).toBeUndefined()
    // 100 s of traffic: the nonce memory turns over and forgets the unfreeze's nonce.
    for (; clock.now < 1_100_000; clock.now += 5_000) expect(await check(verifier, await signed({ now: clock.now }))).toBeUndefined()
    // An NTP step puts the clock back to 10 s after the unfreeze: its timestamp looks fresh again.
    clock.now = 1_010_000
    expect(await check(verifier, unfreeze, { path: '/v1/keys/k/unfreeze' })).toBe('stale')
    // Requests timestamped by a client whose clock agrees with the stepped one are refused too, until the clock
    // catches up with where it had been: the same as a request from a client whose clock is off by the step.
    expect(await check(verifier, await signed({ now: clock.now }))).toBe('stale')
    clock.now = 1_100_000
    expect(await check(verifier, await signed({ now: clock.now }))).toBeUndefined()
  })

  it('rejects stale timestamps, unknown keys, missing headers, and any change to method (its case too), path, body or signature', async () => {
    const verifier = verifierAt({ now: 1_000_000 + 31_000 })
    expect(await check(verifier, await signed())).toBe('stale')
    const fresh = verifierAt({ now: 1_000_000 })
    expect(await check(fresh, await signed({ keyId: 'someone' }))).toBe('unknown-key')
    const headers = await signed()
    expect(await check(fresh, { ...headers, [signatureHeaders.signature]: '' })).toBe('missing')
    expect(await check(fresh, headers, { path: '/v1/keys/other/sign' })).toBe('bad-signature')
    // Methods are case-sensitive: `post` is not the POST that was signed.
    expect(await check(fresh, headers, { method: 'post' })).toBe('bad-signature')
    expect(await check(fresh, headers, { method: 'PUT' })).toBe('bad-signature')
    expect(await check(fresh, headers, { body: new TextEncoder().encode('{"digest":"0x02"}') })).toBe('bad-signature')
    expect(await check(fresh, await signed({ secret: 'wrong' }))).toBe('bad-signature')
  })

  it('remembers a nonce for as long as its request stays acceptable: first seen at timestamp \u2212 skew, replayed at timestamp + skew', async () => {
    // The longest window ahead there may be, the skew itself; made a skew before, so that it accepts from the first request on.
    const clock = { now: 1_000_000 - 60_000 }
    const verifier = verifierAt(clock, 30_000)
    clock.now = 1_000_000 - 30_000
    const headers = await signed()
    expect(await check(verifier, headers)).toBeUndefined()
    // Other clients' requests along the way, so the nonce store turns over as it does in service.
    for (let step = 0; clock.now < 1_000_000 + 30_000; step++) {
      clock.now = Math.min(clock.now + 1_000, 1_000_000 + 30_000)
      expect(await check(verifier, await signed({ now: clock.now }))).toBeUndefined()
    }
    expect(await check(verifier, headers)).toBe('replayed')
    clock.now += 1
    expect(await check(verifier, headers)).toBe('stale')
  })

  it('signs the key id: a request signed for one client is refused under another client id with the same secret', async () => {
    const verifier = new RequestVerifier({ secrets: { worker: 'shared-secret-for-tests', operator: 'shared-secret-for-tests' }, maxFutureSkewMs: 0, now: () => 1_000_000 })
    const headers = await signed()
    expect(await check(verifier, { ...headers, [signatureHeaders.keyId]: 'operator' })).toBe('bad-signature')
    expect(await check(verifier, headers)).toBeUndefined()
  })

  it('signs the same bytes with Node\u2019s native hashing as with the portable one, in both directions', async () => {
    for (const [signer, verifier] of [
      [nodeHashing, nobleHashing],
      [nobleHashing, nodeHashing],
    ]) {
      const headers = await signed({ hashing: signer })
      const verifying = new RequestVerifier({ secrets: { worker: 'shared-secret-for-tests' }, maxFutureSkewMs: 0, now: () => 1_000_000, hashing: verifier })
      expect(await check(verifying, headers)).toBeUndefined()
      expect(await check(verifying, await signed({ hashing: signer }), { body: new TextEncoder().encode('{}') })).toBe('bad-signature')
    }
  })

  it('Node\u2019s one-shot HMAC-SHA256 matches node:crypto\u2019s createHmac for keys shorter than, equal to and longer than the block', () => {
    // Longest message last but one: the shared buffer grows, then must still be right for a shorter one.
    for (const keyBytes of [0, 1, 26, 63, 64, 65, 200]) {
      for (const message of ['', 'a', 'x'.repeat(55), 'ü'.repeat(32), randomBytes(150).toString('hex'), 'y'.repeat(5_000), 'short']) {
        const key = randomBytes(keyBytes)
        expect(nodeHashing.hmacSha256Hex(key, message), `key ${keyBytes} B, message ${message.length} chars`).toBe(createHmac('sha256', key).update(message, 'utf8').digest('hex'))
        const data = new TextEncoder().encode(message)
        expect(nodeHashing.sha256Hex(data)).toBe(createHash('sha256').update(data).digest('hex'))
      }
    }
  })
})
