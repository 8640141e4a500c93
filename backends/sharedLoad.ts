import { SignerError } from './signer.js'
import { waitAtMost } from '../enclave-origin/waitAtMost.js'

export type SharedLoadOptions<T> = {
  load: () => Promise<T>
  /** No caller waits on a load longer than this from its start, and a load still unsettled then is abandoned. */
  abandonAfterMs: number
  /** How long what a load answered serves later calls: Infinity for a key's address, 0 to load again each time. */
  keepMs: number
  /** Names the load in the error of a caller that stopped waiting, e.g. `Vault signer primary: reading the key`. */
  what: string
  now?: () => number
}

/**
 * One load at a time, shared by the calls made while it runs; a failure is
 * forgotten at once, so the next call tries again.
 *
 * In workerd a request's fetches and timers are dropped once it has answered,
 * so a load that another request started (one whose attempt a fallback's
 * backup or a hedge beat, or whose client went away) may never settle, and
 * everyone waiting on it would wait for good. So a caller waits at most until
 * `abandonAfterMs` after the load started, and then gets a retryable error;
 * the first call after that starts a new load. A load abandoned but still
 * alive keeps running, and what it answers is still used (`load` may cache).
 */
export class SharedLoad<T> {
  private current: { promise: Promise<T>; startedAt: number; answeredAt: number | undefined } | undefined

  constructor(private readonly options: SharedLoadOptions<T>) {}

  /**
   * The load's answer. `signal`: this caller stops waiting when it aborts (its deadline, or its own caller gave up),
   * with a retryable SignerError; the load goes on for the others, and for the next call.
   */
  get(signal?: AbortSignal): Promise<T> {
    const { abandonAfterMs, keepMs, what } = this.options
    const stoppedWhy = `${what}: stopped waiting, as its caller no longer waits`
    // Before a load starts: one started for a caller already gone might never be waited for.
    if (signal?.aborted) return Promise.reject(new SignerError(stoppedWhy, { retryable: true }))
    const now = this.now()
    let current = this.current
    const stale = current && (current.answeredAt === undefined ? now - current.startedAt >= abandonAfterMs : now - current.answeredAt >= keepMs)
    if (!current || stale) current = this.start(now)
    if (current.answeredAt !== undefined) return current.promise
    return waitAtMost(current.promise, { ms: current.startedAt + abandonAfterMs - now, signal }).then((waited) => {
      if ('value' in waited) return waited.value
      throw new SignerError(waited.gaveUp === 'timeout' ? `${what}: no answer within ${abandonAfterMs} ms; retry shortly` : stoppedWhy, { retryable: true })
    })
  }

  private now(): number {
    return (this.options.now ?? Date.now)()
  }

  private start(now: number): NonNullable<SharedLoad<T>['current']> {
    const entry: NonNullable<SharedLoad<T>['current']> = { promise: this.options.load(), startedAt: now, answeredAt: undefined }
    this.current = entry
    entry.promise.then(
      () => {
        entry.answeredAt = this.now()
      },
      () => {
        if (this.current === entry) this.current = undefined
      },
    )
    return entry
  }
}
