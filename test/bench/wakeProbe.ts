import { Worker } from 'node:worker_threads'

/**
 * How long a thread that has nothing to do but wake up waits for a CPU on
 * this machine, measured while a benchmark runs. A worker thread sleeps 2 ms
 * at a time (a futex wait, no event loop) and records how late each wake-up
 * is. Every process in the benchmark pays that wait at each hand-off between
 * processes or threads, so it is the floor under their tail latency that no
 * code of ours can lower: the cores are shared with the load generator, and on
 * a VM with the hypervisor's other guests.
 *
 * The counts live in shared memory, so reading them costs the benchmark no
 * messages; 500 wake-ups a second cost well under 1% of a core, but each one
 * competes for a CPU with the processes measured, which raised their p99 by
 * 2–7 ms in three alternating pairs: bench:origin runs it only on request.
 */
const sleepMs = 2
const bucketMicros = 50
/** 50 µs buckets up to 100 ms; the last counts everything later. */
const buckets = 2_000

const probeThread = `
const { workerData } = require('node:worker_threads')
const { counts, control, sleepMs, bucketMicros } = workerData
const sleeper = new Int32Array(new SharedArrayBuffer(4))
while (Atomics.load(control, 0) === 0) {
  const started = performance.now()
  Atomics.wait(sleeper, 0, 0, sleepMs)
  const lateMicros = (performance.now() - started - sleepMs) * 1000
  Atomics.add(counts, Math.min(Math.max(0, Math.floor(lateMicros / bucketMicros)), counts.length - 1), 1)
  if (lateMicros > Atomics.load(control, 1)) Atomics.store(control, 1, Math.round(lateMicros))
}
`

export type WakeDelay = { samples: number; p50Ms: number; p99Ms: number; maxMs: number }

export type WakeProbe = {
  /** Forgets what was recorded so far. */
  reset(): void
  /** The wake-up delays recorded since the last reset. */
  read(): WakeDelay
  stop(): Promise<void>
}

export function startWakeProbe(): WakeProbe {
  const counts = new Int32Array(new SharedArrayBuffer(buckets * 4))
  // [0]: 1 asks the thread to stop; [1]: the longest delay so far, in µs.
  const control = new Int32Array(new SharedArrayBuffer(8))
  const worker = new Worker(probeThread, { eval: true, workerData: { counts, control, sleepMs, bucketMicros } })
  // A benchmark that fails before it stops the probe still exits.
  worker.unref()
  const exited = new Promise<void>((resolve) => worker.once('exit', () => resolve()))
  return {
    reset() {
      for (let i = 0; i < counts.length; i++) Atomics.store(counts, i, 0)
      Atomics.store(control, 1, 0)
    },
    read() {
      const snapshot = Array.from(counts, (_, i) => Atomics.load(counts, i))
      const samples = snapshot.reduce((a, b) => a + b, 0)
      // A quantile is the upper edge of the bucket it falls in.
      const quantile = (q: number) => {
        if (samples === 0) return NaN
        let seen = 0
        for (let i = 0; i < snapshot.length; i++) {
          seen += snapshot[i]!
          if (seen >= q * samples) return Number((((i + 1) * bucketMicros) / 1_000).toFixed(2))
        }
        return NaN
      }
      return { samples, p50Ms: quantile(0.5), p99Ms: quantile(0.99), maxMs: Number((Atomics.load(control, 1) / 1_000).toFixed(2)) }
    },
    async stop() {
      Atomics.store(control, 0, 1)
      await exited
    },
  }
}
