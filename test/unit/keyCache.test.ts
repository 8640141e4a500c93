import { randomBytes } from 'node:crypto'
import { describe, expect, it, vi } from 'vitest'
import { KeyCache, steadyWallClock, type AcquireResult, type DataKeys, type KeyCacheAuditEvent, type KeyCacheOptions } from '../../enclave-origin/enclave/keyCache.js'
import { LogRing } from '../../enclave-origin/enclave/logRing.js'
import { secp256k1 } from '../../enclave-origin/enclave/nativeSecp256k1.js'
import { SealingError, sealPrivateKey, unsealPrivateKey } from '../../enclave-origin/enclave/sealing.js'
import type { KeyState, SealedKeyRecord } from '../../enclave-origin/types.js'
import { auditsInto, fillMustDeliverRoom } from '../support/logRingRoom.js'

const minute = 60_000
/** The first sequence of a cache's first epoch, which `harness` opens as the first UNLOCK would. */
const firstFloor = 2 ** 32
/** The parent's sequence for each LOAD and SET_STATE: rising in that epoch, as the parent's does. */
let lastSequence = firstFloor
const nextSequence = () => ++lastSequence
const zeros = new Uint8Array(32)

/** Both parts of the pre-warmer at once, as its two timers would eventually run them. */
function prewarm(cache: KeyCache): void {
  cache.renewDataKeyIfDue()
  cache.sweepKeys()
}

function randomSecret(): Uint8Array {
  return new Uint8Array(randomBytes(32))
}

/** `unlock` as KMS would answer it, held at a gate the test opens, and able to fail on demand. */
function controlledUnlock(dek: Uint8Array) {
  let calls = 0
  let failures = 0
  let openGate: () => void = () => {}
  let gate = new Promise<void>((resolve) => (openGate = resolve))
  return {
    unlock: async (): Promise<DataKeys> => {
      calls += 1
      await gate
      if (failures > 0) {
        failures -= 1
        throw new Error('KMS Decrypt failed')
      }
      return { dek: new Uint8Array(dek) } // a copy: the cache owns (and zeroes) what it is given
    },
    calls: () => calls,
    open: () => openGate(),
    close: () => {
      gate = new Promise<void>((resolve) => (openGate = resolve))
    },
    failNext: (count: number) => {
      failures = count
    },
  }
}

/** A cache on a hand-moved clock, its DEK, its unlock, what it audited, and keys sealed under that DEK. */
function harness(options: Partial<KeyCacheOptions> & { unlockGate?: 'open' | 'closed' } = {}) {
  const { unlockGate = 'open', ...cacheOptions } = options
  let time = 1_700_000_000_000
  const dek = randomSecret()
  const unlock = controlledUnlock(dek)
  if (unlockGate === 'open') unlock.open()
  const audits: KeyCacheAuditEvent[] = []
  const cache = new KeyCache({
    now: () => time,
    random: () => 0.5,
    unlock: unlock.unlock,
    audit: (event) => audits.push(event),
    ...cacheOptions,
  })
  expect(cache.openSequenceEpoch()).toBe(firstFloor)
  return {
    cache,
    unlock,
    audits,
    advance: (ms: number) => {
      time += ms
    },
    /** A copy of the DEK, as an explicit UNLOCK would install it. */
    dekCopy: () => new Uint8Array(dek),
    /** A fresh key sealed under the DEK; `privateKey` is what the cache should hand back. */
    key: ({ keyId = 'key-1', version = 1, state = 'active' as KeyState, sealingDek = dek } = {}) => {
      const privateKey = randomSecret()
      const record: SealedKeyRecord = {
        keyId,
        version,
        state,
        publicKey: secp256k1.publicKeyCreate(privateKey, false),
        sealed: sealPrivateKey({ privateKey, dek: sealingDek, keyId, version }),
      }
      return { record, privateKey }
    },
  }
}

/** Lets queued background work (setImmediate turns and microtasks) run. */
async function settle(): Promise<void> {
  for (let turn = 0; turn < 3; turn++) await new Promise((resolve) => setImmediate(resolve))
}

function signingKey(result: AcquireResult): Uint8Array {
  if (result.kind !== 'ok') throw new Error(`expected a key, got ${JSON.stringify(result)}`)
  return result.privateKey
}

/**
 * Adds a WARM key and returns the cache's own buffer for it (from one
 * acquire, made now), after checking that the buffer handed over was wiped.
 */
function addWarmHeld(cache: KeyCache, record: SealedKeyRecord, privateKey = randomSecret()): Uint8Array {
  const handed = new Uint8Array(privateKey)
  cache.addWarm({ record, privateKey: handed })
  expect(handed).toEqual(zeros)
  const held = signingKey(cache.acquire(record.keyId))
  expect(held).toEqual(privateKey)
  return held
}

function withKeyCopied(result: AcquireResult): AcquireResult {
  return result.kind === 'ok' ? { ...result, privateKey: new Uint8Array(result.privateKey) } : result
}

describe('KeyCache transitions', () => {
  it('re-derives a COOL key from its sealed record on first use, which makes it WARM', () => {
    const { cache, key, dekCopy } = harness()
    const { record, privateKey } = key()
    cache.setDek(dekCopy())
    cache.load(record, nextSequence())
    expect(cache.get('key-1')?.cacheState).toBe('COOL')

    const result = cache.acquire('key-1')

    expect(result).toEqual({ kind: 'ok', privateKey, grace: false })
    expect(cache.get('key-1')?.cacheState).toBe('WARM')
    expect(cache.stats()).toMatchObject({ refreshes: 1, inlineRefreshMs: { count: 1 } })
  })

  it('signs a WARM key at once and refreshes it in the background once past its soft TTL, resetting the TTLs', async () => {
    const { cache, key, dekCopy, advance } = harness()
    const { record, privateKey } = key()
    cache.setDek(dekCopy())
    const held = addWarmHeld(cache, record, privateKey)

    advance(15 * minute - 1)
    expect(signingKey(cache.acquire('key-1'))).toBe(held)
    await cache.idle()
    expect(cache.stats().refreshes).toBe(0)

    advance(1)
    expect(signingKey(cache.acquire('key-1'))).toBe(held)
    expect(cache.stats().refreshes).toBe(0) // not on the request path
    await cache.idle()
    expect(cache.stats().refreshes).toBe(1)
    expect(held).toEqual(privateKey) // re-derived into the same place
    expect(cache.get('key-1')?.cacheState).toBe('WARM')

    advance(15 * minute - 1)
    expect(signingKey(cache.acquire('key-1'))).toEqual(privateKey)
    await cache.idle()
    expect(cache.stats().refreshes).toBe(1) // the refresh restarted the soft TTL
  })

  it('refreshes inline once a key is past its hard TTL, on the request that finds it so', () => {
    const { cache, key, dekCopy, advance } = harness()
    const { record, privateKey } = key()
    cache.setDek(dekCopy())
    addWarmHeld(cache, record, privateKey)

    advance(16 * minute)
    expect(cache.get('key-1')?.cacheState).toBe('COOL')
    const refreshed = signingKey(cache.acquire('key-1'))

    expect(refreshed).toEqual(privateKey)
    expect(cache.stats()).toMatchObject({ refreshes: 1, inlineRefreshMs: { count: 1 } })
    expect(cache.get('key-1')?.cacheState).toBe('WARM')
  })

  it('counts an inline refresh that takes longer than its budget, and times each one', () => {
    let tick = 0
    const slow = harness({ monotonicNow: () => (tick += 5) })
    slow.cache.setDek(slow.dekCopy())
    slow.cache.load(slow.key().record, nextSequence())
    slow.cache.acquire('key-1')
    expect(slow.cache.stats()).toMatchObject({ inlineRefreshOverBudget: 1, inlineRefreshMs: { count: 1, sum: 5, max: 5 } })

    const fast = harness({ monotonicNow: () => (tick += 1) })
    fast.cache.setDek(fast.dekCopy())
    fast.cache.load(fast.key().record, nextSequence())
    fast.cache.acquire('key-1')
    expect(fast.cache.stats()).toMatchObject({ inlineRefreshOverBudget: 0, inlineRefreshMs: { count: 1, sum: 1 } })
  })

  it('refreshes inline when the use budget is spent', async () => {
    const { cache, key, dekCopy } = harness({ keyUseBudget: 3, keyLowWaterMark: 0 })
    const { record, privateKey } = key()
    cache.setDek(dekCopy())
    const held = addWarmHeld(cache, record, privateKey)

    for (let use = 1; use < 3; use++) expect(signingKey(cache.acquire('key-1'))).toBe(held)
    await cache.idle()
    expect(cache.stats().refreshes).toBe(0)
    expect(cache.get('key-1')?.cacheState).toBe('COOL')

    expect(signingKey(cache.acquire('key-1'))).toEqual(privateKey)
    expect(cache.stats().refreshes).toBe(1)
  })

  it('refreshes in the background once the uses left fall below the low-water mark, restoring the budget', async () => {
    const { cache, key, dekCopy } = harness({ keyUseBudget: 10, keyLowWaterMark: 3 })
    const { record, privateKey } = key()
    cache.setDek(dekCopy())
    cache.addWarm({ record, privateKey: new Uint8Array(privateKey) })

    for (let use = 0; use < 7; use++) cache.acquire('key-1') // 3 left: at the mark, not below it
    await cache.idle()
    expect(cache.stats().refreshes).toBe(0)

    cache.acquire('key-1')
    await cache.idle()
    expect(cache.stats().refreshes).toBe(1)

    for (let use = 0; use < 7; use++) expect(signingKey(cache.acquire('key-1'))).toEqual(privateKey)
    await cache.idle()
    expect(cache.stats().refreshes).toBe(1)
  })

  it('drops a background refresh whose key was re-derived inline meanwhile, rather than unseal it twice', async () => {
    const { cache, key, dekCopy } = harness({ keyUseBudget: 10, keyLowWaterMark: 3 })
    const { record, privateKey } = key()
    cache.setDek(dekCopy())
    cache.addWarm({ record, privateKey: new Uint8Array(privateKey) })

    // In one turn: the eighth use leaves 2 (below the mark) and asks for a refresh; the tenth spends the budget, and
    // the eleventh re-derives inline, leaving 9.
    for (let use = 0; use < 11; use++) expect(signingKey(cache.acquire('key-1'))).toEqual(privateKey)
    expect(cache.stats().refreshes).toBe(1)
    await cache.idle()
    expect(cache.stats().refreshes).toBe(1)
  })

  it('starts no unlock for a key frozen before its background refresh ran, the DEK lapsed meanwhile', async () => {
    const { cache, key, dekCopy, unlock, advance } = harness()
    const { record, privateKey } = key()
    cache.setDek(dekCopy())
    cache.addWarm({ record, privateKey: new Uint8Array(privateKey) })
    advance(15 * 60_000) // the key's soft TTL: this use asks for a refresh
    expect(signingKey(cache.acquire('key-1'))).toEqual(privateKey)
    cache.setState({ keyId: 'key-1', state: 'frozen', sequence: nextSequence() })
    advance(45 * 60_000) // the DEK's hard TTL
    await cache.idle()
    expect(unlock.calls()).toBe(0)
    expect(cache.stats()).toMatchObject({ refreshes: 0, refreshFailures: 0 })
  })

  it('by default, gives a key 1,000,000 uses and refreshes it in the background once fewer than 50,000 are left', async () => {
    const { cache, key, dekCopy } = harness()
    const { record, privateKey } = key()
    cache.setDek(dekCopy())
    cache.addWarm({ record, privateKey: new Uint8Array(privateKey) })

    for (let use = 0; use < 950_000; use++) cache.acquire('key-1') // 50,000 left: at the mark, not below it
    await cache.idle()
    expect(cache.stats().refreshes).toBe(0)

    cache.acquire('key-1')
    await cache.idle()
    expect(cache.stats().refreshes).toBe(1)
  })

  it('re-derives the keys that waited on an unlock when the parent\u2019s UNLOCK installs the DEK while its own unlocks back off, and counts that unlock', async () => {
    const { cache, key, dekCopy, advance, unlock } = harness()
    const { record, privateKey } = key()
    cache.setDek(dekCopy())
    cache.load(record, nextSequence())
    advance(60 * minute)
    unlock.failNext(1)
    expect(cache.acquire('key-1').kind).toBe('needs-unlock')
    await cache.idle()
    expect(cache.stats()).toMatchObject({ unlocks: 1, unlockFailures: 1, keys: { INVALID: 1 } })
    // Its own unlocks are held back now; the parent's UNLOCK is not.
    cache.setDek(dekCopy())
    await cache.idle()
    expect(unlock.calls()).toBe(1)
    expect(cache.stats()).toMatchObject({ unlocks: 2, keys: { WARM: 1, COOL: 0, INVALID: 0 } })
    expect(cache.acquire('key-1')).toEqual({ kind: 'ok', privateKey, grace: false })
    expect(cache.stats().refreshes).toBe(1)
    // Warmed then, not again at the next DEK: the set of keys waiting was emptied.
    advance(17 * minute)
    cache.setDek(dekCopy())
    await cache.idle()
    expect(cache.stats()).toMatchObject({ refreshes: 1, keys: { WARM: 0, COOL: 1 } })
  })

  it('counts frozen and archived keys apart from the cache states, which are an active key\u2019s', () => {
    const { cache, key, dekCopy, advance } = harness()
    cache.setDek(dekCopy())
    for (const [keyId, state] of [['a', 'active'], ['f', 'frozen'], ['r', 'archived']] as const) cache.load(key({ keyId, state }).record, nextSequence())
    expect(cache.stats()).toMatchObject({ keys: { WARM: 0, COOL: 1, INVALID: 0 }, keysNotActive: 2 })
    advance(60 * minute)
    expect(cache.stats()).toMatchObject({ keys: { WARM: 0, COOL: 0, INVALID: 1 }, keysNotActive: 2 })
  })

  it('counts as NEEDS_UNLOCK only what is answered so: a state change for a key it does not hold, numbered outside the epoch, is NOT_FOUND', () => {
    const { cache, key, dekCopy } = harness()
    cache.setDek(dekCopy())
    cache.load(key().record, nextSequence())
    const outside = firstFloor - 1
    expect(cache.setState({ keyId: 'absent', state: 'frozen', sequence: outside })).toEqual({ kind: 'not-found' })
    expect(cache.stats().needsUnlock).toBe(0)
    expect(cache.setState({ keyId: 'key-1', state: 'frozen', sequence: outside }).kind).toBe('needs-unlock')
    expect(cache.stats().needsUnlock).toBe(1)
    // Within the epoch, the absent key's sequence is still taken: a LOAD numbered before it is stale.
    const taken = nextSequence()
    expect(cache.setState({ keyId: 'absent', state: 'frozen', sequence: taken })).toEqual({ kind: 'not-found' })
    expect(cache.load(key({ keyId: 'absent' }).record, taken - 1)).toMatchObject({ kind: 'stale' })
  })

  it('answers needs-unlock once both the key and the DEK have lapsed, unlocks in the background, and the retry finds the key WARM', async () => {
    const { cache, key, dekCopy, advance, unlock } = harness({ unlockGate: 'closed' })
    const { record, privateKey } = key()
    cache.setDek(dekCopy())
    cache.load(record, nextSequence())
    cache.acquire('key-1')

    advance(60 * minute)
    expect(cache.get('key-1')?.cacheState).toBe('INVALID')
    const answer = cache.acquire('key-1')

    expect(answer.kind).toBe('needs-unlock')
    const { retryAfterMs } = answer as Extract<AcquireResult, { kind: 'needs-unlock' }>
    expect(retryAfterMs).toBeGreaterThanOrEqual(50)
    expect(retryAfterMs).toBeLessThanOrEqual(200)
    expect(cache.stats()).toMatchObject({ needsUnlock: 1, keys: { INVALID: 1 } })

    unlock.open()
    await cache.idle()
    expect(unlock.calls()).toBe(1)
    expect(cache.stats()).toMatchObject({ unlocks: 2, keys: { WARM: 1, COOL: 0, INVALID: 0 } })
    expect(cache.acquire('key-1')).toEqual({ kind: 'ok', privateKey, grace: false })
  })

  it('warms the keys that waited on an unlock 256 per event-loop turn, not all in one', async () => {
    const { cache, key, dekCopy, advance, unlock } = harness({ unlockGate: 'closed' })
    const keys = Array.from({ length: 600 }, (_, i) => key({ keyId: `k${i}` }))
    cache.setDek(dekCopy())
    for (const { record } of keys) cache.load(record, nextSequence())
    advance(60 * minute)
    for (const { record } of keys) expect(cache.acquire(record.keyId).kind).toBe('needs-unlock')

    // The unlock's answer lands in microtasks of this turn, which warm the first slice; the next slice waits for
    // a later turn than the one queued here, first.
    const nextTurnQueuedFirst = new Promise<void>((resolve) => setImmediate(resolve))
    unlock.open()
    await nextTurnQueuedFirst
    expect(cache.stats().keys.WARM).toBe(256)
    await cache.idle()
    expect(cache.stats().keys).toMatchObject({ WARM: 600, COOL: 0 })
    for (const { record, privateKey } of keys.slice(-3)) expect(withKeyCopied(cache.acquire(record.keyId))).toEqual({ kind: 'ok', privateKey, grace: false })
  })

  it('re-derives the WARM keys whose background refreshes waited on an unlock 256 per event-loop turn too', async () => {
    const { cache, key, dekCopy, advance, unlock } = harness({ unlockGate: 'closed' })
    cache.setDek(dekCopy())
    advance(45 * minute)
    const keys = Array.from({ length: 600 }, (_, i) => key({ keyId: `k${i}` }))
    for (const { record, privateKey } of keys) addWarmHeld(cache, record, privateKey)
    // Past the keys' soft TTL, short of their hard one; past the DEK's hard TTL: each use asks for a refresh, which waits on the one unlock.
    advance(15 * minute + 30_000)
    for (const { record } of keys) expect(cache.acquire(record.keyId).kind).toBe('ok')
    await settle()
    expect(unlock.calls()).toBe(1)
    const nextTurnQueuedFirst = new Promise<void>((resolve) => setImmediate(resolve))
    unlock.open()
    await nextTurnQueuedFirst
    expect(cache.stats().refreshes).toBe(256)
    await cache.idle()
    expect(cache.stats()).toMatchObject({ refreshes: 600, refreshFailures: 0 })
    // Each one's TTLs start again from the refresh: no use now asks for another.
    for (const { record } of keys) expect(cache.acquire(record.keyId).kind).toBe('ok')
    await cache.idle()
    expect(cache.stats().refreshes).toBe(600)
  })

  it('jitters retry-after uniformly across 50–200 ms', () => {
    const draws = [0, 0.5, 0.999_999]
    const { cache, key } = harness({ unlockGate: 'closed', random: () => draws.shift() ?? 0 })
    cache.load(key().record, nextSequence())

    const retries = [0, 1, 2].map(() => (cache.acquire('key-1') as { retryAfterMs: number }).retryAfterMs)

    expect(retries).toEqual([50, 125, 200])
  })

  it('renews the DEK in the background when a refresh finds it past its soft TTL', async () => {
    const { cache, key, dekCopy, advance, unlock } = harness()
    cache.setDek(dekCopy())
    advance(41 * minute)
    cache.addWarm({ record: key().record, privateKey: randomSecret() }) // its soft TTL lands after the DEK's

    advance(15 * minute) // key past soft TTL; DEK past its soft (55 min), before its hard (60 min) TTL
    cache.acquire('key-1')
    await cache.idle()

    expect(unlock.calls()).toBe(1)
    expect(cache.stats()).toMatchObject({ refreshes: 1, unlocks: 2 })
    advance(17 * minute) // past the first DEK's hard TTL and the key's: only a renewed DEK leaves it COOL
    expect(cache.get('key-1')?.cacheState).toBe('COOL')
  })

  it('starts a DEK renewal from an inline refresh too, when the DEK is past its soft TTL', async () => {
    const { cache, key, dekCopy, advance, unlock } = harness()
    cache.setDek(dekCopy())
    advance(56 * minute)
    cache.load(key().record, nextSequence())

    cache.acquire('key-1')
    await cache.idle()

    expect(unlock.calls()).toBe(1)
    expect(cache.stats().unlocks).toBe(2)
  })

  it('counts a failed unlock, starts none for the requests within its backoff, and lets the first after it start another', async () => {
    const { cache, key, unlock, advance } = harness()
    unlock.failNext(1)
    cache.load(key().record, nextSequence())

    expect(cache.acquire('key-1').kind).toBe('needs-unlock')
    await cache.idle()
    expect(cache.stats()).toMatchObject({ unlocks: 0, unlockFailures: 1 })
    expect(cache.get('key-1')?.cacheState).toBe('INVALID')

    // 0.5 s after one failure (random 0.5: no jitter either way).
    for (let i = 0; i < 10; i++) {
      advance(49)
      expect(cache.acquire('key-1').kind).toBe('needs-unlock')
      cache.renewDataKeyIfDue()
      await cache.idle()
    }
    expect(unlock.calls()).toBe(1)

    advance(10)
    expect(cache.acquire('key-1').kind).toBe('needs-unlock')
    await cache.idle()
    expect(unlock.calls()).toBe(2)
    expect(cache.stats()).toMatchObject({ unlocks: 1, unlockFailures: 1 })
    expect(cache.get('key-1')?.cacheState).toBe('WARM')
  })

  it('backs off after an unlock whose DEK will not install too (the wrong length), not only after one that throws', async () => {
    let calls = 0
    const { cache, key, advance } = harness({
      unlock: async () => {
        calls += 1
        return { dek: new Uint8Array(16) }
      },
    })
    cache.load(key().record, nextSequence())
    cache.acquire('key-1')
    await cache.idle()
    expect(cache.stats().unlockFailures).toBe(1)
    advance(400)
    cache.acquire('key-1')
    await cache.idle()
    expect(calls).toBe(1)
    advance(100)
    cache.acquire('key-1')
    await cache.idle()
    expect(calls).toBe(2)
  })

  it('doubles the unlock backoff with each failure in a row, to 30 s, and an installed DEK clears it', async () => {
    const { cache, key, unlock, advance, dekCopy } = harness()
    cache.load(key().record, nextSequence())
    unlock.failNext(20)
    const waits: number[] = []
    for (let failures = 0; failures < 8; failures++) {
      const calls = unlock.calls()
      let waited = 0
      while (unlock.calls() === calls) {
        cache.acquire('key-1')
        await cache.idle()
        if (unlock.calls() === calls) advance(100), (waited += 100)
      }
      waits.push(waited)
    }
    expect(waits).toEqual([0, 500, 1_000, 2_000, 4_000, 8_000, 16_000, 30_000])

    // An UNLOCK from the parent installs a DEK: the failures before it no longer count. When it lapses and
    // the next unlock fails too, the one after waits 0.5 s again, not 30 s.
    cache.setDek(dekCopy())
    advance(61 * minute)
    const calls = unlock.calls()
    for (const wait of [0, 500]) {
      advance(wait)
      expect(cache.acquire('key-1').kind).toBe('needs-unlock')
      await cache.idle()
    }
    expect(unlock.calls()).toBe(calls + 2)
  })

  it('throws SealingError, counted and audited, when a record will not open under the DEK', () => {
    const { cache, key, dekCopy, audits } = harness()
    cache.setDek(dekCopy())
    cache.load(key({ sealingDek: randomSecret() }).record, nextSequence())

    expect(() => cache.acquire('key-1')).toThrow(SealingError)
    expect(cache.stats().refreshFailures).toBe(1)
    expect(audits).toEqual([expect.objectContaining({ type: 'refresh-failed', keyId: 'key-1', version: 1 })])
  })

  it("never signs with a record whose public key is another key's, nor reseals it", () => {
    const { cache, key, dekCopy, audits } = harness()
    cache.setDek(dekCopy())
    // The sealed key opens under the DEK; the public key beside it, which GET reports, belongs to another key.
    cache.load({ ...key().record, publicKey: key({ keyId: 'other' }).record.publicKey }, nextSequence())

    expect(() => cache.acquire('key-1')).toThrow(/^sealed key key-1 v1 is not the key of its record's public key/)
    expect(() => cache.reseal('key-1')).toThrow(SealingError)
    expect(cache.stats().refreshFailures).toBe(1)
    expect(audits).toEqual([expect.objectContaining({ type: 'refresh-failed', keyId: 'key-1', version: 1 })])
  })
})

describe('KeyCache single-flight', () => {
  it('a WARM key past its soft TTL, its DEK gone and unlocks failing, starts no refresh per signature while the unlock backs off', async () => {
    const { cache, key, dekCopy, unlock, advance } = harness()
    cache.setDek(dekCopy())
    advance(45 * minute)
    const { record, privateKey } = key()
    addWarmHeld(cache, record, privateKey)
    // Past the key's soft TTL (15 min), short of its hard one (16 min); past the DEK's hard TTL (60 min).
    advance(15 * minute + 30_000)
    unlock.failNext(100)
    for (let signature = 0; signature < 20; signature++) {
      expect(signingKey(cache.acquire('key-1'))).toEqual(privateKey)
      await settle()
    }
    // The first refresh waited for the one unlock, which failed: one failure. The backoff holds from there.
    expect(unlock.calls()).toBe(1)
    expect(cache.stats().refreshFailures).toBe(1)
  })

  it('makes exactly one unlock() call for 1,000 concurrent acquires of a cold key with no DEK', async () => {
    const { cache, key, unlock } = harness({ unlockGate: 'closed' })
    const { record, privateKey } = key()
    cache.load(record, nextSequence())

    const answers = await Promise.all(Array.from({ length: 1000 }, async () => cache.acquire('key-1')))
    await settle()

    expect(answers.every((answer) => answer.kind === 'needs-unlock')).toBe(true)
    expect(unlock.calls()).toBe(1)
    unlock.open()
    await cache.idle()
    expect(unlock.calls()).toBe(1)
    expect(cache.stats()).toMatchObject({ needsUnlock: 1000, unlocks: 1, refreshes: 1 })
    expect(cache.acquire('key-1')).toEqual({ kind: 'ok', privateKey, grace: false })
  })

  it('runs one background refresh of a key at a time, however many acquires ask for it', async () => {
    // The DEK has lapsed, so the refresh waits on an unlock the test holds back: it stays in flight.
    const { cache, key, dekCopy, advance, unlock } = harness({ unlockGate: 'closed' })
    cache.setDek(dekCopy())
    advance(50 * minute)
    cache.addWarm({ record: key().record, privateKey: randomSecret() })
    advance(15.5 * minute) // key past soft TTL, before hard; DEK past hard

    for (let use = 0; use < 100; use++) expect(cache.acquire('key-1')).toMatchObject({ kind: 'ok', grace: false })
    await settle()
    for (let use = 0; use < 100; use++) cache.acquire('key-1')
    expect(unlock.calls()).toBe(1)

    unlock.open()
    await cache.idle()
    expect(cache.stats()).toMatchObject({ refreshes: 1, unlocks: 2 })
  })
})

describe('KeyCache grace signatures', () => {
  /**
   * key-1 used within the last soft TTL (hot), then its hard TTL and the DEK's both passed: grace signatures are all
   * that can sign with it. `held` is the cache's buffer of its plaintext.
   */
  function lapsedWithTheDek(options: Partial<KeyCacheOptions>) {
    const built = harness({ dekSoftTtlMs: 16 * minute, dekHardTtlMs: 16 * minute, unlockGate: 'closed', ...options })
    const { record, privateKey } = built.key()
    built.cache.setDek(built.dekCopy())
    const held = addWarmHeld(built.cache, record, privateKey)
    built.advance(14 * minute)
    built.cache.acquire('key-1')
    built.advance(3 * minute)
    return { ...built, privateKey, held }
  }

  it('gives exactly the configured number of grace signatures while INVALID, each audited, then needs-unlock', async () => {
    const { cache, audits, unlock, privateKey, held } = lapsedWithTheDek({ graceSignatures: 3 })

    // Copied as they come: the last acquire wipes the lapsed buffer they share.
    const graced = [0, 1, 2].map(() => withKeyCopied(cache.acquire('key-1')))
    const after = cache.acquire('key-1')
    for (const _ of graced) cache.settleGrace('key-1', true)

    expect(graced).toEqual(Array(3).fill({ kind: 'ok', privateKey, grace: true }))
    expect(after.kind).toBe('needs-unlock')
    expect(audits.map(({ type, keyId }) => ({ type, keyId }))).toEqual(Array(3).fill({ type: 'grace-signature', keyId: 'key-1' }))
    expect(audits.map((event) => (event as { graceLeft: number }).graceLeft)).toEqual([2, 1, 0])
    expect(cache.stats()).toMatchObject({ graceSignatures: 3, needsUnlock: 1 })
    expect(held).toEqual(zeros) // lapsed plaintext goes once no grace is left for it
    await settle()
    expect(unlock.calls()).toBe(1)

    unlock.open()
    await cache.idle()
    expect(cache.acquire('key-1')).toEqual({ kind: 'ok', privateKey, grace: false })
  })

  it('gives back the place of a grace signature not given after all, audited, and counts only those given', () => {
    const { cache, dekCopy, audits } = lapsedWithTheDek({ graceSignatures: 2 })
    expect(cache.acquire('key-1')).toMatchObject({ kind: 'ok', grace: true })
    cache.settleGrace('key-1', false)
    expect(audits.at(-1)).toMatchObject({ type: 'grace-signature-withdrawn', keyId: 'key-1', graceLeft: 2 })
    for (let given = 0; given < 2; given++) {
      expect(cache.acquire('key-1')).toMatchObject({ kind: 'ok', grace: true })
      cache.settleGrace('key-1', true)
    }
    expect(cache.acquire('key-1').kind).toBe('needs-unlock')
    expect(cache.stats().graceSignatures).toBe(2)
    // A place given back after a DEK gave the allowance back in full stays within it.
    cache.setDek(dekCopy())
    cache.settleGrace('key-1', false)
    expect(audits.at(-1)).toMatchObject({ type: 'grace-signature-withdrawn', graceLeft: 2 })
  })

  it('gives no grace signature whose audit cannot be kept for the parent: needs-unlock, its place kept, until the log has room', () => {
    // The enclave's sink (enclave/main.ts): audits go into its log ring, a grace signature's as a line that must reach the parent.
    const ring = new LogRing({ maxBytes: 65_536 })
    const { cache, privateKey } = lapsedWithTheDek({ graceSignatures: 2, audit: auditsInto(ring) })
    // Audit lines the parent has not collected fill the quarter of the ring they may hold.
    fillMustDeliverRoom(ring)

    expect(cache.acquire('key-1').kind).toBe('needs-unlock')
    expect(cache.stats()).toMatchObject({ graceSignatures: 0, graceRefusedUnaudited: 1, needsUnlock: 1 })

    // The parent collects and acknowledges them: the next grace signature is audited, and given, with the plaintext kept.
    const collected = ring.read({ instance: 0, after: 0, maxBytes: 1_000_000 })
    ring.read({ instance: ring.instance, after: collected.first + collected.lines.length - 1, maxBytes: 1_000_000 })
    expect(withKeyCopied(cache.acquire('key-1'))).toEqual({ kind: 'ok', privateKey, grace: true })
    cache.settleGrace('key-1', true)
    const lines = ring.read({ instance: 0, after: 0, maxBytes: 1_000_000 }).lines
    expect(lines.map((line) => JSON.parse(line) as Record<string, unknown>)).toMatchObject([{ type: 'grace-signature', keyId: 'key-1', graceLeft: 1 }])
  })

  it('counts grace signatures across all keys, not per key', () => {
    const { cache, key, dekCopy, advance } = harness({ graceSignatures: 3, dekSoftTtlMs: 16 * minute, dekHardTtlMs: 16 * minute, unlockGate: 'closed' })
    cache.setDek(dekCopy())
    cache.addWarm({ record: key({ keyId: 'a' }).record, privateKey: randomSecret() })
    cache.addWarm({ record: key({ keyId: 'b' }).record, privateKey: randomSecret() })
    advance(14 * minute)
    for (const keyId of ['a', 'b']) cache.acquire(keyId)
    advance(3 * minute)

    const answers = ['a', 'a', 'b', 'b'].map((keyId) => cache.acquire(keyId).kind)

    expect(answers).toEqual(['ok', 'ok', 'ok', 'needs-unlock'])
  })

  it('gives none by default: lapsed plaintext is wiped and the caller told to retry', () => {
    const { cache, key, dekCopy, advance, audits } = harness({ unlockGate: 'closed' })
    cache.setDek(dekCopy())
    const held = addWarmHeld(cache, key().record)
    advance(61 * minute)

    expect(cache.acquire('key-1').kind).toBe('needs-unlock')
    expect(held).toEqual(zeros)
    expect(audits).toEqual([])
  })
})

describe('KeyCache key lifecycle', () => {
  it.each(['frozen', 'archived'] as const)('never signs with a %s key, and wipes its plaintext', (state) => {
    const { cache, key, dekCopy } = harness()
    cache.setDek(dekCopy())
    const held = addWarmHeld(cache, key().record)

    expect(cache.setState({ keyId: 'key-1', state, sequence: nextSequence() })).toEqual({ kind: 'applied' })

    expect(cache.acquire('key-1')).toEqual({ kind: 'not-active', state })
    expect(held).toEqual(zeros)
    expect(cache.get('key-1')?.record.state).toBe(state)
  })

  it.each(['frozen', 'archived'] as const)('never opens a %s record loaded from the parent', (state) => {
    const { cache, key, dekCopy } = harness()
    cache.setDek(dekCopy())
    cache.load(key({ state }).record, nextSequence())

    expect(cache.acquire('key-1')).toEqual({ kind: 'not-active', state })
    expect(cache.stats().refreshes).toBe(0)
  })

  it('signs again from the sealed record once a frozen key is made active', () => {
    const { cache, key, dekCopy } = harness()
    const { record, privateKey } = key()
    cache.setDek(dekCopy())
    cache.addWarm({ record, privateKey: new Uint8Array(privateKey) })
    cache.setState({ keyId: 'key-1', state: 'frozen', sequence: nextSequence() })

    cache.setState({ keyId: 'key-1', state: 'active', sequence: nextSequence() })

    expect(cache.acquire('key-1')).toEqual({ kind: 'ok', privateKey, grace: false })
  })

  it.each(['SET_STATE', 'LOAD'] as const)('says a key was not active throughout once a %s froze it since the mark, though it is active again; other keys are unaffected', (via) => {
    const { cache, key, dekCopy } = harness()
    cache.setDek(dekCopy())
    const { record } = key()
    cache.load(record, nextSequence())
    cache.load(key({ keyId: 'other' }).record, nextSequence())
    const mark = cache.deactivations
    expect(cache.activeThroughout('key-1', mark)).toBe(true)
    if (via === 'SET_STATE') cache.setState({ keyId: 'key-1', state: 'frozen', sequence: nextSequence() })
    else cache.load({ ...record, state: 'frozen' }, nextSequence())
    expect(cache.activeThroughout('key-1', mark)).toBe(false)
    cache.setState({ keyId: 'key-1', state: 'active', sequence: nextSequence() })
    expect(cache.activeThroughout('key-1', mark)).toBe(false)
    expect(cache.activeThroughout('key-1', cache.deactivations)).toBe(true)
    expect(cache.activeThroughout('other', mark)).toBe(true)
  })

  it('applies a LOAD or SET_STATE only above the sequence last applied to the key: one given up on that lands late changes nothing', () => {
    const { cache, key, dekCopy } = harness()
    cache.setDek(dekCopy())
    const { record, privateKey } = key()
    const at = (n: number) => firstFloor + n
    expect(cache.load(record, at(5))).toEqual({ kind: 'applied' })
    expect(cache.setState({ keyId: 'key-1', state: 'frozen', sequence: at(7) })).toEqual({ kind: 'applied' })

    // The unfreeze and the reload sent before the freeze, landing after it; and the freeze's own sequence again.
    const taken = { kind: 'stale', reason: `key key-1 has taken sequence ${at(7)} already` }
    expect(cache.setState({ keyId: 'key-1', state: 'active', sequence: at(6) })).toEqual(taken)
    expect(cache.load(record, at(6))).toEqual(taken)
    expect(cache.setState({ keyId: 'key-1', state: 'active', sequence: at(7) })).toEqual(taken)
    expect(cache.acquire('key-1')).toEqual({ kind: 'not-active', state: 'frozen' })
    // Nor a newer version's record: its sealed bytes come with the late request too.
    expect(cache.load(key({ version: 2 }).record, at(6))).toEqual(taken)
    expect(cache.get('key-1')?.record.version).toBe(1)

    expect(cache.setState({ keyId: 'key-1', state: 'active', sequence: at(8) })).toEqual({ kind: 'applied' })
    expect(signingKey(cache.acquire('key-1'))).toEqual(privateKey)
  })

  it('takes the sequence of a SET_STATE for a key it does not hold: a LOAD sent before it, landing after it, is refused', () => {
    const { cache, key, dekCopy } = harness()
    cache.setDek(dekCopy())
    const { record } = key()
    const at = (n: number) => firstFloor + n
    // The parent's LOAD (5) is given up on and delayed; its freeze (7) finds the key gone (a restart), and is answered so.
    expect(cache.setState({ keyId: 'key-1', state: 'frozen', sequence: at(7) })).toEqual({ kind: 'not-found' })
    expect(cache.load(record, at(5))).toEqual({ kind: 'stale', reason: `key key-1 has taken sequence ${at(7)} already` })
    expect(cache.get('key-1')).toBeUndefined()
    // The parent's reload after it, numbered after it, lands: the key as the store has it.
    expect(cache.load({ ...record, state: 'frozen' }, at(8))).toEqual({ kind: 'applied' })
    expect(cache.acquire('key-1')).toEqual({ kind: 'not-active', state: 'frozen' })
  })

  it('applies none outside the current epoch (needs-unlock: its sender must unlock, and the cache starts none): before the first, after the next opens, beyond it, and after clear()', async () => {
    let unlocks = 0
    const cache = new KeyCache({ now: () => 0, random: () => 0.5, unlock: () => (unlocks++, Promise.reject(new Error('no unlock in this test'))) })
    const { key } = harness()
    const { record } = key()
    expect(cache.load(record, 1)).toEqual({ kind: 'needs-unlock', retryAfterMs: 125 })
    await settle()
    expect(unlocks).toBe(0)
    expect(cache.stats().needsUnlock).toBe(1)
    expect(cache.get('key-1')).toBeUndefined()

    const first = cache.openSequenceEpoch()
    expect(cache.load(record, first)).toEqual({ kind: 'applied' })
    const second = cache.openSequenceEpoch()
    expect(second).toBe(first + 2 ** 32)
    const outside = { kind: 'needs-unlock', retryAfterMs: 125 }
    // A freeze of the closed epoch, numbered above everything the key took in it, still changes nothing.
    expect(cache.setState({ keyId: 'key-1', state: 'frozen', sequence: first + 1 })).toEqual(outside)
    expect(cache.setState({ keyId: 'key-1', state: 'frozen', sequence: second + 2 ** 32 })).toEqual(outside)
    expect(cache.get('key-1')?.record.state).toBe('active')
    expect(cache.setState({ keyId: 'key-1', state: 'frozen', sequence: second })).toEqual({ kind: 'applied' })
    expect(cache.get('key-1')?.record.state).toBe('frozen')
    // As a new process: no epoch until the next UNLOCK.
    cache.clear()
    expect(cache.load(record, second + 1)).toEqual(outside)
    await settle()
    expect(unlocks).toBe(0)
  })

  it('opens each epoch above the last, and at the floor asked for or above, rounded up to a whole epoch', () => {
    const cache = new KeyCache({ now: () => 0, unlock: () => Promise.reject(new Error('no unlock in this test')) })
    expect(cache.openSequenceEpoch()).toBe(2 ** 32)
    expect(cache.openSequenceEpoch(5 * 2 ** 32 + 7)).toBe(6 * 2 ** 32)
    expect(cache.openSequenceEpoch(3 * 2 ** 32)).toBe(7 * 2 ** 32)
    expect(cache.openSequenceEpoch(9 * 2 ** 32)).toBe(9 * 2 ** 32)
    expect(cache.hasSequenceEpochLeft(2 ** 53 - 2 ** 32)).toBe(true)
    expect(cache.hasSequenceEpochLeft(2 ** 53 - 2 ** 32 + 1)).toBe(false)
  })

  it('times TTLs in production on a clock that a stepped system clock does not move', () => {
    const before = steadyWallClock()
    expect(Math.abs(before - Date.now())).toBeLessThan(1_000)
    const stepped = vi.spyOn(Date, 'now').mockReturnValue(Date.now() - 3_600_000)
    try {
      // An hour back on the system clock: the cache's clock goes on from where it was.
      expect(steadyWallClock()).toBeGreaterThanOrEqual(before)
      expect(steadyWallClock() - before).toBeLessThan(1_000)
    } finally {
      stepped.mockRestore()
    }
  })

  it('zeroes a data key of the wrong length that it refuses, and the other one handed over with it', () => {
    const cache = new KeyCache({ now: () => 0, unlock: () => Promise.reject(new Error('no unlock in this test')) })
    const short = new Uint8Array(16).fill(7)
    expect(() => cache.setDek(short)).toThrow('DEK must be 32 bytes, got 16')
    expect(short.every((byte) => byte === 0)).toBe(true)
    const dek = new Uint8Array(32).fill(7)
    const retiring = new Uint8Array(31).fill(7)
    expect(() => cache.setDek(dek, retiring)).toThrow('DEK must be 32 bytes, got 31')
    expect([...dek, ...retiring].every((byte) => byte === 0)).toBe(true)
  })

  it('opens epochs while a whole one fits below 2^53, then refuses', () => {
    const cache = new KeyCache({ now: () => 0, unlock: () => Promise.reject(new Error('no unlock in this test')) })
    let last = 0
    let opened = 0
    while (cache.hasSequenceEpochLeft()) {
      last = cache.openSequenceEpoch()
      opened++
    }
    expect(opened).toBe(2 ** 21 - 1)
    expect(Number.isSafeInteger(last + 2 ** 32 - 1)).toBe(true)
    expect(() => cache.openSequenceEpoch()).toThrow('no sequence epoch is left: restart the enclave')
    const { key } = harness()
    expect(cache.load(key().record, last + 2 ** 32 - 1)).toEqual({ kind: 'applied' })
  })

  it('takes any sequence of the epoch for a key created here', () => {
    const { cache, dekCopy } = harness()
    cache.setDek(dekCopy())
    const privateKey = randomSecret()
    const created = cache.createKey({ keyId: 'made-here', publicKey: secp256k1.publicKeyCreate(privateKey, false), privateKey })
    expect(created.kind).toBe('ok')
    expect(cache.setState({ keyId: 'made-here', state: 'frozen', sequence: firstFloor })).toEqual({ kind: 'applied' })
  })

  it('zeroes a key handed to it even when it cannot take the key in', () => {
    const { cache, dekCopy } = harness()
    cache.setDek(dekCopy())
    // An empty public key cannot be copied into the slabs (nor can anything when memory runs out).
    const privateKey = randomSecret()
    expect(() => cache.createKey({ keyId: 'made-here', publicKey: new Uint8Array(0), privateKey })).toThrow(RangeError)
    expect(privateKey).toEqual(zeros)
    expect(cache.get('made-here')).toBeUndefined()
    const short = randomSecret().subarray(0, 31)
    expect(() => cache.addWarm({ record: { keyId: 'k', version: 1, state: 'active', publicKey: new Uint8Array(65), sealed: new Uint8Array(60) }, privateKey: short })).toThrow('private key must be 32 bytes, got 31')
    expect(short).toEqual(new Uint8Array(31))
  })

  it('answers not-found for a key it does not hold', () => {
    const { cache } = harness()
    expect(cache.acquire('missing')).toEqual({ kind: 'not-found' })
    expect(cache.get('missing')).toBeUndefined()
    expect(cache.get('missing')?.cacheState).toBeUndefined()
    expect(cache.setState({ keyId: 'missing', state: 'frozen', sequence: nextSequence() })).toEqual({ kind: 'not-found' })
  })

  it('reports each record with its cache state, and counts keys per state', () => {
    const { cache, key, dekCopy, advance } = harness()
    cache.setDek(dekCopy())
    cache.addWarm({ record: key({ keyId: 'warm' }).record, privateKey: randomSecret() })
    const cool = key({ keyId: 'cool' }).record
    cache.load(cool, nextSequence())

    expect(cache.get('cool')).toEqual({ record: cool, cacheState: 'COOL' })
    expect(cache.stats().keys).toEqual({ WARM: 1, COOL: 1, INVALID: 0 })
    advance(60 * minute)
    expect(cache.stats().keys).toEqual({ WARM: 0, COOL: 0, INVALID: 2 })
  })
})

describe('KeyCache wipes plaintext it drops', () => {
  it('when a record is replaced by a new version, and not when the parent re-sends the same one', () => {
    const { cache, key, dekCopy } = harness()
    cache.setDek(dekCopy())
    const { record } = key()
    const held = addWarmHeld(cache, record)

    cache.load({ ...record }, nextSequence())
    expect(cache.get('key-1')?.cacheState).toBe('WARM')
    expect(held).not.toEqual(zeros)

    cache.load(key({ version: 2 }).record, nextSequence())
    expect(cache.get('key-1')?.cacheState).toBe('COOL')
    expect(held).toEqual(zeros)
  })

  it('when the pre-warmer evicts a key past its hard TTL that nobody has used for a soft TTL', () => {
    const { cache, key, dekCopy, advance } = harness()
    cache.setDek(dekCopy())
    const held = addWarmHeld(cache, key().record) // used once, now: 16 minutes later it is not hot

    advance(16 * minute)
    prewarm(cache)

    expect(held).toEqual(zeros)
    expect(cache.get('key-1')?.cacheState).toBe('COOL')
  })

  it('when a DEK is replaced or passes its hard TTL', () => {
    const { cache, dekCopy, advance } = harness()
    const first = dekCopy()
    const second = dekCopy()
    cache.setDek(first)
    cache.setDek(second)
    expect(first).toEqual(zeros)
    expect(second).not.toEqual(zeros)

    advance(60 * minute)
    prewarm(cache)
    expect(second).toEqual(zeros)
  })

  it('a retiring DEK: when the rotation ends, when both lapse, and when the pair is installed again only the replaced ones', () => {
    const { cache, dekCopy, advance } = harness()
    const retiring = randomSecret()
    const current = dekCopy()
    cache.setDek(current, retiring)
    cache.setDek(current)
    expect(retiring).toEqual(zeros)
    expect(current).not.toEqual(zeros)

    const again = randomSecret()
    cache.setDek(current, again)
    expect(current).not.toEqual(zeros)
    advance(60 * minute)
    prewarm(cache)
    expect([current, again]).toEqual([zeros, zeros])
  })

  it('on clear(): every key and the DEK', async () => {
    const { cache, key, dekCopy, unlock } = harness({ unlockGate: 'closed' })
    const dek = dekCopy()
    cache.setDek(dek)
    const held = [addWarmHeld(cache, key({ keyId: 'a' }).record), addWarmHeld(cache, key({ keyId: 'b' }).record)]

    cache.clear()

    expect(held).toEqual([zeros, zeros])
    expect(dek).toEqual(zeros)
    expect(cache.stats().keys).toEqual({ WARM: 0, COOL: 0, INVALID: 0 })
    unlock.open()
    await cache.idle()
  })

  it('on clear(): a refresh asked for in the same turn starts no unlock, and one already under way installs nothing and is not joined', async () => {
    const { cache, key, dekCopy, advance, unlock } = harness({ dekSoftTtlMs: 10 * minute, dekHardTtlMs: 10 * minute, unlockGate: 'closed' })
    cache.setDek(dekCopy())
    addWarmHeld(cache, key().record)
    advance(15 * minute + 30_000) // past the key's soft TTL, not its hard one; the DEK has lapsed
    expect(cache.acquire('key-1').kind).toBe('ok') // and asks for a refresh, which would need an unlock
    cache.clear()
    await settle()
    expect(unlock.calls()).toBe(0)

    // An unlock under way at clear(): what it brings is dropped, and the next need starts another.
    cache.openSequenceEpoch()
    const { record } = key()
    cache.load(record, nextSequence())
    expect(cache.acquire('key-1').kind).toBe('needs-unlock')
    await settle()
    expect(unlock.calls()).toBe(1)
    cache.clear()
    cache.openSequenceEpoch()
    cache.load(record, nextSequence())
    expect(cache.acquire('key-1').kind).toBe('needs-unlock')
    await settle()
    expect(unlock.calls()).toBe(2)
    unlock.open()
    await cache.idle()
    expect(cache.stats().unlocks).toBe(2)
  })
})

describe('KeyCache loads', () => {
  it('a record whose bytes cannot be copied leaves the key held before, and every other key, as they were', () => {
    const { cache, key, dekCopy } = harness()
    cache.setDek(dekCopy())
    /** A key sealed under the DEK, told apart from the others by its public key. */
    const distinct = (keyId: string, version: number) => key({ keyId, version })
    const k1 = distinct('k', 1)
    cache.load(k1.record, nextSequence())

    expect(() => cache.load({ ...distinct('k', 2).record, sealed: new Uint8Array(0) }, nextSequence())).toThrow(RangeError)
    expect(cache.get('k')?.record).toEqual(k1.record)
    expect(withKeyCopied(cache.acquire('k'))).toEqual({ kind: 'ok', privateKey: k1.privateKey, grace: false })

    const k2 = distinct('k', 2)
    cache.load(k2.record, nextSequence())
    const j = distinct('j', 1)
    cache.addWarm({ record: j.record, privateKey: new Uint8Array(j.privateKey) })
    expect(cache.get('k')?.record.publicKey).toEqual(k2.record.publicKey)
    expect(cache.get('j')?.record.publicKey).toEqual(j.record.publicKey)

    const k3 = distinct('k', 3)
    cache.load(k3.record, nextSequence())
    expect(cache.get('j')?.record.publicKey).toEqual(j.record.publicKey)
    expect(withKeyCopied(cache.acquire('j'))).toEqual({ kind: 'ok', privateKey: j.privateKey, grace: false })
    expect(withKeyCopied(cache.acquire('k'))).toEqual({ kind: 'ok', privateKey: k3.privateKey, grace: false })
  })
})

describe('KeyCache during a DEK rotation', () => {
  it('keeps a DEK installed while a background unlock was out: the older answer is dropped, zeroed', async () => {
    const { cache, key, unlock } = harness({ unlockGate: 'closed' })
    const newer = randomSecret()
    const signed = key({ keyId: 'newer', sealingDek: newer })
    cache.load(signed.record, nextSequence())
    expect(cache.acquire('newer').kind).toBe('needs-unlock')
    await settle()
    expect(unlock.calls()).toBe(1)
    // An UNLOCK (a rotation's) installs the newer DEK while the background unlock still waits on KMS.
    const installed = new Uint8Array(newer)
    cache.setDek(installed)
    unlock.open()
    await cache.idle()
    expect(installed).toEqual(newer)
    expect(signingKey(cache.acquire('newer'))).toEqual(signed.privateKey)
    // A key sealed under the answer that came late does not open: that DEK was not installed.
    cache.load(key({ keyId: 'late' }).record, nextSequence())
    expect(() => cache.acquire('late')).toThrow(SealingError)
  })

  it('keeps the sealed key of a record newer than one loaded, takes the older one\'s state, and takes a newer record whole', () => {
    const { cache, key, dekCopy } = harness()
    cache.setDek(dekCopy())
    const v2 = key({ keyId: 'k', version: 2 })
    cache.load(v2.record, nextSequence())
    cache.load(key({ keyId: 'k', version: 1 }).record, nextSequence())
    expect(cache.get('k')?.record.version).toBe(2)
    expect(signingKey(cache.acquire('k'))).toEqual(v2.privateKey)
    // The parent's store missed a re-seal (v2), then the key was frozen: the older record's state holds.
    cache.load({ ...key({ keyId: 'k', version: 1 }).record, state: 'frozen' }, nextSequence())
    expect(cache.get('k')?.record).toMatchObject({ version: 2, state: 'frozen' })
    expect(cache.acquire('k')).toEqual({ kind: 'not-active', state: 'frozen' })
    cache.load({ ...key({ keyId: 'k', version: 1 }).record, state: 'active' }, nextSequence())
    expect(signingKey(cache.acquire('k'))).toEqual(v2.privateKey)
    const v3 = key({ keyId: 'k', version: 3 })
    cache.load(v3.record, nextSequence())
    expect(signingKey(cache.acquire('k'))).toEqual(v3.privateKey)
  })

  it('opens records sealed under the retiring DEK, and reseals each one version up under the new DEK only', () => {
    const { cache, key, dekCopy } = harness()
    const oldDek = randomSecret()
    const old = key({ keyId: 'old', sealingDek: oldDek })
    const fresh = key({ keyId: 'fresh' })
    cache.setDek(dekCopy(), new Uint8Array(oldDek))
    cache.load(old.record, nextSequence())
    cache.load(fresh.record, nextSequence())
    expect(signingKey(cache.acquire('old'))).toEqual(old.privateKey)
    expect(signingKey(cache.acquire('fresh'))).toEqual(fresh.privateKey)

    const resealed = cache.reseal('old')
    if (resealed.kind !== 'ok') throw new Error(`expected a record, got ${resealed.kind}`)
    expect(resealed.record.version).toBe(2)
    const opened = (dek: Uint8Array) => unsealPrivateKey({ sealed: resealed.record.sealed, dek, keyId: 'old', version: 2 })
    expect(opened(dekCopy())).toEqual(old.privateKey)
    expect(() => opened(oldDek)).toThrow(SealingError)
    // Still WARM, and the record held is the new one.
    expect(cache.get('old')).toMatchObject({ cacheState: 'WARM', record: { version: 2 } })

    // Once the rotation ends, the new record opens and an old one left behind does not.
    cache.setDek(dekCopy())
    cache.load({ ...old.record, keyId: 'left-behind' }, nextSequence())
    cache.load(resealed.record, nextSequence())
    expect(() => cache.acquire('left-behind')).toThrow(SealingError)
  })

  it('answers not-found for a key it does not hold, and needs-unlock without a DEK, starting an unlock', async () => {
    const { cache, key, unlock } = harness({ unlockGate: 'closed' })
    cache.load(key().record, nextSequence())
    expect(cache.reseal('nobody')).toEqual({ kind: 'not-found' })
    expect(cache.reseal('key-1')).toMatchObject({ kind: 'needs-unlock', retryAfterMs: 125 })
    await settle()
    expect(unlock.calls()).toBe(1)
    unlock.open()
    await cache.idle()
    expect(cache.reseal('key-1')).toMatchObject({ kind: 'ok', record: { version: 2 } })
  })

  it('takes both DEKs from one background unlock', async () => {
    const oldDek = randomSecret()
    const { cache, key, dekCopy } = harness({ unlock: async () => ({ dek: dekCopy(), retiring: new Uint8Array(oldDek) }) })
    cache.load(key({ keyId: 'old', sealingDek: oldDek }).record, nextSequence())
    expect(cache.acquire('old').kind).toBe('needs-unlock')
    await cache.idle()
    expect(cache.get('old')?.cacheState).toBe('WARM')
  })
})

describe('KeyCache memory', () => {
  it('keeps the bytes of thousands of keys in a few shared buffers, not one ArrayBuffer per key', () => {
    const { cache, key, dekCopy } = harness()
    cache.setDek(dekCopy())
    const buffers = new Set<ArrayBufferLike>()
    for (let i = 0; i < 3_000; i++) {
      const keyId = `key-${i}`
      if (i % 2 === 0) cache.load(key({ keyId }).record, nextSequence())
      else cache.addWarm({ record: key({ keyId }).record, privateKey: randomSecret() })
      const { publicKey, sealed } = cache.get(keyId)!.record
      buffers.add(publicKey.buffer).add(sealed.buffer).add(signingKey(cache.acquire(keyId)).buffer)
    }
    // 3,000 × 65-, 60- and 32-byte strings in 64 KiB slabs: 3 + 3 + 2.
    expect(buffers.size).toBe(8)
  })
})

describe('KeyCache pre-warmer', () => {
  // random() is 0.5 and the jitter 10%: keys re-warm 45 s before their 15-minute soft TTL.
  it('refreshes a hot key shortly before its soft TTL, and leaves a key nobody used alone', async () => {
    const { cache, key, dekCopy, advance, unlock } = harness()
    cache.setDek(dekCopy())
    cache.addWarm({ record: key({ keyId: 'hot' }).record, privateKey: randomSecret() })
    cache.addWarm({ record: key({ keyId: 'idle' }).record, privateKey: randomSecret() })
    cache.acquire('hot')

    advance(14 * minute)
    prewarm(cache)
    await cache.idle()
    expect(cache.stats().refreshes).toBe(0)

    advance(16_000)
    prewarm(cache)
    await cache.idle()
    expect(cache.stats().refreshes).toBe(1)
    advance(2 * minute) // past the idle key's hard TTL...
    expect(cache.stats().keys).toEqual({ WARM: 1, COOL: 1, INVALID: 0 }) // ...only the hot one was kept warm
    expect(unlock.calls()).toBe(0)
  })

  it('drops the plaintext of a hot key past its hard TTL while no DEK can refresh it, unless grace signatures may spend it, and an idle key\u2019s either way', () => {
    for (const graceSignatures of [0, 2]) {
      // The DEK lapses with the key: its refresh waits on an unlock that does not come.
      const { cache, key, dekCopy, advance } = harness({ graceSignatures, dekSoftTtlMs: 16 * minute, dekHardTtlMs: 16 * minute, unlockGate: 'closed' })
      cache.setDek(dekCopy())
      const { record, privateKey } = key()
      const held = addWarmHeld(cache, record, privateKey)
      const idleHeld = addWarmHeld(cache, key({ keyId: 'idle' }).record)
      advance(14 * minute)
      cache.acquire('key-1') // hot: used within the last soft TTL

      advance(3 * minute)
      prewarm(cache)

      expect(idleHeld).toEqual(zeros)
      if (graceSignatures === 0) {
        expect(held).toEqual(zeros)
        expect(cache.get('key-1')?.cacheState).toBe('INVALID')
      } else {
        expect(held).toEqual(privateKey)
        expect(withKeyCopied(cache.acquire('key-1'))).toEqual({ kind: 'ok', privateKey, grace: true })
        // Grace is left, but once the key has gone unused for a soft TTL it gets none, and its plaintext goes.
        advance(16 * minute)
        expect(cache.acquire('key-1').kind).toBe('needs-unlock')
        expect(held).toEqual(zeros)
      }
    }
  })

  it('sweeps in steps of at most maxKeys keys or maxRefreshes refreshes, each step resuming where the last stopped', async () => {
    const { cache, key, dekCopy, advance } = harness()
    cache.setDek(dekCopy())
    for (let i = 0; i < 10; i++) {
      cache.addWarm({ record: key({ keyId: `hot-${i}` }).record, privateKey: randomSecret() })
      cache.acquire(`hot-${i}`)
    }
    advance(14 * minute + 16_000)
    const refreshesAfterEachStep: number[] = []
    for (const limits of [{ maxKeys: 4 }, { maxRefreshes: 3 }, { maxKeys: 4 }, { maxKeys: 4 }]) {
      cache.sweepKeys(limits)
      await cache.idle()
      refreshesAfterEachStep.push(cache.stats().refreshes)
    }
    // 4 keys, 3 refreshes, then the last 3 keys; the fourth step starts a new sweep, and those keys are fresh again.
    expect(refreshesAfterEachStep).toEqual([4, 7, 10, 10])
  })

  it('sweeps only the keys holding plaintext: a lapsed one goes at the next step however many COOL keys there are', () => {
    const { cache, key, dekCopy, advance } = harness()
    cache.setDek(dekCopy())
    // Loaded first, so a sweep over every key would meet them first.
    for (let i = 0; i < 100; i++) cache.load(key({ keyId: `cool-${i}` }).record, nextSequence())
    const held = ['warm-0', 'warm-1'].map((keyId) => addWarmHeld(cache, key({ keyId }).record, randomSecret()))
    advance(17 * minute)
    cache.sweepKeys({ maxKeys: 2 })
    for (const plaintext of held) expect(plaintext).toEqual(zeros)
    expect(cache.stats().keys).toMatchObject({ WARM: 0 })
  })

  it('drops lapsed plaintext at the next step however far the walk has to go: the keys holding it are in hard-TTL order', () => {
    // Three uses a key: out of them, it is re-derived at its next use, with a new hard TTL, as a refresh would be.
    const { cache, key, dekCopy, advance } = harness({ keyUseBudget: 3, keyLowWaterMark: 0 })
    cache.setDek(dekCopy())
    const first = addWarmHeld(cache, key({ keyId: 'first' }).record)
    advance(minute)
    const rederived = addWarmHeld(cache, key({ keyId: 'rederived' }).record)
    advance(minute)
    const later = Array.from({ length: 50 }, (_, i) => addWarmHeld(cache, key({ keyId: `later-${i}` }).record))
    // A step that sees only the first two keys, so the walk resumes behind them.
    cache.sweepKeys({ maxKeys: 2 })
    advance(30_000)
    for (let use = 0; use < 3; use++) expect(cache.acquire('rederived').kind).toBe('ok')
    expect(cache.stats().refreshes).toBe(1)
    // Past the first key's hard TTL (16 min) and the re-derived key's old one, not its new one.
    advance(14.5 * minute)
    cache.sweepKeys({ maxKeys: 2 })
    expect(first).toEqual(zeros)
    expect(cache.get('rederived')?.cacheState).toBe('WARM')
    for (const plaintext of later) expect(plaintext).not.toEqual(zeros)
    // Past the later keys' hard TTL: the re-derived key went behind them, so the front holds all 50.
    advance(70_000)
    cache.sweepKeys({ maxKeys: 50 })
    for (const plaintext of later) expect(plaintext).toEqual(zeros)
    expect(rederived).not.toEqual(zeros)
  })

  it('zeroes the unsealed copy of a refresh whose plaintext cannot be installed (no slab to be had)', () => {
    const { cache, key, dekCopy } = harness()
    cache.setDek(dekCopy())
    cache.load(key().record, nextSequence())
    let handed: Uint8Array | undefined
    // The slab allocation failing, as it would out of memory.
    ;(cache as unknown as { installPlaintext: (entry: unknown, privateKey: Uint8Array) => Uint8Array }).installPlaintext = (_entry, privateKey) => {
      handed = privateKey
      throw new RangeError('Array buffer allocation failed')
    }
    expect(() => cache.acquire('key-1')).toThrow('Array buffer allocation failed')
    expect(handed).toEqual(zeros)
  })

  it('forgets on clear() the keys that held plaintext: the next sweep visits only those held since', () => {
    const { cache, key, dekCopy, advance } = harness()
    cache.setDek(dekCopy())
    addWarmHeld(cache, key({ keyId: 'before' }).record)
    cache.clear()
    const held = addWarmHeld(cache, key({ keyId: 'after' }).record)
    advance(17 * minute)
    cache.sweepKeys({ maxKeys: 1 })
    expect(held).toEqual(zeros)
  })

  it('renews the DEK on its own call, not on a sweep step', async () => {
    const { cache, key, dekCopy, advance, unlock } = harness()
    cache.setDek(dekCopy())
    cache.load(key().record, nextSequence())
    advance(53 * minute)
    cache.sweepKeys()
    await cache.idle()
    expect(unlock.calls()).toBe(0)
    cache.renewDataKeyIfDue()
    await cache.idle()
    expect(unlock.calls()).toBe(1)
  })

  it('renews the DEK in the background before its soft TTL', async () => {
    // 55-minute soft TTL, renewed 5% (2 min 45 s) early.
    const { cache, key, dekCopy, advance, unlock } = harness()
    cache.setDek(dekCopy())
    cache.load(key().record, nextSequence())

    advance(52 * minute)
    prewarm(cache)
    await cache.idle()
    expect(unlock.calls()).toBe(0)

    advance(30_000)
    prewarm(cache)
    await cache.idle()
    expect(unlock.calls()).toBe(1)
    expect(cache.stats().unlocks).toBe(2)

    advance(10 * minute) // past the first DEK's hard TTL
    expect(cache.get('key-1')?.cacheState).toBe('COOL')
  })

  it('fetches a DEK before any request when keys are loaded and none is held, and not for an empty cache', async () => {
    const empty = harness()
    prewarm(empty.cache)
    await empty.cache.idle()
    expect(empty.unlock.calls()).toBe(0)

    const { cache, key, unlock } = harness()
    cache.load(key().record, nextSequence())
    prewarm(cache)
    await cache.idle()
    expect(unlock.calls()).toBe(1)
    expect(cache.get('key-1')?.cacheState).toBe('COOL')
  })
})
