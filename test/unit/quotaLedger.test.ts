import { describe, expect, it } from 'vitest'
import { QuotaLedger, type WindowLimit } from '../../worker/quotas/quotaLedger.js'

/** The ledger behind each quota Durable Object, on a clock the test sets (ms). */

const minute: WindowLimit = { windowMs: 60_000, maxOperations: 2 }

describe('QuotaLedger', () => {
  it('slides its window to the second: a sponsorship leaves once the whole second it was counted in has', () => {
    const ledger = new QuotaLedger([])
    ledger.record(500, 1n)
    ledger.record(30_200, 1n)
    expect(ledger.decide(30_300, 1n, [minute])).toEqual({
      granted: false,
      limit: 0,
      exceeded: 'maxOperations',
      usedOperations: 2,
      usedCostWei: 2n,
      // The first left at 60,999: second 0's last instant plus the window.
      retryAfterMs: 60_999 - 30_300,
    })
    expect(ledger.decide(60_998, 1n, [minute])).toMatchObject({ granted: false, retryAfterMs: 1 })
    expect(ledger.decide(60_999, 1n, [minute])).toEqual({ granted: true })
    // Deciding never counts.
    expect(ledger.decide(60_999, 1n, [minute])).toEqual({ granted: true })
  })

  it('sums the maximum cost, and waits for as many of the oldest buckets as must leave', () => {
    const ledger = new QuotaLedger([])
    const limit = { windowMs: 10_000, maxCostWei: 100n }
    ledger.record(0, 30n)
    ledger.record(1_000, 30n)
    ledger.record(2_000, 30n)
    // 90 used; 50 more needs 40 gone: the buckets of seconds 0 and 1 (60).
    expect(ledger.decide(3_000, 50n, [limit])).toEqual({
      granted: false,
      limit: 0,
      exceeded: 'maxCostWei',
      usedOperations: 3,
      usedCostWei: 90n,
      retryAfterMs: 1_999 + 10_000 - 3_000,
    })
    expect(ledger.decide(3_000, 10n, [limit])).toEqual({ granted: true })
    // More than the quota on its own: never.
    expect(ledger.decide(3_000, 101n, [limit])).toMatchObject({ granted: false, exceeded: 'maxCostWei', retryAfterMs: null })
  })

  it('names the first limit passed, or the first it never fits, and waits for every limit passed', () => {
    const ledger = new QuotaLedger([])
    for (let second = 0; second < 5; second++) ledger.record(second * 1_000, 10n)
    const limits: WindowLimit[] = [
      { windowMs: 100_000, maxCostWei: 1_000n },
      { windowMs: 10_000, maxOperations: 5 },
      { windowMs: 60_000, maxOperations: 3 },
    ]
    expect(ledger.decide(5_000, 10n, limits)).toEqual({
      granted: false,
      limit: 1,
      exceeded: 'maxOperations',
      usedOperations: 5,
      usedCostWei: 50n,
      // The 10 s limit frees one at 10,999; the 60 s limit needs three gone: second 2 leaves at 62,999.
      retryAfterMs: 62_999 - 5_000,
    })
    const withNever = [...limits, { windowMs: 60_000, maxCostWei: 5n }]
    expect(ledger.decide(5_000, 10n, withNever)).toMatchObject({ limit: 3, exceeded: 'maxCostWei', usedCostWei: 50n, retryAfterMs: null })
    // Within one limit too: past both its counts, the cost it never fits is the one named.
    expect(ledger.decide(5_000, 10n, [{ windowMs: 60_000, maxOperations: 3, maxCostWei: 5n }])).toMatchObject({ limit: 0, exceeded: 'maxCostWei', retryAfterMs: null })
    expect(ledger.decide(5_000, 1n, [{ windowMs: 60_000, maxOperations: 3, maxCostWei: 5n }])).toMatchObject({ exceeded: 'maxOperations' })
  })

  it('takes back a released sponsorship from every window it is in', () => {
    const ledger = new QuotaLedger([])
    const limits: WindowLimit[] = [{ windowMs: 2_000, maxOperations: 1 }, { windowMs: 60_000, maxOperations: 2 }]
    ledger.record(0, 5n)
    const counted = ledger.record(10_000, 7n)
    expect(ledger.decide(10_000, 1n, limits)).toMatchObject({ granted: false, limit: 0 })
    expect(ledger.release(counted.second, 7n)).toEqual({ second: 10, seconds: 1, operations: 0, costWei: 0n })
    expect(ledger.decide(10_000, 1n, limits)).toEqual({ granted: true })
    // Nothing left to release there, and nothing at a second never counted.
    expect(ledger.release(counted.second, 7n)).toBeUndefined()
    expect(ledger.release(3, 1n)).toBeUndefined()
    // A release of a bucket that has left the short window leaves the short window's totals alone.
    const late = new QuotaLedger([])
    const early = late.record(0, 1n)
    late.record(5_000, 1n)
    expect(late.decide(5_000, 1n, limits)).toMatchObject({ granted: false, limit: 0, usedOperations: 1 })
    late.release(early.second, 1n)
    expect(late.decide(5_000, 1n, [limits[1]!])).toEqual({ granted: true })
    expect(late.decide(5_000, 1n, limits)).toMatchObject({ granted: false, limit: 0, usedOperations: 1 })
  })

  it('forgets buckets older than the longest window, and recounts a window that a changed configuration brings', () => {
    const ledger = new QuotaLedger([])
    ledger.record(0, 1n)
    ledger.record(20_000, 1n)
    ledger.record(40_000, 1n)
    const short: WindowLimit[] = [{ windowMs: 30_000, maxOperations: 10 }]
    expect(ledger.decide(45_000, 1n, short)).toMatchObject({ granted: true })
    expect(ledger.prune(45_000, short)).toBe(0)
    expect(ledger.prune(45_000, short)).toBeUndefined()
    // A longer window now counts what is still kept: seconds 20 and 40.
    const long: WindowLimit[] = [{ windowMs: 3_600_000, maxOperations: 2 }]
    expect(ledger.decide(45_000, 1n, long)).toMatchObject({ granted: false, usedOperations: 2 })
    expect(ledger.prune(45_000, long)).toBeUndefined()
    // Everything is forgotten once no limit is left.
    expect(ledger.prune(45_000, [])).toBe(40)
    expect(ledger.decide(45_000, 1n, long)).toEqual({ granted: true })
  })

  it('keeps what a longer retention asks for, whatever the windows of the moment', () => {
    const ledger = new QuotaLedger([])
    ledger.record(0, 1n)
    ledger.record(50_000, 1n)
    const short: WindowLimit[] = [{ windowMs: 1_000, maxOperations: 1 }]
    expect(ledger.decide(60_000, 1n, short)).toEqual({ granted: true })
    expect(ledger.prune(60_000, short, 3_600_000)).toBeUndefined()
    expect(ledger.decide(60_000, 1n, [{ windowMs: 3_600_000, maxOperations: 2 }])).toMatchObject({ granted: false, usedOperations: 2 })
    expect(ledger.prune(60_000, short, 30_000)).toBe(0)
    expect(ledger.newestCountMs).toBe(50_999)
  })

  it('keeps its buckets in order should the clock step back, and reads them back in any order', () => {
    const ledger = new QuotaLedger([])
    ledger.record(5_500, 1n)
    expect(ledger.record(4_000, 2n)).toEqual({ second: 5, seconds: 1, operations: 2, costWei: 3n })
    // A bucket reused after a step back that a short window has already passed does not count in that window.
    const second: WindowLimit[] = [{ windowMs: 1_000, maxOperations: 1 }]
    expect(ledger.decide(8_000, 1n, second)).toEqual({ granted: true })
    ledger.record(3_000, 1n)
    expect(ledger.decide(8_000, 1n, second)).toEqual({ granted: true })
    expect(ledger.decide(8_000, 1n, [{ windowMs: 60_000, maxOperations: 3 }])).toMatchObject({ granted: false, usedOperations: 3 })
    const restored = new QuotaLedger([
      { second: 50, seconds: 1, operations: 1, costWei: 4n },
      { second: 10, seconds: 1, operations: 3, costWei: 6n },
    ])
    expect(restored.decide(55_000, 0n, [{ windowMs: 60_000, maxOperations: 4 }])).toMatchObject({ granted: false, usedOperations: 4, usedCostWei: 10n })
    // Second 10 leaves first: at 10,999 + 50,000.
    expect(restored.decide(55_000, 0n, [{ windowMs: 50_000, maxOperations: 4 }])).toMatchObject({ granted: false, usedOperations: 4, retryAfterMs: 5_999 })
    expect(restored.decide(61_000, 0n, [{ windowMs: 50_000, maxOperations: 4 }])).toEqual({ granted: true })
  })

  it('merges many buckets where only a longer window sees them, keeping every window\u2019s counts', () => {
    const ledger = new QuotaLedger([])
    const limits: WindowLimit[] = [
      { windowMs: 60_000, maxOperations: 60 },
      { windowMs: 86_400_000, maxOperations: 10_000 },
    ]
    const lengths = limits.map((limit) => limit.windowMs)
    const mergedTo: number[] = []
    let most = 0
    for (let second = 0; second < 10_000; second++) {
      ledger.record(second * 1_000, 1n)
      if (ledger.mergeIfMany(second * 1_000, lengths)) mergedTo.push(ledger.all().length)
      most = Math.max(most, ledger.all().length)
    }
    // Past 4,096 buckets (twice what a merge left, when more): those older than the minute go into buckets of 24 s.
    expect(most).toBe(4_096)
    expect(mergedTo).toHaveLength(2)
    expect(mergedTo[1]).toBeLessThan(60 + 8_000 / 24 + 2)
    const buckets = ledger.all()
    expect(buckets.reduce((sum, bucket) => sum + bucket.operations, 0)).toBe(10_000)
    expect(Math.max(...buckets.map((bucket) => bucket.seconds))).toBe(24)
    const now = 9_999_999
    // The minute still counts to the second; the day counts everything.
    expect(ledger.decide(now, 1n, [limits[0]!])).toMatchObject({ granted: false, usedOperations: 60, retryAfterMs: 1_000 })
    expect(ledger.decide(now, 1n, [limits[1]!])).toMatchObject({ granted: false, usedOperations: 10_000, usedCostWei: 10_000n })
    // A merged bucket leaves the day late by at most 24 s: the first sponsorship's second, 0, leaves at 86,400 s at
    // the earliest, and by 86,424 s.
    const firstLeaves = ledger.decide(now, 1n, [limits[1]!]) as { retryAfterMs: number }
    expect(firstLeaves.retryAfterMs + now).toBeGreaterThanOrEqual(86_400_000)
    expect(firstLeaves.retryAfterMs + now).toBeLessThanOrEqual(86_424_000)
    // Windows under two hours merge nothing, and say so (nothing to store again).
    const exact = new QuotaLedger(Array.from({ length: 5_000 }, (_, second) => ({ second, seconds: 1, operations: 1, costWei: 1n })))
    expect(exact.mergeIfMany(5_000_000, [7_000_000])).toBe(false)
    expect(exact.all()).toHaveLength(5_000)
    // A release finds the merged bucket that holds its second.
    const holding = buckets.find((bucket) => bucket.second <= 100 && 100 < bucket.second + bucket.seconds)!
    expect(ledger.release(100, 1n)).toBe(holding)
    expect(ledger.decide(now, 1n, [limits[1]!])).toEqual({ granted: true })
    expect(ledger.decide(now, 1n, [{ windowMs: 86_400_000, maxOperations: 9_999 }])).toMatchObject({ granted: false, usedOperations: 9_999 })
  })
})
