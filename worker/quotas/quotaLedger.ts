/**
 * The counts behind one quota subject (one sender, or one API key, on one chain): signed sponsorships and their
 * maximum cost, in buckets of a second, and sliding-window totals over them. A bucket leaves a window only once the
 * whole of it has. Once there are many, buckets are merged where the windows hardly notice: each into buckets of up
 * to a 3,600th of the shortest window still counting it (24 s for a day; windows under two hours stay exact to the
 * second), which bounds a busy subject's memory by its windows, not by its traffic. A merged bucket only ever counts
 * longer, never shorter.
 */

/** At most `maxOperations` sponsorships, and at most `maxCostWei` of their summed maximum cost, in any `windowMs`. */
export type WindowLimit = { windowMs: number; maxOperations?: number; maxCostWei?: bigint }

/** The counts of the `seconds` seconds from `second` (unix seconds). */
export type Bucket = { second: number; seconds: number; operations: number; costWei: bigint }

export type QuotaDecision =
  | { granted: true }
  | {
      granted: false
      /** The index of the limit it would pass: the first it never fits, else the first. */
      limit: number
      exceeded: 'maxOperations' | 'maxCostWei'
      usedOperations: number
      usedCostWei: bigint
      /** When every limit it would pass lets it through, if nothing else is signed meanwhile; null: never (it alone costs more). */
      retryAfterMs: number | null
    }

type WindowTotals = { start: number; operations: number; costWei: bigint }

/** The last instant a sponsorship counted in this bucket may have been signed. */
const lastInstantOf = (bucket: Bucket) => (bucket.second + bucket.seconds) * 1000 - 1

/** Buckets merge at most to a 3,600th of the shortest window still counting them. */
const bucketsPerWindow = 3_600
/** Merging starts past this many buckets, and again each time their number doubles. */
const fewBuckets = 4_096

/** The denial to name among several: the first whose wait is null (it never fits), else the first. */
export function worstOf<T>(denials: readonly T[], waitOf: (denial: T) => number | null): T {
  return denials.find((denial) => waitOf(denial) === null) ?? denials[0]!
}

/** When every one of several waits is over; null (never) if any is. */
export function longestWait(waits: ReadonlyArray<number | null>): number | null {
  return waits.includes(null) ? null : Math.max(...(waits as number[]))
}

export class QuotaLedger {
  /** Oldest first; seconds strictly increasing. */
  private buckets: Bucket[]
  /** The totals of each window in use, by length in ms; `start` is the first bucket inside it. */
  private readonly windows = new Map<number, WindowTotals>()
  /** Buckets merge past this many: a few, then twice what the last merge left. */
  private mergeAbove = fewBuckets

  constructor(buckets: readonly Bucket[]) {
    this.buckets = [...buckets].sort((a, b) => a.second - b.second)
  }

  /** The buckets, oldest first (for storage). */
  all(): readonly Bucket[] {
    return this.buckets
  }

  /** Whether one more sponsorship costing `costWei` fits every limit at `nowMs`. */
  decide(nowMs: number, costWei: bigint, limits: readonly WindowLimit[]): QuotaDecision {
    const denials = limits.flatMap((limit, index): Array<Extract<QuotaDecision, { granted: false }>> => {
      const totals = this.totalsOf(limit.windowMs, nowMs)
      const overOperations = limit.maxOperations !== undefined && totals.operations + 1 > limit.maxOperations
      const overCost = limit.maxCostWei !== undefined && totals.costWei + costWei > limit.maxCostWei
      if (!overOperations && !overCost) return []
      return [
        {
          granted: false,
          limit: index,
          // The cost, when it alone is too much: no wait for operations to leave can help.
          exceeded: overOperations && !(limit.maxCostWei !== undefined && costWei > limit.maxCostWei) ? 'maxOperations' : 'maxCostWei',
          usedOperations: totals.operations,
          usedCostWei: totals.costWei,
          retryAfterMs: this.retryAfterMs({ limit, totals, nowMs, costWei }),
        },
      ]
    })
    if (denials.length === 0) return { granted: true }
    return { ...worstOf(denials, (denial) => denial.retryAfterMs), retryAfterMs: longestWait(denials.map((denial) => denial.retryAfterMs)) }
  }

  /** Counts one sponsorship at `nowMs`; answers the bucket it was counted in (its `second` is what `release` takes). */
  record(nowMs: number, costWei: bigint): Bucket {
    const second = Math.floor(nowMs / 1000)
    let bucket = this.buckets.at(-1)
    // Into the last bucket while it lasts, or should the clock step back: the buckets stay in order.
    if (!bucket || second >= bucket.second + bucket.seconds) {
      bucket = { second, seconds: 1, operations: 0, costWei: 0n }
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

  /** Takes back a sponsorship counted at `second` that was never signed; the bucket as it is now, if it is still kept. */
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

  /**
   * Merges buckets once there are many (see the top), for the windows of `lengthsMs` (the limits' and any longer
   * retention). Answers whether any merged: the buckets are then new, for storage.
   */
  mergeIfMany(nowMs: number, lengthsMs: readonly number[]): boolean {
    if (this.buckets.length <= this.mergeAbove) return false
    const lengths = [...new Set(lengthsMs)].sort((a, b) => a - b)
    const merged: Array<Bucket & { tier: number }> = []
    for (const bucket of this.buckets) {
      // The shortest window still counting it: every bucket merged into one shares it, so no shorter window sees a
      // merged bucket, and the one that does sees counts leave it late by at most its 3,600th.
      const tier = lengths.findIndex((length) => nowMs - lastInstantOf(bucket) < length)
      const widest = tier < 0 ? 1 : Math.floor(lengths[tier]! / 1000 / bucketsPerWindow)
      const group = merged.at(-1)
      if (group && group.tier === tier && bucket.second + bucket.seconds - group.second <= widest) {
        group.seconds = bucket.second + bucket.seconds - group.second
        group.operations += bucket.operations
        group.costWei += bucket.costWei
      } else {
        merged.push({ ...bucket, tier })
      }
    }
    this.mergeAbove = Math.max(fewBuckets, 2 * merged.length)
    if (merged.length === this.buckets.length) return false
    this.buckets = merged.map(({ tier: _tier, ...bucket }) => bucket)
    this.windows.clear()
    return true
  }

  /** The bucket that holds `second`, or -1. */
  private indexOf(second: number): number {
    let low = 0
    let high = this.buckets.length - 1
    while (low <= high) {
      const middle = (low + high) >> 1
      const found = this.buckets[middle]!
      if (second < found.second) high = middle - 1
      else if (second >= found.second + found.seconds) low = middle + 1
      else return middle
    }
    return -1
  }
}
