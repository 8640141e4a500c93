import { createHash, randomUUID } from 'node:crypto'
import { publicKeyToAddress } from 'viem/accounts'
import { bytesToHex, type Address, type Hex } from 'viem'
import { opcodes, statuses, type Frame, type Opcode } from '../protocol/frames.js'
import {
  decodeAttestResponse,
  decodeCreateResponse,
  decodeErrorMessage,
  decodeGeneratedDataKey,
  decodeGetResponse,
  decodeHealthResponse,
  decodeNeedsUnlock,
  decodeSignResponse,
  decodeUnlockResponse,
  emptyPayload,
  encodeCreateRequest,
  encodeCredentials,
  encodeGetRequest,
  encodeLoadRequest,
  encodeResealRequest,
  encodeSetStateRequest,
  encodeSignRequest,
  encodeUnlockRequest,
  type AttestResponse,
  type AwsCredentials,
  type UnlockRequest,
  type UnlockResponse,
} from '../protocol/messages.js'
import { messageOf } from '../errors.js'
import { FailureBackoff } from '../failureBackoff.js'
import type { CacheState, KeyState, SealedKeyRecord, WrappedDek } from '../types.js'
import { KeyNotStoredError, type BlobStore } from './blobStore.js'
import { EnclavePool, EnclaveUnavailableError, type EnclaveAddress } from './enclavePool.js'
import { EnclaveLogCollector } from './enclaveLogs.js'
import { HashRing } from './hashRing.js'
import { ThrottledLog } from '../throttledLog.js'
import { DeactivationMarks } from '../deactivationMarks.js'
import { waitAtMost } from '../waitAtMost.js'

/** The key must be unlocked first; ask again after `retryAfterMs`. */
export class NeedsUnlockError extends Error {
  constructor(readonly retryAfterMs: number) {
    super('the key needs an unlock; retry shortly')
  }
}
/** An answer from the enclave that is the caller's to act on (unknown key, frozen key, bad request). */
export class OriginRequestError extends Error {
  constructor(
    readonly kind: 'not-found' | 'not-active' | 'bad-request' | 'unavailable',
    message: string,
  ) {
    super(message)
  }
}

/**
 * A sign, get or create refused before it was sent: its enclave was already serving `maxInflightPerEnclave`
 * of them. Nothing was done; ask again after `retryAfterMs` (jittered, 100–300 ms).
 */
export class OverloadedError extends Error {
  readonly retryAfterMs = 100 + Math.floor(Math.random() * 200)
  constructor(enclaveId: string) {
    super(`enclave ${enclaveId} is serving as many signs, gets and creates as it may`)
  }
}

/**
 * A sign or get that had to load its key first did not get the key's turn within the request timeout: a
 * change of the key's state, whose store write has not settled, holds it. No LOAD was sent. The parent's
 * own refusal, not an answer of the enclave's: it says nothing about the enclave's outage.
 */
export class KeyTurnTimeoutError extends Error {}

/**
 * What a standby did with a request it took in its owner's place: signed or got it, refused it (the key frozen, say),
 * or failed it (an internal error; out of service until unlocked; its preload not delivered).
 */
const failoverOutcomes = ['served', 'refused', 'failed'] as const
export type FailoverOutcome = (typeof failoverOutcomes)[number]

/** The enclave answered that it failed (INTERNAL, or a status this parent does not know). */
class EnclaveInternalError extends Error {}

/** The enclave refused a LOAD or SET_STATE: its key took a later one (another parent's: this one numbers each key's in turn). */
class StaleRequestError extends Error {}

/** Whether `error` is an enclave's answer (rather than no answer, or a failure of the parent's own). */
function answeredByEnclave(error: unknown): boolean {
  return error instanceof NeedsUnlockError || error instanceof OriginRequestError || error instanceof EnclaveInternalError || error instanceof StaleRequestError
}

/** How a standby's failed answer to a request it took in its owner's place counts; undefined for no answer, or a failure of the parent's own (a key's turn, a store read), which says nothing of the standby. */
function failoverOutcomeOf(error: unknown): FailoverOutcome | undefined {
  if (!answeredByEnclave(error)) return undefined
  return error instanceof OriginRequestError && error.kind !== 'unavailable' ? 'refused' : 'failed'
}

/** Held back after failing requests, or failing with its one probe out: requests for its keys go elsewhere. */
function heldBack(enclave: Enclave): boolean {
  return enclave.outage.holding || (enclave.outage.failing && enclave.probing)
}

/**
 * A request failed for want of the enclave: one hold per outage, however many requests it failed at once.
 * `failuresAtSend` (the enclave's `outageFailures` when the request went out): a request sent before the
 * last counted failure was part of that one, though its timeout may land after the hold; counting it would
 * lengthen the next hold for a failure already counted.
 */
function outageFailed(enclave: Enclave, failuresAtSend: number): void {
  if (enclave.outage.holding || failuresAtSend !== enclave.outageFailures) return
  enclave.outage.failed()
  enclave.outageFailures += 1
}

/** The enclave answered: its outage, if any, is over. */
function outageOver(enclave: Enclave): void {
  if (enclave.outage.failing) enclave.outage.succeeded()
}

type Enclave = {
  id: string
  pool: EnclavePool
  /** The plain unlock in flight, which callers share. */
  unlocking: Promise<void> | undefined
  /** The last UNLOCK sent or queued: each waits for the one before. */
  unlockQueue: Promise<unknown>
  /** After failed unlocks that NEEDS_UNLOCK answers started, those answers start none for a while (a monotonic clock). */
  unlockBackoff: FailureBackoff
  /**
   * Not in service: it could not be unlocked and loaded at start (or lost
   * the parent mid-load). It may be down, or alive with another DEK and
   * records from before, states since changed among them. Its keys fail
   * over to other enclaves, and creates pass it over, until a sync
   * (`syncing`: an unlock with the stored DEK, then every key it owns
   * reloaded in turn) succeeds. Requests for its keys start one, not more
   * often than `syncBackoff` allows after failures.
   */
  unsynced: boolean
  syncing: Promise<void> | undefined
  syncBackoff: FailureBackoff
  /**
   * Held back after its requests failed for want of it (no connection, no
   * answer in time): meanwhile its keys go straight to a standby, so a hung
   * enclave costs one request timeout per hold, not one per request. After
   * a hold, one request at a time probes it (`probing`); the others still
   * go to a standby until a probe succeeds.
   */
  outage: FailureBackoff
  /** Failures counted toward `outage` so far (see outageFailed). */
  outageFailures: number
  probing: boolean
  /** The last sequence sent there (see LoadRequest), and how many epochs this parent's UNLOCKs have opened there. */
  lastSequence: number
  epochsOpened: number
  /** Signs, gets and creates being served there now (see `maxInflightPerEnclave`). */
  admitted: number
}

/** An enclave serving another's key, and whether the key's stored record was loaded into it. */
type Standby = { enclave: Enclave; stored: boolean }
/** The first NEEDS_UNLOCK a request's standbys answered its key's load with (see `onStandbys`). */
type Unlocking = { first?: NeedsUnlockError }

/** An enclave's part of `/healthz`; `held`: it answered, but is held back after failing requests. */
export type EnclaveHealth = { id: string; answered: boolean; ok: boolean; held?: boolean; inflight: number; admitted: number; stats?: Record<string, unknown>; error?: string }

/** Why a preload enclave serves none of its accounts (its file not loaded yet, or refused), from its HEALTH stats; undefined when it serves them or is no preload enclave. */
export function preloadRefusalOf({ stats }: Pick<EnclaveHealth, 'stats'>): string | undefined {
  const refusal = (stats?.preload as { refusal?: unknown } | undefined)?.refusal
  return typeof refusal === 'string' ? refusal : undefined
}

export type KeyInfo = { keyId: string; publicKey: Hex; address: Address; state: KeyState; cacheState?: CacheState }

/**
 * The parent's core: routes each key id to one enclave (consistent hashing),
 * keeps sealed records durable before anything is acknowledged, and brokers
 * unlocks. It never sees a plaintext key.
 */
export class OriginParent {
  private readonly enclaves: Enclave[]
  private readonly ring: HashRing<Enclave>

  constructor(
    private readonly options: {
      enclaves: Array<{ id: string; address: EnclaveAddress }>
      poolSize: number
      store: BlobStore
      requestTimeoutMs: number
      /**
       * For UNLOCK and GENERATE_DATA_KEY, which wait on KMS (two attempts of
       * the enclave's KMS_TIMEOUT_MS) and a preload: longer than the rest, so
       * the parent does not report a failure the enclave then turns into a
       * success; default 15 s.
       */
      kmsRequestTimeoutMs?: number
      /** The AWS credentials the enclaves' KMS calls sign with (an enclave has no source of its own). */
      credentials: () => Promise<AwsCredentials>
      /** How often every enclave gets them again, so they never sign with expired ones; default 5 min. */
      credentialRefreshMs?: number
      log?: (fields: Record<string, unknown>) => void
      /** The monotonic clock, in ms, that the unlock, sync and outage backoffs run on (tests hold it still). */
      monotonicNow?: () => number
      /**
       * Signs, gets and creates served by one enclave at once, beyond which more are refused before they are
       * sent (OverloadedError); default 1024. Without it, load beyond what the enclave signs queues until
       * requests time out while it signs for ones already given up on, and every caller waits. Per enclave,
       * so that one stalled enclave does not take the others' places. Operators' requests, the parent's own
       * (loads, re-seals, unlocks) and health checks are neither counted nor refused: a freeze must get
       * through when the enclave is busiest, and a rotation must not shed signs.
       */
      maxInflightPerEnclave?: number
      /**
       * How long a create or a state change waits for the store to confirm its write: a create from the
       * write, a state change from the call (its wait for the key's turn included); default 10 s. Past it the
       * caller is answered 503 at once, rather than held for as long as a hung disk or S3 holds the write; the
       * write goes on, in the key's turn, and may still take effect. Also how long each read of the store outside a sign, get or
       * unlock (at start, in a sync, a rotation or a state change: a key's record, the wrapped data key, a listing's next
       * record) waits before it fails.
       */
      storeTimeoutMs?: number
      /**
       * How often each enclave's log lines are collected (LOGS) and written to `log`, with `source: "enclave"`;
       * unset, never (as in tests whose scripted enclaves know no LOGS).
       */
      logPollMs?: number
    },
  ) {
    const backoff = () => new FailureBackoff({ now: options.monotonicNow ?? (() => performance.now()), random: Math.random })
    this.enclaves = options.enclaves.map(({ id, address }) => ({ id, pool: new EnclavePool({ address, size: options.poolSize }), unlocking: undefined, unlockQueue: Promise.resolve(), unlockBackoff: backoff(), unsynced: false, syncing: undefined, syncBackoff: backoff(), outage: backoff(), outageFailures: 0, probing: false, lastSequence: 0, epochsOpened: 0, admitted: 0 }))
    this.ring = new HashRing(this.enclaves.map((enclave) => ({ id: enclave.id, node: enclave })))
    // Every pair's series from the start, at 0: a rate over a series that is not there yet reads "no data", not 0.
    for (const owner of this.enclaves) {
      for (const standby of this.enclaves) {
        if (standby === owner) continue
        for (const outcome of failoverOutcomes) this.failoverCounts.set(`${owner.id} ${standby.id} ${outcome}`, { enclave: owner.id, standby: standby.id, outcome, count: 0 })
      }
    }
  }

  private credentialRefresh: ReturnType<typeof setInterval> | undefined
  private logPoll: ReturnType<typeof setInterval> | undefined
  /** Creates whose record is not yet written (answered or not): a DEK rotation waits for those sealed under the old DEK. */
  private readonly creating = new Set<Promise<unknown>>()
  /** The last state change or re-seal per key: each waits for the one before, so neither undoes the other in the store. */
  private readonly keyWork = new Map<string, Promise<unknown>>()
  private rotating: Promise<{ resealed: number }> | undefined
  /** Reloads queued or running, per enclave and key; `begun` once the key's turn has come. */
  private readonly reloads = new Map<string, { done: Promise<boolean>; begun: Promise<void> }>()
  /** Keys whose enclave may have missed a state change (its SET_STATE failed): reloaded before their next use. */
  private readonly unsyncedKeys = new Set<string>()
  /**
   * Freezes and archives. The owner's own re-check stops the SIGNs it has not answered when it applies one, but not
   * a SIGN out on a standby's copy, nor any when the change is deferred (the owner held back or out of service): a
   * signature whose key had one while it was out is refused, even if an unfreeze followed.
   */
  private readonly deactivations = new DeactivationMarks()
  /** Creates and state changes answered 503 by `storeConfirmed` whose writes have not settled yet (see `storeHealth`). */
  private unconfirmedWrites = 0
  private get storeTimeoutMs(): number {
    return this.options.storeTimeoutMs ?? 10_000
  }
  /** The health check out now, which callers share (see `health`). */
  private healthAsked: Promise<EnclaveHealth[]> | undefined
  /** Signs and gets that another enclave took in their owner's place: one log line per pair of enclaves every 10 s, and a count per pair and outcome. */
  private readonly failoverLog = new ThrottledLog({ log: (fields) => this.options.log?.(fields) })
  private readonly failoverCounts = new Map<string, { enclave: string; standby: string; outcome: FailoverOutcome; count: number }>()

  /**
   * A LOAD or SET_STATE under the enclave's next sequence (see LoadRequest).
   * NEEDS_UNLOCK means it was numbered outside the enclave's current epoch.
   * When an UNLOCK of this parent's opened a new one meanwhile (its answer
   * perhaps not read yet: those sent are waited for, within the request
   * timeout), it goes once more, numbered in that. Otherwise (the enclave
   * restarted, an UNLOCK answer was lost, another parent unlocked it) it is
   * answered as any NEEDS_UNLOCK is (`check`): an unlock starts, and the
   * caller retries.
   */
  private async sequenced(enclave: Enclave, opcode: Opcode, encode: (sequence: number) => Uint8Array): Promise<Frame> {
    const send = () => this.call(enclave, opcode, encode(++enclave.lastSequence))
    const opened = enclave.epochsOpened
    const frame = await send()
    if (frame.status !== statuses.NEEDS_UNLOCK) return frame
    await this.withinTimeout(enclave.unlockQueue, 'waiting for an unlock').catch(() => {})
    return enclave.epochsOpened !== opened ? send() : frame
  }

  /** Whether the enclave serves as many signs, gets and creates as it may. */
  private full(enclave: Enclave): boolean {
    return enclave.admitted >= (this.options.maxInflightPerEnclave ?? 1_024)
  }

  /** `work` (a sign, get or create there) counted as one of the enclave's; refused at once when it is full. */
  private async admitted<T>(enclave: Enclave, work: () => Promise<T>): Promise<T> {
    if (this.full(enclave)) throw new OverloadedError(enclave.id)
    enclave.admitted += 1
    try {
      return await work()
    } finally {
      enclave.admitted -= 1
    }
  }

  private async call(enclave: Enclave, opcode: Opcode, payload: Uint8Array): Promise<Frame> {
    const waitsOnKms = opcode === opcodes.UNLOCK || opcode === opcodes.GENERATE_DATA_KEY
    return enclave.pool.request({ opcode, payload, timeoutMs: waitsOnKms ? (this.options.kmsRequestTimeoutMs ?? 15_000) : this.options.requestTimeoutMs })
  }

  /** Non-OK statuses as errors; NEEDS_UNLOCK also starts that enclave's unlock at once. */
  private check(enclave: Enclave, frame: Frame): Frame {
    switch (frame.status) {
      case statuses.OK:
        return frame
      case statuses.NEEDS_UNLOCK:
        this.unlockOnDemand(enclave)
        throw new NeedsUnlockError(decodeNeedsUnlock(frame.payload).retryAfterMs)
      case statuses.NOT_FOUND:
        throw new OriginRequestError('not-found', decodeErrorMessage(frame.payload))
      case statuses.NOT_ACTIVE:
        throw new OriginRequestError('not-active', decodeErrorMessage(frame.payload))
      case statuses.BAD_REQUEST:
        throw new OriginRequestError('bad-request', decodeErrorMessage(frame.payload))
      case statuses.UNAVAILABLE:
      // Not a stored key (`callReloading` found no record): perhaps a preloaded account, not served yet.
      case statuses.NOT_FOUND_PRELOAD_NOT_SERVED:
        throw new OriginRequestError('unavailable', decodeErrorMessage(frame.payload))
      case statuses.STALE:
        throw new StaleRequestError(`the enclave refused a stale request: ${decodeErrorMessage(frame.payload)}`)
      default:
        throw new EnclaveInternalError(`enclave error: ${decodeErrorMessage(frame.payload)}`)
    }
  }

  /**
   * Makes sure a data key exists (the first enclave that answers has KMS
   * generate one; only its wrapped form is stored), then connects to and
   * unlocks every enclave and loads each stored key into the enclave that
   * owns it. An enclave that cannot be reached or unlocked, or drops out
   * while its keys load, is logged and left out of service (`unsynced`)
   * until a later sync succeeds; a record that will not load is logged and
   * its key tried again at each use. Refuses to start only when no enclave
   * could be started. A start that fails leaves no timer behind.
   */
  async start(): Promise<void> {
    try {
      await this.startServing()
    } catch (error) {
      // The process exits then; an embedder's would go on, polling enclaves for a parent that never served.
      clearInterval(this.credentialRefresh)
      clearInterval(this.logPoll)
      throw error
    }
  }

  private async startServing(): Promise<void> {
    this.credentialRefresh = setInterval(() => {
      for (const enclave of this.enclaves) {
        this.deliverCredentials(enclave).catch((error: unknown) =>
          this.options.log?.({ level: 'warn', event: 'credential_delivery_failed', enclave: enclave.id, error: messageOf(error) }),
        )
      }
    }, this.options.credentialRefreshMs ?? 300_000)
    this.credentialRefresh.unref()
    const { log, logPollMs } = this.options
    if (log && logPollMs) {
      // A LOGS request counts toward the enclave's outage as any request does. While the enclave is held back none
      // is sent (each would open a connection to an enclave out of reach); the outage's probe, a request's or
      // a LOGS request's once the hold ends, says when it is back.
      const ask = async (enclave: Enclave, payload: Uint8Array) => {
        if (heldBack(enclave)) throw new EnclaveUnavailableError(`enclave ${enclave.id} is held back after failing requests`)
        return this.check(enclave, await this.tracked(enclave, () => this.call(enclave, opcodes.LOGS, payload))).payload
      }
      const collectors = this.enclaves.map((enclave) => new EnclaveLogCollector({ enclave: enclave.id, log, ask: (payload) => ask(enclave, payload) }))
      this.logPoll = setInterval(() => {
        for (const collector of collectors) void collector.poll()
      }, logPollMs)
      this.logPoll.unref()
    }
    if (!(await this.storedWrappedDek())) {
      // A new DEK would seal nothing that exists: every stored key stays under the lost one, and new keys would join them unopenable by it.
      if (await this.storeHoldsAnyRecord()) {
        throw new Error('the store holds sealed keys but no wrapped data key: refusing to make a new data key, under which none of them would open. Restore the wrapped data key (dek.json, or the disk log with its data-keys.log from one backup) before starting')
      }
      await this.options.store.putWrappedDek({ keyId: 'enclave-data-key', ciphertext: await this.generateFirstDataKey() }, undefined)
    }
    const failures = new Map<Enclave, string>()
    const leaveOut = (enclave: Enclave, error: unknown) => {
      enclave.unsynced = true
      failures.set(enclave, messageOf(error))
      this.options.log?.({ level: 'warn', event: 'enclave_not_started', enclave: enclave.id, error: messageOf(error) })
    }
    await Promise.all(
      this.enclaves.map(async (enclave) => {
        try {
          await enclave.pool.connect()
          await this.unlock(enclave)
        } catch (error) {
          leaveOut(enclave, error)
        }
      }),
    )
    const refuseIfNoneStarted = () => {
      if (failures.size < this.enclaves.length) return
      throw new Error(`no enclave could be started: ${[...failures].map(([enclave, error]) => `${enclave.id}: ${error}`).join('; ')}`)
    }
    refuseIfNoneStarted()
    const started = this.enclaves.filter((enclave) => !enclave.unsynced)
    const droppedOut = await this.loadOwnedKeys({ owners: started, load: (record) => this.load(record) })
    for (const [enclave, error] of droppedOut) leaveOut(enclave, error)
    refuseIfNoneStarted()
  }

  /**
   * Loads every stored key that one of `owners` owns, with `load`. A record
   * that fails is logged and its key marked, to be tried again before each
   * use. An owner out of reach for a record twice in a row, or wanting an
   * unlock (it restarted meanwhile), is skipped from then on, and returned
   * with the error.
   */
  private async loadOwnedKeys({ owners, load }: { owners: Enclave[]; load: (record: SealedKeyRecord) => Promise<unknown> }): Promise<Map<Enclave, unknown>> {
    const outOfReach = new Map<Enclave, unknown>()
    await this.forEachStored(async (record) => {
      const enclave = this.ring.nodeFor(record.keyId)
      if (!owners.includes(enclave) || outOfReach.has(enclave)) return
      try {
        // Once more before giving the enclave up: one timed-out LOAD among hundreds is not an outage. Should
        // the first land after all, later, it is refused: the retry is numbered above it.
        await load(record).catch(async (error: unknown) => {
          if (!(error instanceof EnclaveUnavailableError) || outOfReach.has(enclave)) throw error
          await load(record)
        })
      } catch (error) {
        if (error instanceof EnclaveUnavailableError || error instanceof NeedsUnlockError) return void outOfReach.set(enclave, error)
        this.unsyncedKeys.add(record.keyId)
        this.options.log?.({ level: 'error', event: 'key_not_loaded', keyId: record.keyId, enclave: enclave.id, error: messageOf(error) })
      }
    })
    return outOfReach
  }

  /** A new DEK's wrapped form, from the first enclave that makes one (each asks KMS through its own unlock). */
  private async generateFirstDataKey(): Promise<Uint8Array> {
    const failures: string[] = []
    for (const enclave of this.enclaves) {
      try {
        return newWrappedDek((await this.sendUnlock(enclave, () => ({ wrappedDek: new Uint8Array() }))).wrappedDek)
      } catch (error) {
        failures.push(`${enclave.id}: ${messageOf(error)}`)
      }
    }
    throw new Error(`no enclave could make the first data key: ${failures.join('; ')}`)
  }

  private async storeHoldsAnyRecord(): Promise<boolean> {
    for await (const _ of this.storedRecords()) return true
    return false
  }

  /**
   * The store's reads, each bounded (by `storeTimeoutMs` unless given): a hung read must not hold a key's turn, a
   * sync, a rotation or an unlock for ever.
   */
  private storedRecord(keyId: string, timeoutMs = this.storeTimeoutMs): Promise<SealedKeyRecord | undefined> {
    return this.withinTimeout(this.options.store.get(keyId), `reading key ${keyId}'s stored record`, { timeoutMs })
  }

  private storedWrappedDek(timeoutMs = this.storeTimeoutMs): Promise<WrappedDek | undefined> {
    return this.withinTimeout(this.options.store.getWrappedDek(), 'reading the wrapped data key', { timeoutMs })
  }

  /**
   * The store's records, each wait for the next bounded by `storeTimeoutMs`: a listing that stops answering
   * fails the start, sync or rotation reading it (a sync is tried again after its backoff) rather than hold it
   * for ever. One watchdog per listing, not a timer per record: a listing is read 50,000 records at a go.
   */
  private async *storedRecords(): AsyncGenerator<SealedKeyRecord> {
    const listing = this.options.store.list()[Symbol.asyncIterator]()
    const timeoutMs = this.storeTimeoutMs
    /** When the wait for the next record began, and how to fail it; undefined while the caller has one (its own work is not the store's). */
    let waiting: { since: number; stalled: (error: Error) => void } | undefined
    const watchdog = setInterval(() => {
      if (waiting !== undefined && performance.now() - waiting.since > timeoutMs) waiting.stalled(new Error(`reading the store's records took longer than ${timeoutMs} ms`))
    }, timeoutMs / 4)
    let ended = false
    try {
      for (;;) {
        // A promise per wait, not one race against a single stall promise: each race would leave that promise a
        // reaction holding its record, so a listing would keep every record it has yielded until it ended.
        const next = await new Promise<IteratorResult<SealedKeyRecord>>((resolve, reject) => {
          waiting = { since: performance.now(), stalled: reject }
          listing.next().then(resolve, reject)
        })
        waiting = undefined
        if (next.done) {
          ended = true
          return
        }
        yield next.value
      }
    } finally {
      clearInterval(watchdog)
      // Left early (a caller that had enough, a listing that stalled): the store may end its listing.
      if (!ended) void Promise.resolve().then(() => listing.return?.()).catch(() => {})
    }
  }

  /**
   * Runs `work` for every stored record, 256 at a time. Resolves to how many
   * there were; rejects with the first failure, once nothing it started still runs.
   */
  private async forEachStored(work: (record: SealedKeyRecord) => Promise<unknown>): Promise<number> {
    let count = 0
    const running: Promise<unknown>[] = []
    const settle = async () => {
      const failed = (await Promise.allSettled(running.splice(0))).find((result) => result.status === 'rejected')
      if (failed) throw failed.reason
    }
    try {
      for await (const record of this.storedRecords()) {
        count += 1
        const job = work(record)
        // Marked handled now: a job can fail while the listing waits for its next page (S3), long before
        // settle() looks, and an unhandled rejection ends the process. settle() still sees the failure.
        job.catch(() => {})
        running.push(job)
        if (running.length >= 256) await settle()
      }
    } catch (error) {
      // The listing failed partway (an S3 page that would not come): what it started still runs; the
      // failure to report is the listing's.
      await Promise.allSettled(running.splice(0))
      throw error
    }
    await settle()
    return count
  }

  /** Hands a stored record to the enclave that owns its key (or to `enclave`). */
  private async load(record: SealedKeyRecord, enclave = this.ring.nodeFor(record.keyId)): Promise<Enclave> {
    const request = (sequence: number) => {
      try {
        return encodeLoadRequest({ ...record, sequence })
      } catch (error) {
        // A stored record the wire cannot carry (a damaged or hand-edited one): say which.
        throw new Error(`key ${record.keyId}: its stored record cannot be loaded: ${messageOf(error)}`)
      }
    }
    this.check(enclave, await this.sequenced(enclave, opcodes.LOAD, request))
    return enclave
  }

  /**
   * Re-seals every key under a new DEK from KMS, then forgets the old one.
   * Each step is durable before the next, so a crash anywhere loses nothing
   * and a new call resumes (see the README's DEK rotation). Keys sign
   * throughout. One rotation at a time; a second call joins the first.
   */
  rotateDataKey(): Promise<{ resealed: number }> {
    this.rotating ??= this.rotate().finally(() => {
      this.rotating = undefined
    })
    return this.rotating
  }

  private async rotate(): Promise<{ resealed: number }> {
    const { store } = this.options
    let wrapped = await this.storedWrappedDek()
    if (!wrapped) throw new OriginRequestError('unavailable', 'no data key stored yet')
    if (!wrapped.retiring) {
      // 1. A new DEK, durable (with the old one as retiring) before any enclave seals with it.
      const first = this.enclaves[0]!
      await this.deliverCredentials(first)
      const frame = this.check(first, await this.call(first, opcodes.GENERATE_DATA_KEY, emptyPayload))
      const replacing = wrapped
      wrapped = { keyId: wrapped.keyId, ciphertext: newWrappedDek(decodeGeneratedDataKey(frame.payload)), retiring: { keyId: wrapped.keyId, ciphertext: wrapped.ciphertext } }
      await store.putWrappedDek(wrapped, replacing)
    }
    // 2. Every enclave seals with the new DEK and still opens with the old; creates sealed before that land first.
    await this.unlockWithStored()
    await Promise.allSettled([...this.creating])
    // 3. Every stored key, sealed again, one version up. Then each enclave holds what the store holds.
    const wrappedDekSha256 = createHash('sha256').update(wrapped.ciphertext).digest()
    const resealed = await this.forEachStored((record) => this.reseal({ keyId: record.keyId, wrappedDekSha256 }))
    // An enclave that restarted meanwhile may have reloaded a record older than the store's: the latest, per key, in turn with
    // state changes. One that wants an unlock first (it restarted again) gets the key before its next use (`reload` marks it).
    await this.forEachStored((record) =>
      this.reloadInTurn(record.keyId).catch((error: unknown) => {
        if (!(error instanceof NeedsUnlockError)) throw error
      }),
    )
    // 4. The old DEK is forgotten: in the store, then in every enclave.
    await store.putWrappedDek({ keyId: wrapped.keyId, ciphertext: wrapped.ciphertext }, wrapped)
    await this.unlockWithStored()
    return { resealed }
  }

  /** Unlocks every enclave with what the store holds now: an unlock already running may have read it before it changed. */
  private async unlockWithStored(): Promise<void> {
    await Promise.all(
      this.enclaves.map(async (enclave) => {
        await enclave.unlocking?.catch(() => {})
        await this.unlock(enclave)
      }),
    )
  }

  /** The key's stored record, sealed again by its enclave under the rotation's DEK, stored back with the state it has by then. */
  private reseal({ keyId, wrappedDekSha256 }: { keyId: string; wrappedDekSha256: Uint8Array }): Promise<void> {
    return this.serializeKey(keyId, async () => {
      const stored = await this.storedRecord(keyId)
      if (!stored) return
      const enclave = this.ring.nodeFor(keyId)
      // The record from the store, not the enclave's copy: an enclave that restarted may hold an older one, or none.
      const request = async () => {
        await this.load(stored, enclave)
        return this.check(enclave, await this.call(enclave, opcodes.RESEAL, encodeResealRequest({ keyId, wrappedDekSha256 })))
      }
      // An enclave that restarted meanwhile has no DEK, or not the rotation's, and takes no LOAD before an
      // UNLOCK: unlock it (with both DEKs, from the store) and start again.
      const frame = await request()
        .catch(async (error: unknown) => {
          if (!(error instanceof NeedsUnlockError)) throw error
          await this.unlock(enclave)
          return request()
        })
        .catch((error: unknown) => {
          // The enclave's answer about this key (lost in a restart, say) is no answer to the rotation's caller: not a
          // 404 or 409 of theirs, but a rotation that did not finish, which the next call resumes.
          throw error instanceof OriginRequestError ? new Error(`key ${keyId} was not re-sealed (${error.message}); rotate again to resume`) : error
        })
      const resealed = decodeCreateResponse(frame.payload)
      await this.options.store.put({ ...stored, version: resealed.version, sealed: resealed.sealed })
    })
  }

  private serializeKey<T>(keyId: string, work: () => Promise<T>): Promise<T> {
    const run = (this.keyWork.get(keyId) ?? Promise.resolve()).catch(() => {}).then(work)
    const settled = run.catch(() => {})
    this.keyWork.set(keyId, settled)
    void settled.then(() => {
      if (this.keyWork.get(keyId) === settled) this.keyWork.delete(keyId)
    })
    return run
  }

  /** Each enclave's delivery recipient and the attestation document binding it (empty without attestation). */
  async attestations(): Promise<Array<{ id: string } & AttestResponse>> {
    return Promise.all(
      this.enclaves.map(async (enclave) => ({ id: enclave.id, ...decodeAttestResponse(this.check(enclave, await this.call(enclave, opcodes.ATTEST, emptyPayload)).payload) })),
    )
  }

  /**
   * Delivers the preload file's age identity to every enclave (preload mode),
   * with the data key: sealed to each enclave's own recipient, one per enclave
   * id. The parent cannot open them.
   */
  async unlockWithSealedPreloadIdentities(sealed: ReadonlyMap<string, Uint8Array>): Promise<void> {
    const unknown = [...sealed.keys()].filter((id) => !this.enclaves.some((enclave) => enclave.id === id))
    const missing = this.enclaves.filter((enclave) => !sealed.has(enclave.id)).map((enclave) => enclave.id)
    if (unknown.length > 0 || missing.length > 0) {
      throw new OriginRequestError('bad-request', `a sealed preload identity is needed for each enclave: ${[...missing.map((id) => `none for ${id}`), ...unknown.map((id) => `no enclave ${id}`)].join(', ')}`)
    }
    await Promise.all(this.enclaves.map((enclave) => this.sendUnlock(enclave, (stored) => ({ ...storedDataKeys(stored), sealedPreloadIdentity: sealed.get(enclave.id)! }))))
  }

  /**
   * UNLOCKs to one enclave go one at a time, each built from the store as it
   * is when its turn comes: a later one never carries an older DEK than an
   * earlier one (which, mid-rotation, would have the enclave seal under a DEK
   * about to be dropped). Fresh credentials first, for the KMS calls it makes.
   */
  private sendUnlock(enclave: Enclave, build: (stored: WrappedDek | undefined) => Omit<UnlockRequest, 'sequenceFloorAtLeast'>): Promise<UnlockResponse> {
    const turn = enclave.unlockQueue
      .catch(() => {})
      .then(async () => {
        // Bounded, as the call itself is: a hung store read must not hold every later UNLOCK.
        const stored = await this.storedWrappedDek(this.options.requestTimeoutMs)
        // The epoch it opens starts above every sequence this parent has used there, whatever the enclave process.
        const request = { ...build(stored), sequenceFloorAtLeast: enclave.lastSequence + 1 }
        await this.deliverCredentials(enclave)
        const answer = decodeUnlockResponse(this.check(enclave, await this.call(enclave, opcodes.UNLOCK, encodeUnlockRequest(request))).payload)
        // This parent's LOADs and SET_STATEs are numbered in the epoch it opened now (or on, for any numbered there already).
        enclave.lastSequence = Math.max(enclave.lastSequence, answer.sequenceFloor - 1)
        enclave.epochsOpened += 1
        return answer
      })
    enclave.unlockQueue = turn
    return turn
  }

  /**
   * `work`, or a rejection naming `what` once `timeoutMs` (the request timeout unless given) has passed: an
   * Error, or what `timedOut` makes of the message.
   */
  private async withinTimeout<T>(work: Promise<T>, what: string, { timeoutMs = this.options.requestTimeoutMs, timedOut = (message: string): Error => new Error(message) } = {}): Promise<T> {
    const waited = await waitAtMost(work, { ms: timeoutMs })
    if ('value' in waited) return waited.value
    throw timedOut(`${what} took longer than ${timeoutMs} ms`)
  }

  private async deliverCredentials(enclave: Enclave): Promise<void> {
    const credentials = await this.withinTimeout(this.options.credentials(), 'getting AWS credentials').catch((error: unknown) => {
      throw new OriginRequestError('unavailable', `no AWS credentials to give the enclave: ${messageOf(error)}`)
    })
    this.check(enclave, await this.call(enclave, opcodes.CREDENTIALS, encodeCredentials(credentials)))
  }

  /**
   * The unlock a NEEDS_UNLOCK answer asks for: at once, unless the last ones
   * failed; then not before a backoff of 0.5 s doubling to 30 s, jittered.
   * Operators' and rotations' unlocks are never held back.
   */
  private unlockOnDemand(enclave: Enclave): void {
    if (enclave.unlocking || enclave.unlockBackoff.holding) return
    this.unlock(enclave).catch((error: unknown) => {
      const retryInMs = Math.round(enclave.unlockBackoff.failed())
      this.options.log?.({ level: 'warn', event: 'unlock_failed', enclave: enclave.id, retryInMs, error: messageOf(error) })
    })
  }

  /** One unlock per enclave at a time: the enclave unwraps the stored DEK through KMS. */
  unlock(enclave?: Enclave): Promise<void> {
    if (!enclave) return Promise.all(this.enclaves.map((e) => this.unlock(e))).then(() => undefined)
    enclave.unlocking ??= this.sendUnlock(enclave, (stored) => {
      if (!stored) throw new Error('no data key stored yet')
      return storedDataKeys(stored)
    })
      // Whoever asked for it: an enclave that unlocked owes no backoff.
      .then(() => enclave.unlockBackoff.succeeded())
      .finally(() => {
        enclave.unlocking = undefined
      })
    return enclave.unlocking
  }

  /**
   * The caller's answer to `work`, which calls `storing(what)` when it turns to the store (naming what it stores,
   * as the answer and the log will) and `confirmed()` once the store has its writes. If that has not happened `storeTimeoutMs` after `storing()`, the caller is
   * answered 503 without waiting longer. The work goes on (holding its key's turn, so nothing overtakes its
   * writes) and may still take effect, which the answer says. Its own timer, not `waitAtMost`: the wait starts at
   * `storing()`, partway through the work, and `confirmed()` ends it before the work does.
   */
  private storeConfirmed<T>(work: (store: { storing: (what: string) => void; confirmed: () => void }) => Promise<T>, detailsOf: (result: T) => Record<string, unknown> = () => ({})): Promise<T> {
    const timeoutMs = this.storeTimeoutMs
    let timer: ReturnType<typeof setTimeout> | undefined
    /** What `storing` named; read only once it has been called (a timer runs, or the work ended late). */
    let what = ''
    let late = false
    let notConfirmed!: (error: Error) => void
    const timedOut = new Promise<never>((_, reject) => (notConfirmed = reject))
    const storing = (stored: string) => {
      what = stored
      timer ??= setTimeout(() => {
        late = true
        this.unconfirmedWrites += 1
        this.options.log?.({ level: 'warn', event: 'store_not_confirmed', what, timeoutMs })
        notConfirmed(new OriginRequestError('unavailable', `${what} was not confirmed durable within ${timeoutMs} ms; it may still take effect`))
      }, timeoutMs)
    }
    const done = work({ storing, confirmed: () => clearTimeout(timer) })
    // How it ends after its caller was answered, for the operator who was told "may still take effect".
    const endedLate = (fields: Record<string, unknown>) => {
      if (!late) return
      this.unconfirmedWrites -= 1
      this.options.log?.({ level: 'warn', what, ...fields })
    }
    done.then(
      (result) => endedLate({ event: 'store_confirmed_late', ...detailsOf(result) }),
      (error: unknown) => endedLate({ level: 'error', event: 'store_write_failed_late', error: messageOf(error) }),
    )
    // Race subscribes to both, so whichever settles second is handled too.
    return Promise.race([done, timedOut]).finally(() => clearTimeout(timer))
  }

  /**
   * Creates a key inside its enclave; answers only once the sealed record is durable. `storeTimeoutMs` counts
   * from the record's write, not the call: enclaves that are slow to make the key are no sign of the store's.
   * Refused at once while writes answered 503 are still out: each create would wait the store out too, and
   * leave one more key in its enclave that no record holds yet. (State changes still queue: a freeze must be
   * tried.)
   */
  createKey(): Promise<KeyInfo> {
    if (this.unconfirmedWrites > 0) {
      return Promise.reject(new OriginRequestError('unavailable', `no key is created while the store has not confirmed earlier writes (${this.unconfirmedWrites} still waiting after ${this.storeTimeoutMs} ms)`))
    }
    return this.storeConfirmed((store) => {
      // Tracked until its record is written, however soon the caller is answered: a rotation waits for it.
      const creating = this.create(store.storing).then((key) => {
        store.confirmed()
        return key
      })
      this.creating.add(creating)
      void creating.catch(() => {}).finally(() => this.creating.delete(creating))
      return creating
    }, (key) => ({ keyId: key.keyId }))
  }

  /**
   * A key id is random, so the enclave that makes it is too: one out of
   * reach, out of service or full (see `maxInflightPerEnclave`) is passed
   * over for a key id another enclave owns.
   */
  private async create(storing: (stored: string) => void): Promise<KeyInfo> {
    /** Enclaves out of reach, or with no place for another request. */
    const passedOver = new Set<Enclave>()
    let overloaded: OverloadedError | undefined
    let keyId: string
    let enclave: Enclave
    let frame: Frame
    for (;;) {
      keyId = randomUUID()
      enclave = this.ring.nodeFor(keyId)
      if (passedOver.has(enclave)) continue
      // Held-back ones last: another key id, while an enclave that is not held back remains to try.
      if (heldBack(enclave) && this.enclaves.some((other) => !other.unsynced && !heldBack(other) && !passedOver.has(other))) continue
      try {
        // Out of service, it may hold another DEK: a key sealed under that one would be lost at its next restart.
        if (enclave.unsynced) throw this.outOfService(enclave)
        const target = enclave
        frame = await this.tracked(target, () => this.admitted(target, () => this.call(target, opcodes.CREATE, encodeCreateRequest({ keyId }))))
        break
      } catch (error) {
        if (error instanceof OverloadedError) overloaded = error
        else if (!(error instanceof EnclaveUnavailableError)) throw error
        passedOver.add(enclave)
        // Any of them only full: come back shortly (the others may be down for longer).
        if (passedOver.size === this.enclaves.length) throw overloaded ?? error
      }
    }
    const created = decodeCreateResponse(this.check(enclave, frame).payload)
    // Named: a caller answered 503 must learn which key may yet exist (no route lists keys).
    storing(`the record of new key ${keyId}`)
    await this.options.store.put({ keyId, version: created.version, state: 'active', publicKey: created.publicKey, sealed: created.sealed })
    return { keyId, publicKey: bytesToHex(created.publicKey), address: publicKeyToAddress(bytesToHex(created.publicKey)), state: 'active' }
  }

  /**
   * Signs a digest; `rpcMs` is the parent↔enclave round trip, `enclaveMs` the
   * enclave's own part of it. With the key's enclave out of reach, another
   * signs (see `onOwnerOrStandby`).
   */
  sign(keyId: string, digest: Uint8Array): Promise<{ signature: Hex; recoveryId: number; rpcMs: number; enclaveMs: number }> {
    return this.onOwnerOrStandby(keyId, (enclave) => this.admitted(enclave, () => this.signOn({ enclave, keyId, digest })))
  }

  /**
   * `work` on the key's own enclave; when that is out of reach (no
   * connection, no answer in time, held back after such failures) or out of
   * service, on a standby instead (see `standbyFor`). Tracks the owner's
   * outage: a failure for want of it starts a hold, a success ends it.
   */
  private async onOwnerOrStandby<T>(keyId: string, work: (enclave: Enclave) => Promise<T>): Promise<T> {
    const owner = this.ring.nodeFor(keyId)
    if (owner.unsynced) return this.onStandby({ keyId, work, failure: this.outOfService(owner), tried: new Set() })
    // The standbys this request has tried; made only off the normal path, which allocates nothing for it.
    let tried: Set<Enclave> | undefined
    if (heldBack(owner)) {
      const failure = new EnclaveUnavailableError(`enclave ${owner.id} is held back after failing requests`)
      tried = new Set()
      const onStandby = await this.onStandbys({ keyId, work, failure, tried, heldLast: false })
      if (onStandby.served) return onStandby.result
      // A key only the owner holds waits for the probe like the rest, unless this request can be that probe.
      if (onStandby.tried && heldBack(owner)) throw failure
      // With no standby to take its place, the owner is tried anyway: a hold must not make a lone enclave's keys fail.
      // (Standbys that are only full refuse the request as overloaded above: it comes back shortly.)
    }
    // Full: refused before anything is sent, a reload included.
    if (this.full(owner)) throw new OverloadedError(owner.id)
    try {
      // A key whose state change may not have reached its enclave goes there fresh from the store first.
      return await this.tracked(owner, () => (this.unsyncedKeys.has(keyId) ? this.reloadForUse(keyId, owner).then(() => work(owner)) : work(owner)))
    } catch (error) {
      if (!(error instanceof EnclaveUnavailableError)) throw error
      return this.onStandby({ keyId, work, failure: error, tried: tried ?? new Set() })
    }
  }

  /**
   * `call` to the enclave, tracking its outage: a failure for want of it
   * starts a hold (one per outage, however many requests it failed at once),
   * and any answer from it ends the outage. While an outage lasts, the call
   * is its one probe.
   */
  private tracked<T>(enclave: Enclave, call: () => Promise<T>): Promise<T> {
    return this.asProbe(enclave, async () => {
      const failuresAtSend = enclave.outageFailures
      try {
        const result = await call()
        outageOver(enclave)
        return result
      } catch (error) {
        if (error instanceof EnclaveUnavailableError) outageFailed(enclave, failuresAtSend)
        else if (answeredByEnclave(error)) outageOver(enclave)
        throw error
      }
    })
  }

  /**
   * `work` as the enclave's one probe while its outage lasts and no other probe is out: meanwhile `heldBack`
   * says so, and other requests pass the enclave over (or try it last), rather than each waiting out a timeout.
   */
  private async asProbe<T>(enclave: Enclave, work: () => Promise<T>): Promise<T> {
    const probe = enclave.outage.failing && !enclave.probing
    if (probe) enclave.probing = true
    try {
      return await work()
    } finally {
      if (probe) enclave.probing = false
    }
  }

  /**
   * After the owner has failed (or is out of service): any standby not yet tried, held-back ones last. The
   * standby's place, taken for the key's load, passes on to `work` in the same turn of the event loop: only a
   * request already under way could take it meanwhile, and then this one is refused as overloaded.
   */
  private async onStandby<T>({ keyId, work, failure, tried }: { keyId: string; work: (enclave: Enclave) => Promise<T>; failure: unknown; tried: Set<Enclave> }): Promise<T> {
    const onStandby = await this.onStandbys({ keyId, work, failure, tried, heldLast: true })
    if (onStandby.served) return onStandby.result
    throw failure
  }

  /**
   * `work` on the standbys in turn (see `standbyFor`) until one serves it: one that is out of reach too, or
   * lacks a key the store does not hold, passes it on to the next (`served` throws `failure` for those).
   * `tried`: whether any standby got the request.
   */
  private async onStandbys<T>(options: { keyId: string; work: (enclave: Enclave) => Promise<T>; failure: unknown; tried: Set<Enclave>; heldLast: boolean }): Promise<{ served: true; result: T } | { served: false; tried: boolean }> {
    const { keyId, work, failure, tried, heldLast } = options
    const unlocking: Unlocking = {}
    const next = () => this.standbyFor({ keyId, error: failure, heldLast, tried, unlocking })
    let triedOne = false
    for (let standby = await next(); standby; standby = await next()) {
      try {
        return { served: true, result: await this.served({ keyId, work, standby, failure }) }
      } catch (error) {
        if (error !== failure) throw error
        triedOne = true
      }
    }
    // None served it, but one would once its unlock (started) is done: the caller retries shortly, as for its own enclave.
    if (unlocking.first) throw unlocking.first
    return { served: false, tried: triedOne }
  }

  /**
   * `work` on the standby, counted and logged as a failover (by its outcome there), its own outage tracked. A key
   * the store does not hold (a preloaded account) that the standby has not either, or a standby that is out of
   * reach too, is still the owner's outage: `failure` is thrown.
   */
  private async served<T>({ keyId, work, standby, failure }: { keyId: string; work: (enclave: Enclave) => Promise<T>; standby: Standby; failure: unknown }): Promise<T> {
    try {
      const result = await this.tracked(standby.enclave, () => work(standby.enclave))
      this.countFailover({ keyId, standby: standby.enclave, failure, outcome: 'served' })
      return result
    } catch (error) {
      const missing = error instanceof OriginRequestError && (error.kind === 'not-found' || error.kind === 'unavailable')
      if (error instanceof EnclaveUnavailableError || (!standby.stored && missing)) throw failure
      this.countFailedFailover({ keyId, standby: standby.enclave, failure, error })
      throw error
    }
  }

  /** A failover whose request failed on the standby with `error`, counted by what that says of it (nothing, for a failure of the parent's own). */
  private countFailedFailover({ error, ...failover }: { keyId: string; standby: Enclave; failure: unknown; error: unknown }): void {
    const outcome = failoverOutcomeOf(error)
    if (outcome) this.countFailover({ ...failover, outcome })
  }

  private countFailover({ keyId, standby, failure, outcome }: { keyId: string; standby: Enclave; failure: unknown; outcome: FailoverOutcome }): void {
    const owner = this.ring.nodeFor(keyId)
    const pair = `${owner.id} ${standby.id}`
    this.failoverLog.write(pair, { level: 'warn', event: 'enclave_failover', enclave: owner.id, standby: standby.id, error: messageOf(failure) })
    this.failoverCounts.get(`${pair} ${outcome}`)!.count++
  }

  private async signOn({ enclave, keyId, digest }: { enclave: Enclave; keyId: string; digest: Uint8Array }): Promise<{ signature: Hex; recoveryId: number; rpcMs: number; enclaveMs: number }> {
    const started = performance.now()
    const mark = this.deactivations.mark
    const frame = await this.callReloading({ enclave, keyId, opcode: opcodes.SIGN, payload: encodeSignRequest({ keyId, digest }) })
    const rpcMs = performance.now() - started
    const { signature, recoveryId, enclaveMicros } = decodeSignResponse(this.check(enclave, frame).payload)
    if (this.deactivations.deactivatedSince(keyId, mark)) {
      throw new OriginRequestError('not-active', `key ${keyId} was frozen or archived while this signature was made`)
    }
    // Buffer's hex: several times cheaper than viem's per signature.
    return { signature: `0x${Buffer.from(signature.buffer, signature.byteOffset, signature.byteLength).toString('hex')}`, recoveryId, rpcMs, enclaveMs: enclaveMicros / 1_000 }
  }

  /**
   * A key's request to an enclave; once more after handing it the stored record, if it has lost the key (a
   * restart). The request already holds its place there, which the reload's LOAD uses too.
   */
  private async callReloading({ enclave, keyId, opcode, payload }: { enclave: Enclave; keyId: string; opcode: Opcode; payload: Uint8Array }): Promise<Frame> {
    const frame = await this.call(enclave, opcode, payload)
    const notHeld = frame.status === statuses.NOT_FOUND || frame.status === statuses.NOT_FOUND_PRELOAD_NOT_SERVED
    return notHeld && (await this.reloadForUse(keyId, enclave, { placeHeld: true })) ? this.call(enclave, opcode, payload) : frame
  }

  /**
   * After `error` from the key's own enclave: when that enclave is out of
   * reach (no connection, or no answer in time) or out of service, the next
   * enclave on the ring that takes the key's stored record, loaded fresh
   * from the store for this very use. Every enclave holds the same DEK, so
   * any can open it. The copy stays there, but is only used again through
   * here, after a fresh load: a state change made meanwhile always reaches
   * it. A key the store does not hold (a preloaded account: every enclave
   * loads the whole preload file) goes to the standby as it is. Enclaves
   * held back after failures of their own come last, and only with
   * `heldLast` (once the owner itself has failed); out-of-service ones
   * never, nor any in `tried` (which this fills: a request tries each
   * standby once). Full ones (see `maxInflightPerEnclave`) are passed
   * over before the load, which counts as one of the standby's requests
   * while it is out (see `reload`). One that answers the load NEEDS_UNLOCK (its unlock started) is passed over,
   * its answer kept in `unlocking` for the caller. Undefined for any other error, or when no enclave
   * takes it; OverloadedError when the ones that would were full.
   */
  private async standbyFor({ keyId, error, heldLast, tried, unlocking }: { keyId: string; error: unknown; heldLast: boolean; tried: Set<Enclave>; unlocking: Unlocking }): Promise<Standby | undefined> {
    if (!(error instanceof EnclaveUnavailableError)) return undefined
    const others = this.ring.nodesFor(keyId).slice(1).filter((enclave) => !enclave.unsynced && !tried.has(enclave))
    let overloaded: OverloadedError | undefined
    for (const enclave of [...others.filter((other) => !heldBack(other)), ...(heldLast ? others.filter(heldBack) : [])]) {
      tried.add(enclave)
      // Full: passed over before waiting for the key's turn (see `reload`, which counts the load itself).
      if (this.full(enclave)) {
        overloaded = new OverloadedError(enclave.id)
        continue
      }
      // The load's outcome counts toward the standby's own outage, as a request's would; a key the store does
      // not hold makes no load, and tells nothing about it.
      const failuresAtSend = enclave.outageFailures
      try {
        // A standby in an outage is probed by one request at a time, as an owner is (see `tracked`).
        const stored = await this.asProbe(enclave, () => this.reloadForUse(keyId, enclave))
        if (stored) outageOver(enclave)
        return { enclave, stored }
      } catch (failure) {
        if (failure instanceof OverloadedError) overloaded = failure
        else if (failure instanceof EnclaveUnavailableError) outageFailed(enclave, failuresAtSend)
        // It answered, but takes the key only after an unlock (which has started), or holds a later one of another parent's.
        else if (failure instanceof NeedsUnlockError || failure instanceof StaleRequestError) {
          outageOver(enclave)
          if (failure instanceof NeedsUnlockError) unlocking.first ??= failure
        } else {
          // Its load failed there: a failover that failed, as a failed sign after it would be.
          this.countFailedFailover({ keyId, standby: enclave, failure: error, error: failure })
          throw failure
        }
      }
    }
    // Standbys there were, but full: the caller may come back shortly.
    if (overloaded) throw overloaded
    return undefined
  }

  /**
   * `reload` in the key's turn: a state change or re-seal of the same key
   * waits for it, and it for them, so a record read before one of those
   * cannot land after it (a frozen key turned active again, say).
   */
  private reloadInTurn(keyId: string, into = this.ring.nodeFor(keyId)): Promise<boolean> {
    return this.sharedReload(keyId, into, { readTimeoutMs: this.storeTimeoutMs, placeHeld: false }).done
  }

  /**
   * Callers while one is queued or running share it: N signs of a key an enclave lost make one reload, whose
   * store read waits `readTimeoutMs` as its first caller asked. Only callers alike in whether its LOAD takes a
   * place of its own (see `reload`) share one: a failover's load into a standby takes one, a sign's that holds
   * one there already does not.
   */
  private sharedReload(keyId: string, into: Enclave, bounds: { readTimeoutMs: number; placeHeld: boolean }): { done: Promise<boolean>; begun: Promise<void> } {
    const takesPlace = into !== this.ring.nodeFor(keyId) && !bounds.placeHeld
    const shared = `${into.id}\n${keyId}\n${takesPlace}`
    let reload = this.reloads.get(shared)
    if (!reload) {
      let begin!: () => void
      const begun = new Promise<void>((resolve) => (begin = resolve))
      const done = this.serializeKey(keyId, () => {
        begin()
        return this.reload(keyId, into, { readTimeoutMs: bounds.readTimeoutMs, takesPlace })
      }).finally(() => {
        if (this.reloads.get(shared)?.done === done) this.reloads.delete(shared)
      })
      // Handled here as well: a caller that gave up waiting for the turn (see `reloadForUse`) no longer listens.
      done.catch(() => {})
      reload = { done, begun }
      this.reloads.set(shared, reload)
    }
    return reload
  }

  /**
   * `reloadInTurn` for a sign or get, which waits for the key's turn no longer than the request timeout: a
   * state change whose store write hangs holds it (see `storeConfirmed`). Its store read, too, is bounded by
   * the request timeout, not the store's: a sign must not hold its place (or its enclave's probe) for longer.
   * One given up on still runs when the turn comes, and the next use shares it. `placeHeld`: the caller
   * already holds its place on `into` (a sign there that found the key gone), which the LOAD uses.
   */
  private async reloadForUse(keyId: string, into: Enclave, { placeHeld = false } = {}): Promise<boolean> {
    const { done, begun } = this.sharedReload(keyId, into, { readTimeoutMs: this.options.requestTimeoutMs, placeHeld })
    await this.withinTimeout(begun, `waiting for key ${keyId}'s turn (a change of its state is still under way)`, { timedOut: (message) => new KeyTurnTimeoutError(message) })
    return done
  }

  /**
   * An enclave that restarted has lost its records: hand it the stored one. Callers hold the key's turn.
   * `takesPlace`: the load into a standby counts as one of its requests while it is out (see
   * `maxInflightPerEnclave`), unless its caller holds a place there already (see `sharedReload`): when an owner
   * fails, the loads of its keys fill a standby up to its limit, not past it.
   */
  private async reload(keyId: string, into = this.ring.nodeFor(keyId), { readTimeoutMs, takesPlace } = { readTimeoutMs: this.storeTimeoutMs, takesPlace: false }): Promise<boolean> {
    // Bounded: a hung read must not hold the key's turn. A record read too late is dropped with this reload.
    const record = await this.storedRecord(keyId, readTimeoutMs)
    if (!record) return false
    const owner = into === this.ring.nodeFor(keyId)
    try {
      await (takesPlace ? this.admitted(into, () => this.load(record, into)) : this.load(record, into))
    } catch (error) {
      // A LOAD given up on may not have landed, nor one refused for want of an unlock, leaving an older state there:
      // reload before the key's next use there.
      if (owner && (error instanceof EnclaveUnavailableError || error instanceof NeedsUnlockError)) this.unsyncedKeys.add(keyId)
      throw error
    }
    // In the key's turn: a state change that fails to reach the enclave after this marks the key again.
    if (owner) this.unsyncedKeys.delete(keyId)
    return true
  }

  /**
   * The error that sends a request for an out-of-service enclave's keys to
   * another enclave; starts the enclave's sync unless one runs or failed
   * too recently.
   */
  private outOfService(enclave: Enclave): EnclaveUnavailableError {
    if (!enclave.syncing && !enclave.syncBackoff.holding) {
      enclave.syncing = this.sync(enclave).finally(() => {
        enclave.syncing = undefined
      })
    }
    return new EnclaveUnavailableError(`enclave ${enclave.id} is out of service until it has unlocked and loaded its keys`)
  }

  private async sync(enclave: Enclave): Promise<void> {
    try {
      await this.unlock(enclave)
      const droppedOut = await this.loadOwnedKeys({ owners: [enclave], load: (record) => this.reloadInTurn(record.keyId) })
      if (droppedOut.size > 0) throw droppedOut.get(enclave)
      enclave.unsynced = false
      enclave.syncBackoff.succeeded()
      this.options.log?.({ event: 'enclave_synced', enclave: enclave.id })
    } catch (error) {
      const retryInMs = Math.round(enclave.syncBackoff.failed())
      this.options.log?.({ level: 'warn', event: 'enclave_sync_failed', enclave: enclave.id, retryInMs, error: messageOf(error) })
    }
  }

  /** The key as its enclave holds it (another, with its own out of reach: see `onOwnerOrStandby`). */
  getKey(keyId: string): Promise<KeyInfo> {
    return this.onOwnerOrStandby(keyId, (enclave) => this.admitted(enclave, () => this.getOn({ enclave, keyId })))
  }

  private async getOn({ enclave, keyId }: { enclave: Enclave; keyId: string }): Promise<KeyInfo> {
    const frame = await this.callReloading({ enclave, keyId, opcode: opcodes.GET, payload: encodeGetRequest({ keyId }) })
    const key = decodeGetResponse(this.check(enclave, frame).payload)
    const publicKey = bytesToHex(key.publicKey)
    return { keyId, publicKey, address: publicKeyToAddress(publicKey), state: key.state, cacheState: key.cacheState }
  }

  /**
   * Durable first, then the enclave: a frozen key stays frozen across
   * restarts, and an archived one stays archived for good. With the enclave
   * out of reach, the change is still in force: the key is reloaded from the
   * store before any use, there or elsewhere. A store that does not confirm
   * within `storeTimeoutMs` has the caller answered 503 (see `storeConfirmed`).
   */
  setState(keyId: string, state: KeyState): Promise<void> {
    return this.storeConfirmed(({ storing, confirmed }) => {
      // From the call: the key's turn is held mostly by writes of the store's (an earlier change, a re-seal).
      storing(`the change of key ${keyId} to ${state}`)
      return this.serializeKey(keyId, async () => {
        // Archiving retires a key for good: nothing, unfreeze included, brings it back to signing.
        if (state !== 'archived' && (await this.storedRecord(keyId))?.state === 'archived') {
          throw new OriginRequestError('not-active', `key ${keyId} is archived, which is final: it cannot be made ${state}`)
        }
        await this.options.store.setState(keyId, state).catch((error: unknown) => {
          throw error instanceof KeyNotStoredError ? new OriginRequestError('not-found', `no key ${keyId}`) : error
        })
        confirmed()
        // A signature still out (on a standby, say) is refused when it comes back (see `signOn`).
        if (state !== 'active') this.deactivations.deactivated(keyId)
        const enclave = this.ring.nodeFor(keyId)
        // The store has the new state; the enclave may not (a frozen key there would still sign). Every use
        // reloads the key first until it has: the change is in force, and only an enclave's own failure is one.
        const deferred = (reason: string) => {
          this.unsyncedKeys.add(keyId)
          this.options.log?.({ level: 'warn', event: 'state_change_deferred', keyId, state, enclave: enclave.id, error: reason })
        }
        // Out of service, it takes the stored record when it syncs; held back, it would cost this change a request timeout.
        if (enclave.unsynced) return deferred(`enclave ${enclave.id} is out of service`)
        if (heldBack(enclave)) return deferred(`enclave ${enclave.id} is held back after failing requests`)
        // Marked while the SET_STATE is out: a sign that starts meanwhile waits for this turn and takes the key from
        // the store, rather than reach the enclave first and sign with the state it is leaving.
        const wasUnsynced = this.unsyncedKeys.has(keyId)
        this.unsyncedKeys.add(keyId)
        try {
          // Tracked: a hung enclave that only gets state changes is held back too, and the next ones are deferred at once.
          const frame = await this.tracked(enclave, () => this.sequenced(enclave, opcodes.SET_STATE, (sequence) => encodeSetStateRequest({ keyId, state, sequence })))
          if (frame.status === statuses.NOT_FOUND) await this.reload(keyId)
          else this.check(enclave, frame)
          if (!wasUnsynced) this.unsyncedKeys.delete(keyId)
        } catch (error) {
          // Out of reach; numbered outside the enclave's epoch (it restarted, or took another UNLOCK; the unlock that
          // answer asks for has started); refused as stale; or failed there: in force all the same, as the store
          // has it and the key is reloaded from there before its next use. An error would have the operator
          // believe the key still signs.
          deferred(messageOf(error))
        }
      })
    })
  }

  /** The store's part of health: a store that takes no more writes cannot create keys or change their states. */
  storeHealth(): { ok: true } | { ok: false; error: string } {
    const failure = this.options.store.writeFailure?.()
    if (failure !== undefined) return { ok: false, error: failure }
    // Hung rather than failed: as unable to take writes, for as long as any answered 503 is still out.
    if (this.unconfirmedWrites > 0) return { ok: false, error: `${this.unconfirmedWrites} creates or state changes were not confirmed durable within ${this.storeTimeoutMs} ms and are still waiting for the store` }
    return { ok: true }
  }

  /**
   * Each enclave's HEALTH answer. `answered`: it answered; `ok`: it answered
   * and can serve: it is in service (see `unsynced`) and, in preload mode,
   * its accounts are loaded (not before the unlock, nor after a bad file).
   * Callers while one is out share it: `/healthz` and `/metrics` need no
   * authentication, and a flood of them must not become a flood of HEALTH
   * requests to every enclave.
   */
  health(): Promise<EnclaveHealth[]> {
    this.healthAsked ??= this.askHealth().finally(() => {
      this.healthAsked = undefined
    })
    return this.healthAsked
  }

  private async askHealth(): Promise<EnclaveHealth[]> {
    return Promise.all(
      this.enclaves.map(async (enclave) => {
        try {
          const frame = this.check(enclave, await this.call(enclave, opcodes.HEALTH, emptyPayload))
          // An answer after the hold has run out is a probe that succeeded: an enclave whose keys get no requests
          // must not read as held back for ever. It never cuts a hold short.
          if (!enclave.outage.holding) outageOver(enclave)
          const stats = decodeHealthResponse(frame.payload)
          const refusal = preloadRefusalOf({ stats })
          const held = enclave.outage.failing && !enclave.unsynced && !refusal
          const notServing = enclave.unsynced
            ? 'out of service until it has unlocked and loaded its keys (its keys fail over meanwhile)'
            : (refusal ?? (held ? 'held back after failing requests until a probe succeeds (its keys fail over meanwhile)' : undefined))
          return { id: enclave.id, answered: true, ok: !notServing, held, inflight: enclave.pool.inflight, admitted: enclave.admitted, stats, ...(notServing ? { error: notServing } : {}) }
        } catch (error) {
          return { id: enclave.id, answered: false, ok: false, inflight: enclave.pool.inflight, admitted: enclave.admitted, error: messageOf(error) }
        }
      }),
    )
  }

  /** Requests for an enclave's keys that another enclave took in its place, per pair and by what that one did with them (every pair and outcome, 0 until counted). */
  failovers(): Array<{ enclave: string; standby: string; outcome: FailoverOutcome; count: number }> {
    return [...this.failoverCounts.values()]
  }

  get inflight(): number {
    return this.enclaves.reduce((sum, e) => sum + e.pool.inflight, 0)
  }

  close(): void {
    clearInterval(this.credentialRefresh)
    clearInterval(this.logPoll)
    for (const enclave of this.enclaves) enclave.pool.close()
  }
}

/** The DEK (and a rotation's retiring one) as an UNLOCK carries them. */
function storedDataKeys(stored: WrappedDek | undefined): UnlockRequest {
  return { wrappedDek: stored?.ciphertext ?? new Uint8Array(), retiringWrappedDek: stored?.retiring?.ciphertext }
}

/** The wrapped DEK an enclave made (UNLOCK bootstrap, GENERATE_DATA_KEY). Stored empty, every later unlock would have KMS make yet another. */
function newWrappedDek(wrappedDek: Uint8Array): Uint8Array {
  if (wrappedDek.length === 0) throw new Error('the enclave made no data key: its answer carries no wrapped DEK')
  return wrappedDek
}

