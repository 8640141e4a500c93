import { PerformanceObserver } from 'node:perf_hooks'

/**
 * This process's own garbage-collection pauses, as Node reports them
 * (`gc` performance entries). The load generator shares the CPU with what it
 * measures, and a pause of its own holds back every request it should send
 * and every answer it should time: in diagnostic runs directly on the
 * enclave, 29–39 of the 40–53 stretches with requests over 10 ms began at
 * one of the generator's scavenges. Each run reports them, so that a tail
 * that is the generator's can be told apart from the origin's.
 */
export type GcPauses = { pauses: number; pausedMsPerSecond: number; maxPauseMs: number }

export type GcPauseLog = {
  /** Forgets what was recorded so far and starts the clock for `pausedMsPerSecond`. */
  reset(): void
  /** The pauses since the last reset (entries arrive asynchronously: read after yielding to the event loop). */
  read(): GcPauses
  stop(): void
}

export function startGcPauseLog(): GcPauseLog {
  let pauses = 0
  let pausedMs = 0
  let maxPauseMs = 0
  let since = performance.now()
  const observer = new PerformanceObserver((list) => {
    for (const entry of list.getEntries()) {
      pauses++
      pausedMs += entry.duration
      if (entry.duration > maxPauseMs) maxPauseMs = entry.duration
    }
  })
  observer.observe({ entryTypes: ['gc'] })
  return {
    reset() {
      pauses = 0
      pausedMs = 0
      maxPauseMs = 0
      since = performance.now()
    },
    read() {
      const seconds = Math.max((performance.now() - since) / 1_000, 1e-3)
      return { pauses, pausedMsPerSecond: Number((pausedMs / seconds).toFixed(1)), maxPauseMs: Number(maxPauseMs.toFixed(2)) }
    },
    stop() {
      observer.disconnect()
    },
  }
}
