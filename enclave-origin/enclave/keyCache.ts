import { setImmediate as nextTurn } from 'node:timers/promises'
import { messageOf } from '../errors.js'
import { FailureBackoff } from '../failureBackoff.js'
import { countInto, emptyCounts, rehydrateBucketsMs } from '../protocol/histograms.js'
import { sequenceEpochSize } from '../protocol/messages.js'
import type { CacheState, KeyState, SealedKeyRecord } from '../types.js'
import { ByteSlabs } from './byteSlabs.js'
import { secp256k1 } from './nativeSecp256k1.js'
import { SealingError, sealPrivateKey, unsealPrivateKey, zero } from './sealing.js'
import { DeactivationMarks } from '../deactivationMarks.js'

/**
 * The enclave's key cache: the hot path never waits on KMS.
 *
 * Each key always has its sealed record; when WARM it also has its plaintext
 * private key, valid until a hard TTL or until its use budget runs out. The
 * DEK that opens the sealed records is cached too, with its own TTL. A key
 * whose plaintext has lapsed is COOL while the DEK is valid (re-derived inline,
 * microseconds) and INVALID once the DEK has lapsed as well: the caller gets
 * `needs-unlock` at once and one `unlock()` runs in the background. During a
 * DEK rotation a retiring DEK is held beside it: records still sealed under
 * it open, and `reseal` seals them again under the current one.
 *
 * Key bytes live in slabs (byteSlabs.ts), not one ArrayBuffer each: a record's
 * public key and sealed bytes are copied in when it is loaded, and a private key
 * handed over (`addWarm`, `createKey`) is copied in and the caller's buffer
 * zeroed at once. A DEK handed over (`setDek`, what `unlock` returns) becomes
 * the cache's, zeroed when dropped. A private key returned by `acquire` is the
 * cache's slab view, not a copy: use it synchronously (sign, then let go) and
 * never hold it across an await, since a refresh or eviction zeroes it and
 * its place may then hold another key.
 */

export type KeyCacheAuditEvent =
  | { type: 'grace-signature'; keyId: string; version: number; graceLeft: number; at: number }
  /** A grace signature audited, then not given after all (see `settleGrace`): its place in the allowance is back. */
  | { type: 'grace-signature-withdrawn'; keyId: string; graceLeft: number; at: number }
  | { type: 'refresh-failed'; keyId: string; version: number; reason: string; at: number }

/**
 * Milliseconds since the epoch that never step: the wall clock at the
 * process's start plus monotonic time since. The cache's clock in
 * production, so that a stepped system clock (NTP, an operator) neither
 * keeps a plaintext key or DEK past its hard TTL nor expires them all at
 * once. Monotonic time stops while the machine is suspended.
 */
export const steadyWallClock = (): number => performance.timeOrigin + performance.now()

export type KeyCacheOptions = {
  /** Clock in ms that TTLs are measured on: `steadyWallClock` in production; tests move it by hand. */
  now: () => number
  /** Uniform in [0, 1): jitter for retry-after and pre-warm timing. */
  random?: () => number
  /** Monotonic ms clock that times inline refreshes against their budget. */
  monotonicNow?: () => number
  /** Fetches the plaintext DEK, and a rotation's retiring one (in production, KMS Decrypt bound to attestation). */
  unlock: () => Promise<DataKeys>
  /** Called synchronously; if it throws for a grace signature, the signature is not given (NEEDS_UNLOCK instead). */
  audit?: (event: KeyCacheAuditEvent) => void
  keySoftTtlMs?: number
  keyHardTtlMs?: number
  keyUseBudget?: number
  /** A WARM key with fewer uses left than this is refreshed in the background. */
  keyLowWaterMark?: number
  dekSoftTtlMs?: number
  dekHardTtlMs?: number
  inlineRefreshBudgetMs?: number
  retryAfterMs?: { min: number; max: number }
  /** The pre-warmer refreshes up to this fraction of the soft TTL early (uniformly jittered). */
  prewarmJitter?: number
  /** Signatures allowed with lapsed plaintext while INVALID, across all keys, until a DEK is installed again. */
  graceSignatures?: number
}

export type KeyCacheConfig = Required<Omit<KeyCacheOptions, 'now' | 'random' | 'monotonicNow' | 'unlock' | 'audit'>>

export const keyCacheDefaults: KeyCacheConfig = {
  keySoftTtlMs: 15 * 60_000,
  keyHardTtlMs: 16 * 60_000,
  keyUseBudget: 1_000_000,
  keyLowWaterMark: 50_000,
  dekSoftTtlMs: 55 * 60_000,
  dekHardTtlMs: 60 * 60_000,
  inlineRefreshBudgetMs: 4,
  retryAfterMs: { min: 50, max: 200 },
  prewarmJitter: 0.1,
  graceSignatures: 0,
}

/**
 * The DEK that seals, and during a rotation the retiring one it replaces,
 * which still opens records not yet re-sealed (`reseal`).
 */
export type DataKeys = { dek: Uint8Array; retiring?: Uint8Array }

export type AcquireResult =
  | { kind: 'ok'; privateKey: Uint8Array; grace: boolean }
  | { kind: 'needs-unlock'; retryAfterMs: number }
  | { kind: 'not-found' }
  | { kind: 'not-active'; state: Exclude<KeyState, 'active'> }

export type KeyCacheStats = {
  /** Active keys by cache state. */
  keys: Record<CacheState, number>
  /** Frozen and archived keys: they never sign, so no cache state says anything of them. */
  keysNotActive: number
  /** Re-derivations of plaintext from a sealed record, inline and in the background. */
  refreshes: number
  refreshFailures: number
  unlocks: number
  unlockFailures: number
  needsUnlock: number
  graceSignatures: number
  /** Grace signatures refused because their audit could not be kept (the enclave's log held as many as it may). */
  graceRefusedUnaudited: number
  inlineRefreshOverBudget: number
  /** Inline refresh (rehydrate) latency: totals, and counts per bucket of `rehydrateBucketsMs` (the last counts everything above). */
  inlineRefreshMs: { count: number; sum: number; max: number; buckets: number[] }
}

type KeyEntry = {
  /** Its publicKey and sealed bytes are views into the cache's slabs. */
  record: SealedKeyRecord
  /** A view into the cache's slabs while the key has plaintext. */
  plaintext: Uint8Array | undefined
  softExpiresAt: number
  hardExpiresAt: number
  /** Soft expiry brought forward by a random lead, so keys warmed together are not re-warmed together. */
  prewarmAt: number
  usesLeft: number
  /**
   * -Infinity until first used. Never undefined: a field that starts out
   * undefined holds each new time as a fresh heap number, one allocation per
   * signature that lives until the key's next use.
   */
  lastUsedAt: number
  /** The sequence of the last LOAD or SET_STATE applied to the key; 0 for a key created here and not touched since. */
  sequence: number
}

/**
 * What became of a LOAD or SET_STATE (see `openSequenceEpoch`): applied;
 * stale (the key took a later one), and why; needs-unlock, numbered
 * outside the current epoch (or before any UNLOCK opened one); or archived:
 * the key is, and archiving is final, so no other state is taken.
 */
export type SequencedResult = { kind: 'applied' } | { kind: 'stale'; reason: string } | { kind: 'needs-unlock'; retryAfterMs: number } | { kind: 'archived' }

type CachedDek = { bytes: Uint8Array; retiring: Uint8Array | undefined; softExpiresAt: number; hardExpiresAt: number; renewAt: number }

type Counters = Omit<KeyCacheStats, 'keys' | 'keysNotActive' | 'inlineRefreshMs'>

export class KeyCache {
  readonly config: KeyCacheConfig
  private readonly now: () => number
  private readonly random: () => number
  private readonly monotonicNow: () => number
  private readonly unlock: () => Promise<DataKeys>
  private readonly audit: (event: KeyCacheAuditEvent) => void

  private readonly entries = new Map<string, KeyEntry>()
  /** The sequences SET_STATEs took for keys not held, this epoch (see `setState`); dropped once the key loads. */
  private readonly absentKeySequences = new Map<string, number>()
  /** The first sequence of the current epoch; none before the first UNLOCK, and then no LOAD or SET_STATE applies. */
  private sequenceFloor: number | undefined
  /** Every key's bytes: private keys, public keys and sealed records. */
  private readonly bytes = new ByteSlabs()
  /**
   * The keys holding plaintext, which are all the sweep has to do with, in the order they were last installed: one
   * hard TTL for all on a clock that does not step back puts them in hard-TTL order, so lapsed plaintext is at the
   * front, and a step drops it there without walking a million WARM keys to find it.
   */
  private readonly holdingPlaintext = new Set<KeyEntry>()
  /** Where the pre-warmer's sweep resumes (a Set iterator stays valid as keys come and go). */
  private sweep: SetIterator<KeyEntry> | undefined
  private dek: CachedDek | undefined
  private graceLeft: number
  /** Bumped by `clear()`, so an unlock that was in flight cannot bring a DEK back. */
  private generation = 0
  /**
   * Bumped by every `setDek`: a background unlock that started before a DEK
   * was installed read what was current then, and must not replace it (in a
   * rotation, the newer pair would lose to the older DEK alone).
   */
  private dekEpoch = 0
  private unlockInFlight: Promise<boolean> | undefined
  /** After failed unlocks none starts for a while: a failing KMS is not asked once per request. An installed DEK clears it. */
  private readonly unlockBackoff: FailureBackoff
  private readonly refreshesInFlight = new Map<string, Promise<void>>()
  /**
   * Keys re-derived as soon as the unlock lands (see `warmInSlices`): those turned away with needs-unlock, so the
   * retry finds them WARM, and WARM ones whose background refresh found no DEK.
   */
  private readonly keysAwaitingUnlock = new Set<string>()
  private readonly deactivationMarks = new DeactivationMarks()
  private readonly backgroundWork = new Set<Promise<unknown>>()
  private readonly counters: Counters = {
    refreshes: 0,
    refreshFailures: 0,
    unlocks: 0,
    unlockFailures: 0,
    needsUnlock: 0,
    graceSignatures: 0,
    graceRefusedUnaudited: 0,
    inlineRefreshOverBudget: 0,
  }
  private readonly inlineRefreshMs = { count: 0, sum: 0, max: 0, buckets: emptyCounts(rehydrateBucketsMs) }

  constructor(options: KeyCacheOptions) {
    const { now, random, monotonicNow, unlock, audit, ...overrides } = options
    this.config = validated({ ...keyCacheDefaults, ...withoutUndefined(overrides) })
    this.now = now
    this.random = random ?? Math.random
    this.monotonicNow = monotonicNow ?? (() => performance.now())
    this.unlock = unlock
    this.audit = audit ?? (() => {})
    this.graceLeft = this.config.graceSignatures
    this.unlockBackoff = new FailureBackoff({ now: this.now, random: this.random })
  }

  /**
   * Installs a plaintext DEK, and a rotation's retiring one if given (after an
   * explicit UNLOCK, or what `unlock` returned); zeroes those it replaces.
   * Both lapse together. Counted as an unlock; the keys that waited on one
   * are re-derived (see `warmInSlices`).
   */
  setDek(dek: Uint8Array, retiring?: Uint8Array): void {
    for (const bytes of retiring ? [dek, retiring] : [dek]) {
      if (bytes.length !== 32) {
        // Key material even so: nothing else will zero it.
        zero(dek)
        if (retiring) zero(retiring)
        throw new RangeError(`DEK must be 32 bytes, got ${bytes.length}`)
      }
    }
    const now = this.now()
    this.dekEpoch += 1
    if (this.dek) this.dropDek(this.dek, [dek, retiring])
    const { dekSoftTtlMs, dekHardTtlMs, prewarmJitter } = this.config
    this.dek = {
      bytes: dek,
      retiring,
      softExpiresAt: now + dekSoftTtlMs,
      hardExpiresAt: now + dekHardTtlMs,
      renewAt: now + dekSoftTtlMs - this.random() * prewarmJitter * dekSoftTtlMs,
    }
    // A valid DEK ends the INVALID spell: the next one gets a full grace allowance, and an unlock may start at once.
    this.graceLeft = this.config.graceSignatures
    this.unlockBackoff.succeeded()
    this.counters.unlocks += 1
    this.warmKeysAwaitingUnlock()
  }

  /**
   * Adds or replaces a key's record, if `sequence` is current (see
   * `openSequenceEpoch`). A record that seals the same bytes at the same
   * version as the one held keeps its plaintext (a re-sync from the parent
   * is not a reason to go cold); any other replacement drops it. Of one of
   * an older version than the one held only the state is taken: a DEK
   * rotation may have re-sealed the key here without its store taking the
   * new version, but a freeze must hold. A record whose bytes cannot be
   * held (an empty one) throws and leaves the held key as it was.
   */
  load(record: SealedKeyRecord, sequence: number): SequencedResult {
    const stale = this.staleFor(record.keyId, sequence)
    if (stale) return stale
    if (this.entries.get(record.keyId)?.record.state === 'archived' && record.state !== 'archived') return archivedIsFinal
    this.loadEntry(record).sequence = sequence
    this.absentKeySequences.delete(record.keyId)
    return applied
  }

  /**
   * Opens the next epoch of sequences, for an UNLOCK's answer, and returns
   * its first. From then on a LOAD or SET_STATE applies only if its sequence
   * lies in [first, first + 2^32) and is above the last one applied to its
   * key. Every sequence of an earlier epoch lies below, so a request that
   * its parent gave up on (timed out), or a request of a parent before it,
   * that lands late changes nothing. The first is at `atLeast` or above (see
   * UnlockRequest). Throws when no epoch is left (`hasSequenceEpochLeft`).
   */
  openSequenceEpoch(atLeast = 0): number {
    if (!this.hasSequenceEpochLeft(atLeast)) throw new Error('no sequence epoch is left: restart the enclave')
    this.sequenceFloor = this.nextSequenceFloor(atLeast)
    // Every sequence they hold is below the new floor, where staleFor refuses it anyway.
    this.absentKeySequences.clear()
    return this.sequenceFloor
  }

  /** Whether the next epoch fits below 2^53 (about 2 million per process): an UNLOCK checks before it changes anything. */
  hasSequenceEpochLeft(atLeast = 0): boolean {
    return this.nextSequenceFloor(atLeast) + sequenceEpochSize <= Number.MAX_SAFE_INTEGER + 1
  }

  /** Above this process's epochs so far, and at `atLeast` or above, rounded up to a whole epoch (see UnlockRequest). */
  private nextSequenceFloor(atLeast: number): number {
    return Math.max((this.sequenceFloor ?? 0) + sequenceEpochSize, Math.ceil(atLeast / sequenceEpochSize) * sequenceEpochSize)
  }

  /** A key just generated inside the enclave: WARM at once, no unseal needed. Copies `privateKey` and zeroes it. Returns the record as held. */
  addWarm({ record, privateKey }: { record: SealedKeyRecord; privateKey: Uint8Array }): SealedKeyRecord {
    try {
      if (privateKey.length !== 32) throw new RangeError(`private key must be 32 bytes, got ${privateKey.length}`)
      const entry = this.loadEntry(record)
      if (record.state === 'active') this.installPlaintext(entry, privateKey, this.now())
      return entry.record
    } finally {
      // Also when it throws: the caller has handed the key over.
      zero(privateKey)
    }
  }

  /**
   * Seals a key generated inside the enclave under the current DEK and keeps it
   * WARM. With no valid DEK there is nothing to seal with: needs-unlock, and an
   * unlock starts. Copies `privateKey` and zeroes it.
   */
  createKey({ keyId, publicKey, privateKey }: { keyId: string; publicKey: Uint8Array; privateKey: Uint8Array }):
    | { kind: 'ok'; record: SealedKeyRecord }
    | { kind: 'needs-unlock'; retryAfterMs: number } {
    const dek = this.validDek(this.now())
    if (!dek) {
      zero(privateKey)
      return this.needsUnlock()
    }
    const version = 1
    try {
      const sealed = sealPrivateKey({ privateKey, dek: dek.bytes, keyId, version })
      return { kind: 'ok', record: this.addWarm({ record: { keyId, version, state: 'active', publicKey, sealed }, privateKey }) }
    } finally {
      // addWarm zeroes it too; this covers a sealing that throws.
      zero(privateKey)
    }
  }

  /**
   * Seals a key again under the current DEK, one version up, for a DEK
   * rotation: its record may be sealed under the retiring DEK. The new record
   * replaces the held one (a WARM key stays WARM) and is returned for the
   * parent to store. With no valid DEK: needs-unlock, and an unlock starts.
   */
  reseal(keyId: string): { kind: 'ok'; record: SealedKeyRecord } | { kind: 'not-found' } | { kind: 'needs-unlock'; retryAfterMs: number } {
    const entry = this.entries.get(keyId)
    if (!entry) return { kind: 'not-found' }
    const dek = this.validDek(this.now())
    if (!dek) return this.needsUnlock()
    const privateKey = unsealWith(entry.record, dek)
    try {
      const version = entry.record.version + 1
      const sealed = this.bytes.copy(sealPrivateKey({ privateKey, dek: dek.bytes, keyId, version }))
      this.bytes.release(entry.record.sealed)
      entry.record = { ...entry.record, version, sealed }
      return { kind: 'ok', record: entry.record }
    } finally {
      zero(privateKey)
    }
  }

  /**
   * Changes a key's lifecycle state, if `sequence` is current (see `openSequenceEpoch`); a key that stops being
   * active loses its plaintext at once. For a key not held, the sequence is still taken: a LOAD numbered before
   * it, landing after it, is refused as stale (the parent reloads the key, numbered after, from the store).
   */
  setState({ keyId, state, sequence }: { keyId: string; state: KeyState; sequence: number }): SequencedResult | { kind: 'not-found' } {
    const entry = this.entries.get(keyId)
    if (!entry) {
      if (this.inEpoch(sequence) && !this.takenAlready(keyId, sequence)) this.absentKeySequences.set(keyId, sequence)
      return { kind: 'not-found' }
    }
    const stale = this.staleFor(keyId, sequence)
    if (stale) return stale
    // The parent refuses it too; here it holds even against a parent that would not.
    if (entry.record.state === 'archived' && state !== 'archived') return archivedIsFinal
    const wasActive = entry.record.state === 'active'
    entry.record = { ...entry.record, state }
    entry.sequence = sequence
    if (state !== 'active') {
      if (wasActive) this.deactivationMarks.deactivated(keyId)
      this.dropPlaintext(entry)
      this.keysAwaitingUnlock.delete(keyId)
    }
    return applied
  }

  private staleFor(keyId: string, sequence: number): Exclude<SequencedResult, { kind: 'applied' }> | undefined {
    // Its sender must UNLOCK to number in the current epoch; only the parent's UNLOCK opens one, so the cache starts no unlock of its own.
    if (!this.inEpoch(sequence)) return this.retryAfterUnlock()
    return this.takenAlready(keyId, sequence)
  }

  private inEpoch(sequence: number): boolean {
    const floor = this.sequenceFloor
    return floor !== undefined && sequence >= floor && sequence < floor + sequenceEpochSize
  }

  private takenAlready(keyId: string, sequence: number): { kind: 'stale'; reason: string } | undefined {
    const held = this.entries.get(keyId)?.sequence ?? this.absentKeySequences.get(keyId)
    if (held !== undefined && sequence <= held) return { kind: 'stale', reason: `key ${keyId} has taken sequence ${held} already` }
    return undefined
  }

  /** A mark to pass to `activeThroughout` for a signature about to be made. */
  get deactivations(): number {
    return this.deactivationMarks.mark
  }

  /**
   * Whether the key is active and has been since `deactivations` read `mark`: a signature made meanwhile stops
   * here if it was frozen, even if it was unfrozen again before the signature came back.
   */
  activeThroughout(keyId: string, mark: number): boolean {
    return this.entries.get(keyId)?.record.state === 'active' && !this.deactivationMarks.deactivatedSince(keyId, mark)
  }

  get(keyId: string): { record: SealedKeyRecord; cacheState: CacheState } | undefined {
    const entry = this.entries.get(keyId)
    return entry && { record: entry.record, cacheState: this.stateOf(entry, this.now()) }
  }

  /** The private key to sign with now, or why not. Synchronous: it never waits on KMS. */
  acquire(keyId: string): AcquireResult {
    const entry = this.entries.get(keyId)
    if (!entry) return { kind: 'not-found' }
    const { state } = entry.record
    if (state !== 'active') return { kind: 'not-active', state }
    const now = this.now()
    if (isWarm(entry, now)) return this.useWarm(entry, now)
    const dek = this.validDek(now)
    if (dek) return this.useAfterInlineRefresh({ entry, dek, now })
    return this.answerWithoutDek(entry, now)
  }

  /** Renews the DEK before its soft TTL, or fetches one if keys need it and none is held. A timer calls it every few seconds. */
  renewDataKeyIfDue(): void {
    const now = this.now()
    const dek = this.validDek(now)
    if ((!dek || now >= dek.renewAt) && this.hasActiveKeys()) void this.startUnlock()
  }

  /**
   * One step of the pre-warmer's sweep over the keys holding plaintext:
   * refreshes hot keys shortly before their soft TTL and evicts lapsed
   * plaintext, unless grace signatures may still spend it.
   * A step first drops the lapsed plaintext at the front of those keys, so
   * it goes within a step of its hard TTL however many keys are WARM. Then it
   * walks on: it visits at most `maxKeys` keys and schedules at most
   * `maxRefreshes` refreshes (each one an AES-GCM open, run just after the
   * step); the next step resumes there. With many keys no step then holds the
   * event loop for long: 50,000 keys take about 5 ms in one go.
   */
  sweepKeys({ maxKeys = Infinity, maxRefreshes = Infinity }: { maxKeys?: number; maxRefreshes?: number } = {}): void {
    const now = this.now()
    this.dropLapsedAtFront(now, maxKeys)
    this.sweep ??= this.holdingPlaintext.values()
    let refreshes = 0
    for (let visited = 0; visited < maxKeys && refreshes < maxRefreshes; visited++) {
      const next = this.sweep.next()
      if (next.done) {
        this.sweep = undefined
        return
      }
      const entry = next.value
      const { keyId } = entry.record
      // Lapsed plaintext goes first, hot key or not: a refresh may fail for as long as KMS does, and must not keep it meanwhile.
      if (!isWarm(entry, now) && !this.keepsLapsedPlaintextForGrace(entry, now)) this.dropPlaintext(entry)
      if (this.isHot(entry, now) && isDueForRefresh({ entry, now, lowWaterMark: this.config.keyLowWaterMark })) {
        if (this.scheduleRefresh(keyId)) refreshes += 1
      }
    }
  }

  /**
   * Drops the lapsed plaintext at the front of `holdingPlaintext` (past its hard TTL, in install order), visiting at
   * most `maxKeys`. What this misses (a key out of uses, or behind that many kept for grace) the walk that follows
   * finds in its turn.
   */
  private dropLapsedAtFront(now: number, maxKeys: number): void {
    let visited = 0
    for (const entry of this.holdingPlaintext) {
      if (now < entry.hardExpiresAt || visited++ >= maxKeys) return
      if (!this.keepsLapsedPlaintextForGrace(entry, now)) this.dropPlaintext(entry)
    }
  }

  /** Drops every plaintext key, the DEK, all records and the sequence epoch, as a new process has none. Work still in flight lands nowhere. */
  clear(): void {
    this.generation += 1
    this.sequenceFloor = undefined
    this.absentKeySequences.clear()
    this.deactivationMarks.clear()
    // The unlock under way installs nothing now (its generation is gone); the next use starts one of its own.
    this.unlockInFlight = undefined
    this.bytes.clear()
    this.entries.clear()
    this.holdingPlaintext.clear()
    this.keysAwaitingUnlock.clear()
    if (this.dek) this.dropDek(this.dek)
    this.dek = undefined
  }

  /** Keys whose records it holds, in whatever state. */
  get keyCount(): number {
    return this.entries.size
  }

  stats(): KeyCacheStats {
    const now = this.now()
    const keys: Record<CacheState, number> = { WARM: 0, COOL: 0, INVALID: 0 }
    let keysNotActive = 0
    for (const entry of this.entries.values()) {
      if (entry.record.state === 'active') keys[this.stateOf(entry, now)] += 1
      else keysNotActive += 1
    }
    return { keys, keysNotActive, ...this.counters, inlineRefreshMs: { ...this.inlineRefreshMs, buckets: [...this.inlineRefreshMs.buckets] } }
  }

  /**
   * How a grace signature `acquire` handed out ended: given (counted), or not (a freeze meanwhile, a failed sign),
   * when its place in the allowance comes back, audited too. Its caller must settle each one.
   */
  settleGrace(keyId: string, given: boolean): void {
    if (given) {
      this.counters.graceSignatures += 1
      return
    }
    // Capped: a DEK installed meanwhile gave a full allowance back already.
    this.graceLeft = Math.min(this.graceLeft + 1, this.config.graceSignatures)
    this.record({ type: 'grace-signature-withdrawn', keyId, graceLeft: this.graceLeft, at: this.now() })
  }

  /** Resolves once no refresh or unlock is in flight (tests, and draining before shutdown). */
  async idle(): Promise<void> {
    while (this.backgroundWork.size > 0) await Promise.allSettled([...this.backgroundWork])
  }

  private useWarm(entry: KeyEntry, now: number): AcquireResult {
    entry.usesLeft -= 1
    entry.lastUsedAt = now
    if (now >= entry.softExpiresAt || entry.usesLeft < this.config.keyLowWaterMark) {
      this.scheduleRefresh(entry.record.keyId)
    }
    return { kind: 'ok', privateKey: entry.plaintext!, grace: false }
  }

  /** COOL, past hard TTL or out of budget: re-derive now. Throws SealingError if the record will not open. */
  private useAfterInlineRefresh({ entry, dek, now }: { entry: KeyEntry; dek: CachedDek; now: number }): AcquireResult {
    const started = this.monotonicNow()
    const privateKey = this.rederive({ entry, dek, now })
    const elapsedMs = this.monotonicNow() - started
    this.inlineRefreshMs.count += 1
    this.inlineRefreshMs.sum += elapsedMs
    this.inlineRefreshMs.max = Math.max(this.inlineRefreshMs.max, elapsedMs)
    countInto(this.inlineRefreshMs.buckets, rehydrateBucketsMs, elapsedMs)
    if (elapsedMs > this.config.inlineRefreshBudgetMs) this.counters.inlineRefreshOverBudget += 1
    entry.usesLeft -= 1
    entry.lastUsedAt = now
    return { kind: 'ok', privateKey, grace: false }
  }

  /** INVALID: never wait for KMS here. Start the unlock, then sign on grace or send the caller back shortly. */
  private answerWithoutDek(entry: KeyEntry, now: number): AcquireResult {
    void this.startUnlock()
    const { keyId, version } = entry.record
    this.keysAwaitingUnlock.add(keyId)
    // A key idle for a soft TTL gets none, as the sweep keeps no lapsed plaintext for it (see keepsLapsedPlaintextForGrace).
    if (entry.plaintext && this.keepsLapsedPlaintextForGrace(entry, now)) {
      // Audited before it is made: a grace signature nobody can account for is not given (the plaintext stays for one
      // that can be, once the audit sink has room). Counted once given (settleGrace).
      if (!this.record({ type: 'grace-signature', keyId, version, graceLeft: this.graceLeft - 1, at: now })) {
        this.counters.graceRefusedUnaudited += 1
        return this.needsUnlock()
      }
      this.graceLeft -= 1
      entry.lastUsedAt = now
      return { kind: 'ok', privateKey: entry.plaintext, grace: true }
    }
    this.dropPlaintext(entry)
    return this.needsUnlock()
  }

  /** Whether `event` was audited: an audit sink that throws (full, say) fails no caller but a grace signature's. */
  private record(event: KeyCacheAuditEvent): boolean {
    try {
      this.audit(event)
      return true
    } catch {
      return false
    }
  }

  /** Opens the sealed record with the DEK and makes it the key's plaintext, with fresh TTLs and budget. */
  private rederive({ entry, dek, now }: { entry: KeyEntry; dek: CachedDek; now: number }): Uint8Array {
    const { keyId, version } = entry.record
    let privateKey: Uint8Array
    try {
      privateKey = unsealWith(entry.record, dek)
    } catch (error) {
      this.counters.refreshFailures += 1
      this.record({ type: 'refresh-failed', keyId, version, reason: messageOf(error), at: now })
      throw error
    }
    let held: Uint8Array
    try {
      held = this.installPlaintext(entry, privateKey, now)
    } finally {
      // Also when the copy cannot be made (no slab to be had).
      zero(privateKey)
    }
    this.counters.refreshes += 1
    if (now >= dek.softExpiresAt) void this.startUnlock()
    return held
  }

  /**
   * Single-flight per key: a key already being refreshed is not refreshed
   * twice. Nor is one refreshed that cannot be: no DEK, and no unlock to come
   * before the unlock backoff ends (else a hot key's every signature would
   * start, and count, a refresh doomed at once). True if this started one.
   */
  private scheduleRefresh(keyId: string): boolean {
    if (this.refreshesInFlight.has(keyId)) return false
    if (!this.unlockInFlight && this.unlockBackoff.holding && !this.validDek(this.now())) return false
    const refresh = this.refreshInBackground(keyId)
      .catch(() => {}) // counted and audited in rederive; a background refresh has no caller to tell
      .finally(() => this.refreshesInFlight.delete(keyId))
    this.refreshesInFlight.set(keyId, refresh)
    this.track(refresh)
    return true
  }

  private async refreshInBackground(keyId: string): Promise<void> {
    // Read before the yield: a clear() in the turn that asked for this refresh ends it too.
    const generation = this.generation
    // Yield first: the acquire that asked for this refresh returns (and its caller signs) before anything changes.
    await nextTurn()
    if (generation !== this.generation) return
    const entry = this.entries.get(keyId)
    const now = this.now()
    // Frozen, archived or re-derived inline since it was asked for: nothing to refresh, and no unlock to start for it.
    if (!entry || entry.record.state !== 'active' || (isWarm(entry, now) && !isDueForRefresh({ entry, now, lowWaterMark: this.config.keyLowWaterMark }))) return
    const dek = this.validDek(now)
    if (!dek) {
      // Re-derived with every other key waiting on the unlock, in slices (see `warmInSlices`): thousands of refreshes
      // released by one unlock must not each re-derive in the turn it lands, holding the loop as traffic returns.
      this.keysAwaitingUnlock.add(keyId)
      if (!(await this.startUnlock())) this.counters.refreshFailures += 1
      return
    }
    this.rederive({ entry, dek, now })
  }

  /** Single-flight: every caller while an unlock is running shares it. Resolves to whether a DEK was installed. */
  private startUnlock(): Promise<boolean> {
    if (this.unlockInFlight) return this.unlockInFlight
    if (this.unlockBackoff.holding) return Promise.resolve(false)
    const generation = this.generation
    const epoch = this.dekEpoch
    // Deferred by a microtask so even an `unlock` that throws synchronously settles through `finally`.
    const attempt = Promise.resolve()
      .then(() => this.unlock())
      .then(
        (keys) => this.installUnlockedDek(keys, { generation, epoch }),
        () => this.unlockFailed(),
      )
      .finally(() => {
        // Not one started since (after a clear()).
        if (this.unlockInFlight === attempt) this.unlockInFlight = undefined
      })
    this.unlockInFlight = attempt
    this.track(attempt)
    return attempt
  }

  /** Counts a failed unlock and holds the next one back. */
  private unlockFailed(): false {
    this.counters.unlockFailures += 1
    this.unlockBackoff.failed()
    return false
  }

  private installUnlockedDek(keys: DataKeys, { generation, epoch }: { generation: number; epoch: number }): boolean {
    const discard = () => {
      zero(keys.dek)
      if (keys.retiring) zero(keys.retiring)
    }
    if (generation !== this.generation) {
      discard()
      return false
    }
    if (epoch !== this.dekEpoch) {
      // A DEK installed meanwhile is at least as new as this one: keep it, and count this unlock as done. Its setDek
      // warmed the keys waiting then; any waiting since found it lapsed, and wait for the next.
      discard()
      return this.validDek(this.now()) !== undefined
    }
    try {
      this.setDek(keys.dek, keys.retiring)
    } catch {
      discard()
      return this.unlockFailed()
    }
    return true
  }

  private warmKeysAwaitingUnlock(): void {
    const keyIds = [...this.keysAwaitingUnlock]
    this.keysAwaitingUnlock.clear()
    this.track(this.warmInSlices(keyIds))
  }

  /**
   * Re-derives the keys, 256 per event-loop turn (about 10 ms): thousands
   * waiting on one unlock must not hold the loop for a second. A key asked
   * for before its turn comes is re-derived inline by that acquire. A WARM
   * one is re-derived only if it is due for a refresh (a background refresh
   * waited on the unlock for it).
   */
  private async warmInSlices(keyIds: string[]): Promise<void> {
    const generation = this.generation
    for (let from = 0; from < keyIds.length; from += warmSliceSize) {
      if (from > 0) await nextTurn()
      const now = this.now()
      const dek = this.validDek(now)
      if (!dek || generation !== this.generation) return
      for (const keyId of keyIds.slice(from, from + warmSliceSize)) {
        const entry = this.entries.get(keyId)
        if (!entry || entry.record.state !== 'active' || (isWarm(entry, now) && !isDueForRefresh({ entry, now, lowWaterMark: this.config.keyLowWaterMark }))) continue
        try {
          this.rederive({ entry, dek, now })
        } catch {
          // counted and audited in rederive; the key stays COOL and the next acquire reports the error
        }
      }
    }
  }

  /** The DEK if still before its hard TTL; a lapsed one is zeroed and dropped here. */
  private validDek(now: number): CachedDek | undefined {
    if (this.dek && now >= this.dek.hardExpiresAt) {
      this.dropDek(this.dek)
      this.dek = undefined
    }
    return this.dek
  }

  /** Zeroes a cached DEK and its retiring one, but for the buffers in `keep` (being installed again). */
  private dropDek(dek: CachedDek, keep: Array<Uint8Array | undefined> = []): void {
    for (const bytes of [dek.bytes, dek.retiring]) if (bytes && !keep.includes(bytes)) zero(bytes)
  }

  /** Copies `privateKey` into the key's slab view (over the plaintext it had, if any) and returns the view. */
  private installPlaintext(entry: KeyEntry, privateKey: Uint8Array, now: number): Uint8Array {
    entry.plaintext ??= this.bytes.allocate(privateKey.length)
    // To the back, keeping the set in hard-TTL order (see holdingPlaintext).
    this.holdingPlaintext.delete(entry)
    this.holdingPlaintext.add(entry)
    entry.plaintext.set(privateKey)
    const { keySoftTtlMs, keyHardTtlMs, keyUseBudget, prewarmJitter } = this.config
    entry.softExpiresAt = now + keySoftTtlMs
    entry.hardExpiresAt = now + keyHardTtlMs
    entry.prewarmAt = entry.softExpiresAt - this.random() * prewarmJitter * keySoftTtlMs
    entry.usesLeft = keyUseBudget
    return entry.plaintext
  }

  private dropPlaintext(entry: KeyEntry): void {
    if (!entry.plaintext) return
    this.bytes.release(entry.plaintext)
    entry.plaintext = undefined
    this.holdingPlaintext.delete(entry)
  }

  /** `load`, returning the key's entry: the record's bytes copied into the slabs, unless it seals what is held already. */
  private loadEntry(record: SealedKeyRecord): KeyEntry {
    const held = this.entries.get(record.keyId)
    if (held?.record.state === 'active' && record.state !== 'active') this.deactivationMarks.deactivated(record.keyId)
    // An older record keeps the newer sealed bytes held, but its state is the parent's latest word: the
    // parent reads the state from its store in the key's turn, and a DEK rotation may have re-sealed the
    // key here without its store taking the new version.
    if (held && (record.version < held.record.version || sealsSameKey(held.record, record))) {
      held.record = { ...held.record, state: record.state }
      if (record.state !== 'active') this.dropPlaintext(held)
      return held
    }
    // Copies first: one that throws must leave the held entry, and the slab places it points at, as they were.
    const publicKey = this.bytes.copy(record.publicKey)
    let sealed: Uint8Array
    try {
      sealed = this.bytes.copy(record.sealed)
    } catch (error) {
      this.bytes.release(publicKey)
      throw error
    }
    if (held) this.drop(held)
    const entry = coolEntry({ ...record, publicKey, sealed })
    this.entries.set(record.keyId, entry)
    return entry
  }

  /** A key leaving the cache (its record replaced): its plaintext and its record's bytes. */
  private drop(entry: KeyEntry): void {
    this.dropPlaintext(entry)
    this.bytes.release(entry.record.publicKey)
    this.bytes.release(entry.record.sealed)
  }

  private stateOf(entry: KeyEntry, now: number): CacheState {
    if (isWarm(entry, now)) return 'WARM'
    return this.dek && now < this.dek.hardExpiresAt ? 'COOL' : 'INVALID'
  }

  /** Used within the last soft-TTL window: worth keeping warm. */
  private isHot(entry: KeyEntry, now: number): boolean {
    return now - entry.lastUsedAt < this.config.keySoftTtlMs
  }

  /**
   * Lapsed plaintext is only worth keeping while it may still be spent on grace signatures, and only a hot
   * key's: an idle key's would otherwise outlive its hard TTL for as long as KMS stays down.
   */
  private keepsLapsedPlaintextForGrace(entry: KeyEntry, now: number): boolean {
    return this.graceLeft > 0 && !this.validDek(now) && this.isHot(entry, now)
  }

  private hasActiveKeys(): boolean {
    for (const entry of this.entries.values()) if (entry.record.state === 'active') return true
    return false
  }

  /** No DEK to use: one unlock starts (or is already running), and the caller is told to retry after a jittered delay. */
  private needsUnlock(): { kind: 'needs-unlock'; retryAfterMs: number } {
    void this.startUnlock()
    return this.retryAfterUnlock()
  }

  /** A needs-unlock answer, counted, with a jittered retry-after. */
  retryAfterUnlock(): { kind: 'needs-unlock'; retryAfterMs: number } {
    this.counters.needsUnlock += 1
    const { min, max } = this.config.retryAfterMs
    return { kind: 'needs-unlock', retryAfterMs: Math.round(min + this.random() * (max - min)) }
  }

  private track(work: Promise<unknown>): void {
    this.backgroundWork.add(work)
    void work.finally(() => this.backgroundWork.delete(work))
  }
}

const warmSliceSize = 256

/**
 * The record's private key, opened with the DEK, or during a rotation with the retiring one. Throws
 * SealingError if neither opens it, or if it is not the key of the record's public key: the public key
 * comes from the parent's store unsealed, and GET reports its address, so a record whose public key
 * was altered or mixed up with another's must not sign (about 30 µs, once per re-derivation).
 */
function unsealWith(record: SealedKeyRecord, dek: CachedDek): Uint8Array {
  const { keyId, version, sealed } = record
  let privateKey: Uint8Array
  try {
    privateKey = unsealPrivateKey({ sealed, dek: dek.bytes, keyId, version })
  } catch (error) {
    if (!dek.retiring) throw error
    privateKey = unsealPrivateKey({ sealed, dek: dek.retiring, keyId, version })
  }
  let matches = false
  try {
    matches = bytesEqual(secp256k1.publicKeyCreate(privateKey, false), record.publicKey)
  } finally {
    if (!matches) zero(privateKey)
  }
  if (!matches) throw new SealingError(`sealed key ${keyId} v${version} is not the key of its record's public key: the record was altered or mixed with another`)
  return privateKey
}

function isWarm(entry: KeyEntry, now: number): boolean {
  return entry.plaintext !== undefined && now < entry.hardExpiresAt && entry.usesLeft > 0
}

function isDueForRefresh({ entry, now, lowWaterMark }: { entry: KeyEntry; now: number; lowWaterMark: number }): boolean {
  return now >= entry.prewarmAt || entry.usesLeft < lowWaterMark
}

function coolEntry(record: SealedKeyRecord): KeyEntry {
  return { record, plaintext: undefined, softExpiresAt: 0, hardExpiresAt: 0, prewarmAt: 0, usesLeft: 0, lastUsedAt: Number.NEGATIVE_INFINITY, sequence: 0 }
}

const applied: SequencedResult = { kind: 'applied' }
const archivedIsFinal: SequencedResult = { kind: 'archived' }

function sealsSameKey(held: SealedKeyRecord, incoming: SealedKeyRecord): boolean {
  return held.version === incoming.version && bytesEqual(held.sealed, incoming.sealed)
}

function bytesEqual(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && a.every((byte, index) => byte === b[index])
}

function withoutUndefined<T extends object>(values: T): Partial<T> {
  return Object.fromEntries(Object.entries(values).filter(([, value]) => value !== undefined)) as Partial<T>
}

function validated(config: KeyCacheConfig): KeyCacheConfig {
  const fail = (what: string) => {
    throw new RangeError(`KeyCache: ${what}`)
  }
  if (!(config.keySoftTtlMs > 0 && config.keySoftTtlMs <= config.keyHardTtlMs)) fail('need 0 < keySoftTtlMs <= keyHardTtlMs')
  if (!(config.dekSoftTtlMs > 0 && config.dekSoftTtlMs <= config.dekHardTtlMs)) fail('need 0 < dekSoftTtlMs <= dekHardTtlMs')
  if (!(Number.isInteger(config.keyUseBudget) && config.keyUseBudget > 0)) fail('keyUseBudget must be a positive integer')
  if (!(config.keyLowWaterMark >= 0 && config.keyLowWaterMark < config.keyUseBudget)) fail('need 0 <= keyLowWaterMark < keyUseBudget')
  if (!(config.retryAfterMs.min >= 0 && config.retryAfterMs.min <= config.retryAfterMs.max)) fail('need 0 <= retryAfterMs.min <= max')
  if (!(config.prewarmJitter >= 0 && config.prewarmJitter < 1)) fail('prewarmJitter must be in [0, 1)')
  if (!(Number.isInteger(config.graceSignatures) && config.graceSignatures >= 0)) fail('graceSignatures must be a whole number')
  if (!(config.inlineRefreshBudgetMs >= 0)) fail('inlineRefreshBudgetMs must be >= 0')
  return config
}
