import { readFileSync } from 'node:fs'
import { totalmem } from 'node:os'
import { getHeapStatistics } from 'node:v8'

/** Above this share of a memory limit the enclave logs a warning (preload, and the periodic watch). */
export const memoryWarnRatio = 0.7

/** One thing that can run out: what is in use, and its limit. */
export type MemoryGauge = { what: string; inUseBytes: number; limitBytes: number }

/**
 * The enclave's memory, by what would run out first: the resident set against
 * the enclave's memory (an enclave's whole VM is its own, so `os.totalmem()`);
 * the whole VM's memory in use, MemTotal − MemAvailable, which also counts
 * what the resident set does not, such as an enclave's root filesystem,
 * held in RAM; and the V8 heap against its limit. Preloaded keys live off the
 * heap, in the resident set; the JSON they were parsed from lives on the heap.
 */
export function processMemory(readMeminfo: () => string = () => readFileSync('/proc/meminfo', 'utf8')): MemoryGauge[] {
  const heap = getHeapStatistics()
  const system = systemMemory(readMeminfo)
  return [
    { what: 'resident memory', inUseBytes: process.memoryUsage.rss(), limitBytes: totalmem() },
    { what: 'V8 heap', inUseBytes: heap.used_heap_size, limitBytes: heap.heap_size_limit },
    ...(system ? [system] : []),
  ]
}

const meminfoTotal = /^MemTotal:\s+(\d+) kB$/m
const meminfoAvailable = /^MemAvailable:\s+(\d+) kB$/m

/** MemTotal − MemAvailable against MemTotal, from /proc/meminfo; undefined where there is none to read. */
function systemMemory(readMeminfo: () => string): MemoryGauge | undefined {
  let text: string
  try {
    text = readMeminfo()
  } catch {
    return undefined
  }
  const total = Number(meminfoTotal.exec(text)?.[1])
  const available = Number(meminfoAvailable.exec(text)?.[1])
  if (!(total > 0) || !(available >= 0)) return undefined
  return { what: 'memory in use (MemTotal − MemAvailable)', inUseBytes: (total - available) * 1024, limitBytes: total * 1024 }
}

/** What HEALTH reports of the enclave's memory (the parent's /metrics shows it, since nothing can scrape the enclave itself). */
export function memoryFigures(): { residentBytes: number; heapUsedBytes: number } {
  return { residentBytes: process.memoryUsage.rss(), heapUsedBytes: getHeapStatistics().used_heap_size }
}

/** The gauge closest to its limit. */
export function tightestMemory(gauges: MemoryGauge[]): MemoryGauge & { ratio: number } {
  return gauges.map((gauge) => ({ ...gauge, ratio: gauge.inUseBytes / gauge.limitBytes })).reduce((a, b) => (b.ratio > a.ratio ? b : a))
}

/**
 * Logs `memory_high` once each time the tightest gauge climbs past 70% of its
 * limit, and `memory_normal` when it falls back below 65% (the gap keeps a
 * level near the mark from logging on every check). Call `check` on a timer.
 */
export function memoryWatch(options: { log: (fields: Record<string, unknown>) => void; read?: () => MemoryGauge[] }): { check(): void } {
  const read = options.read ?? processMemory
  let high = false
  return {
    check() {
      const { what, inUseBytes, limitBytes, ratio } = tightestMemory(read())
      const percent = Math.round(ratio * 100)
      if (!high && ratio > memoryWarnRatio) {
        high = true
        options.log({ level: 'warn', event: 'memory_high', what, inUseBytes, limitBytes, percent })
      } else if (high && ratio < memoryWarnRatio - 0.05) {
        high = false
        options.log({ event: 'memory_normal', what, inUseBytes, limitBytes, percent })
      }
    },
  }
}
