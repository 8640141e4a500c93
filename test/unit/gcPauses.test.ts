import { afterEach, describe, expect, it } from 'vitest'
import { startGcPauseLog, type GcPauseLog } from '../bench/gcPauses.js'

/** Enough short-lived garbage for several scavenges, then a turn of the event loop for the entries to arrive. */
async function makeGarbage(): Promise<void> {
  let kept = 0
  for (let i = 0; i < 2_000_000; i++) kept += { i, text: `object ${i}` }.text.length
  expect(kept).toBeGreaterThan(0)
  await new Promise((resolve) => setTimeout(resolve, 20))
}

describe("the benchmark's GC pause log", () => {
  let log: GcPauseLog | undefined
  afterEach(() => {
    log?.stop()
    log = undefined
  })

  it('counts the pauses this process makes, and forgets them on reset', async () => {
    log = startGcPauseLog()
    await makeGarbage()
    const seen = log.read()
    expect(seen.pauses).toBeGreaterThan(0)
    expect(seen.maxPauseMs).toBeGreaterThan(0)
    expect(seen.pausedMsPerSecond).toBeGreaterThan(0)

    log.reset()
    expect(log.read()).toEqual({ pauses: 0, pausedMsPerSecond: 0, maxPauseMs: 0 })
  })

  it('counts nothing once stopped', async () => {
    log = startGcPauseLog()
    log.stop()
    await makeGarbage()
    expect(log.read().pauses).toBe(0)
  })
})
