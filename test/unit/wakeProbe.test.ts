import { afterEach, describe, expect, it } from 'vitest'
import { startWakeProbe, type WakeProbe } from '../bench/wakeProbe.js'

describe('the benchmark wake-up probe', () => {
  let probe: WakeProbe | undefined
  afterEach(async () => {
    await probe?.stop()
    probe = undefined
  })

  it('counts one wake-up per 2 ms sleep, with ordered quantiles, and forgets them on reset', async () => {
    probe = startWakeProbe()
    const started = performance.now()
    await new Promise((resolve) => setTimeout(resolve, 400))
    const seen = probe.read()
    // At most one per 2 ms of the time that really passed (a busy machine may wake this test late, not the probe);
    // far fewer only if the thread never ran.
    expect(seen.samples).toBeGreaterThan(20)
    expect(seen.samples).toBeLessThanOrEqual((performance.now() - started) / 2 + 1)
    expect(seen.p50Ms).toBeGreaterThan(0)
    expect(seen.p50Ms).toBeLessThanOrEqual(seen.p99Ms)
    // The quantiles are bucket upper edges (50 µs), the maximum is exact: p99 can overshoot it by under a bucket.
    expect(seen.p99Ms).toBeLessThanOrEqual(seen.maxMs + 0.05)

    // Its thread runs on meanwhile: the wake-ups after the reset are at most one per 2 ms since it (a busy machine
    // can hold this thread between the two calls).
    const resetAt = performance.now()
    probe.reset()
    const empty = probe.read()
    expect(empty.samples).toBeLessThanOrEqual((performance.now() - resetAt) / 2 + 1)
    if (empty.samples === 0) expect(empty.p99Ms).toBeNaN()
  })

  it('stops its thread', async () => {
    const stopping = startWakeProbe()
    await stopping.stop()
    const after = stopping.read().samples
    await new Promise((resolve) => setTimeout(resolve, 50))
    expect(stopping.read().samples).toBe(after)
  })
})
