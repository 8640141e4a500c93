/**
 * The counts behind one quota subject (one sender, or one API key, on one chain): signed sponsorships and their
 * maximum cost, per second, and sliding-window totals over them. Counting per second bounds the memory and storage
 * of a busy subject (at most one bucket per second of the longest window) at the price of windows that are exact to
 * the second, and a bucket leaves a window only once its whole second has.
 */

/** At most `maxOperations` sponsorships, and at most `maxCostWei` of their summed maximum cost, in any `windowMs`. */
export type WindowLimit = { windowMs: number; maxOperations?: number; maxCostWei?: bigint }

export type Bucket = { second: number; operations: number; costWei: bigint }

export type QuotaDecision =
  | { granted: true }
  | {
      granted: false
      /** The index of the first limit the operation would pass. */
      limit: number
      exceeded: 'maxOperations' | 'maxCostWei'
      usedOperations: number
      usedCostWei: bigint
      /** When every limit it would pass lets it through, if nothing else is signed meanwhile; null: never (it alone costs more). */
      retryAfterMs: number | null
    }

type WindowTotals = { start: number; operations: number; costWei: bigint }

/** The last instant a sponsorship counted in this bucket may have been signed. */
const lastInstantOf = (bucket: Bucket) => bucket.second * 1000 + 999

export class QuotaLedger {
  /** Oldest first; seconds strictly increasing. */
  private buckets: Bucket[]
  /** The totals of each window in use, by length in ms; `start` is the first bucket inside it. */
  private readonly windows = new Map<number, WindowTotals>()

  constructor(buckets: readonly Bucket[]) {
    this.buckets = [...buckets].sort((a, b) => a.second - b.second)
  }

  /** Whether one more sponsorship costing `costWei` fits every limit at `nowMs`. */
  decide(nowMs: number, costWei: bigint, limits: readonly WindowLimit[]): QuotaDecision {
    let denied: Extract<QuotaDecision, { granted: false }> | undefined
    limits.forEach((limit, index) => {
      const totals = this.totalsOf(limit.windowMs, nowMs)
      const overOperations = limit.maxOperations !== undefined && totals.operations + 1 > limit.maxOperations
      const overCost = limit.maxCostWei !== undefined && totals.costWei + costWei > limit.maxCostWei
      if (!overOperations && !overCost) return
      const retryAfterMs = this.retryAfterMs({ limit, totals, nowMs, costWei })
      if (!denied) {
        denied = {
          granted: false,
          limit: index,
          exceeded: overOperations ? 'maxOperations' : 'maxCostWei',
          usedOperations: totals.operations,
          usedCostWei: totals.costWei,
          retryAfterMs,
        }
      } else if (denied.retryAfterMs !== null) {
        denied.retryAfterMs = retryAfterMs === null ? null : Math.max(denied.retryAfterMs, retryAfterMs)
      }
    })
    return denied ?? { granted: true }
  }

  /** Counts one sponsorship at `nowMs`; answers the second it was counted in (what `release` takes). */
  record(nowMs: number, costWei: bigint): Bucket {
    const last = this.buckets.at(-1)
    // Never behind the last bucket, should the clock step back: the buckets stay in order.
    const second = Math.max(Math.floor(nowMs / 1000), last?.second ?? 0)
    let bucket = last
    if (!bucket || bucket.second !== second) {
      bucket = { second, operations: 0, costWei: 0n }
      this.buckets.push(bucket)
    }
    bucket.operations += 1
    bucket.costWei += costWei
    // Into the windows that hold the bucket: each holds the current second, but a bucket reused after the clock
    // stepped back may already have left a short one.
    const index = this.buckets.length - 1
    for (const totals of this.windows.values()) {
      if (totals.start <= index) {
        totals.operations += 1
        totals.costWei += costWei
      }
    }
    return bucket
  }

  /** The last instant the newest kept count may have been made at, if any is kept. */
  get newestCountMs(): number | undefined {
    const newest = this.buckets.at(-1)
    return newest && lastInstantOf(newest)
  }

  /** Takes back a sponsorship counted in `second` that was never signed; the bucket as it is now, if it is still kept. */
  release(second: number, costWei: bigint): Bucket | undefined {
    const index = this.indexOf(second)
    const bucket = this.buckets[index]
    if (!bucket || bucket.operations === 0) return undefined
    bucket.operations -= 1
    bucket.costWei -= costWei
    for (const totals of this.windows.values()) {
      if (totals.start <= index) {
        totals.operations -= 1
        totals.costWei -= costWei
      }
    }
    return bucket
  }

  /**
   * Forgets the windows no limit uses any more (the limits are the configuration's, which a deployment may change),
   * and the buckets older than `retainMs` and every limit's window. Answers the newest second forgotten, if any, for
   * storage.
   */
  prune(nowMs: number, limits: readonly WindowLimit[], retainMs = 0): number | undefined {
    const lengths = new Set(limits.map((limit) => limit.windowMs))
    for (const length of this.windows.keys()) if (!lengths.has(length)) this.windows.delete(length)
    const kept = Math.max(retainMs, ...lengths)
    let dropped = 0
    while (dropped < this.buckets.length && lastInstantOf(this.buckets[dropped]!) <= nowMs - kept) dropped++
    if (dropped === 0) return undefined
    const newest = this.buckets[dropped - 1]!.second
    this.buckets = this.buckets.slice(dropped)
    for (const [length, totals] of this.windows) {
      // A window shorter than the longest has already moved past every dropped bucket; recount it if not.
      if (totals.start < dropped) this.windows.delete(length)
      else totals.start -= dropped
    }
    return newest
  }

  private totalsOf(windowMs: number, nowMs: number): WindowTotals {
    let totals = this.windows.get(windowMs)
    if (!totals) {
      totals = { start: 0, operations: 0, costWei: 0n }
      for (const bucket of this.buckets) {
        totals.operations += bucket.operations
        totals.costWei += bucket.costWei
      }
      this.windows.set(windowMs, totals)
    }
    while (totals.start < this.buckets.length && lastInstantOf(this.buckets[totals.start]!) <= nowMs - windowMs) {
      const leaving = this.buckets[totals.start]!
      totals.operations -= leaving.operations
      totals.costWei -= leaving.costWei
      totals.start++
    }
    return totals
  }

  /** How long until enough of the window's oldest buckets have left it for one more sponsorship to fit. */
  private retryAfterMs(options: { limit: WindowLimit; totals: WindowTotals; nowMs: number; costWei: bigint }): number | null {
    const { limit, totals, nowMs, costWei } = options
    if (limit.maxCostWei !== undefined && costWei > limit.maxCostWei) return null
    const operationsToShed = limit.maxOperations === undefined ? 0 : totals.operations + 1 - limit.maxOperations
    const costToShed = limit.maxCostWei === undefined ? 0n : totals.costWei + costWei - limit.maxCostWei
    let shedOperations = 0
    let shedCost = 0n
    for (let index = totals.start; index < this.buckets.length; index++) {
      const bucket = this.buckets[index]!
      shedOperations += bucket.operations
      shedCost += bucket.costWei
      if (shedOperations >= operationsToShed && shedCost >= costToShed) return Math.max(1, lastInstantOf(bucket) + limit.windowMs - nowMs)
    }
    // Unreachable while the totals are the buckets' sums; the longest wait there can be, should they ever not be.
    return limit.windowMs
  }

  private indexOf(second: number): number {
    let low = 0
    let high = this.buckets.length - 1
    while (low <= high) {
      const middle = (low + high) >> 1
      const found = this.buckets[middle]!.second
      if (found === second) return middle
      if (found < second) low = middle + 1
      else high = middle - 1
    }
    return -1
  }
}
