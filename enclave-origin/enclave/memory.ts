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
 * held in RAM; the V8 heap against its limit; and, where the process runs in
 * a memory-limited cgroup (a container, in development), that cgroup's
 * memory against its limit, which the kernel enforces before the others run
 * out. Preloaded keys live off the heap, in the resident set; the JSON they
 * were parsed from lives on the heap. `readFile` reads /proc and /sys files.
 */
export function processMemory(readFile: (path: string) => string = (path) => readFileSync(path, 'utf8')): MemoryGauge[] {
  const heap = getHeapStatistics()
  const quietly = (path: string) => {
    try {
      return readFile(path)
    } catch {
      return undefined
    }
  }
  const system = systemMemory(quietly('/proc/meminfo'))
  const cgroup = cgroupMemory(quietly)
  return [
    { what: 'resident memory', inUseBytes: process.memoryUsage.rss(), limitBytes: totalmem() },
    { what: 'V8 heap', inUseBytes: heap.used_heap_size, limitBytes: heap.heap_size_limit },
    ...(system ? [system] : []),
    ...(cgroup ? [cgroup] : []),
  ]
}

/**
 * The memory cgroup's use against its limit, cgroup v2 (`memory.current` of `memory.max`) or v1
 * (`memory.usage_in_bytes` of `memory.limit_in_bytes`), at the process's own cgroup path or, in a container whose
 * cgroup namespace hides it, at the root of the mount. Its use counts page cache, which the kernel reclaims before
 * it runs out: the inactive file pages (`memory.stat`) are left out, as container runtimes do (the share file read
 * for a preload would otherwise count twice). Undefined without a limit below the machine's memory.
 */
function cgroupMemory(read: (path: string) => string | undefined): MemoryGauge | undefined {
  const membership = read('/proc/self/cgroup') ?? ''
  const v2Path = /^0::(\/.*)$/m.exec(membership)?.[1]
  const v1Path = /^\d+:(?:[^:]*,)?memory(?:,[^:]*)?:(\/.*)$/m.exec(membership)?.[1]
  // The process's own cgroup directory under the mount, then the mount's root.
  const directories = (mount: string, path: string | undefined) => (path === undefined ? [] : [path === '/' ? mount : `${mount}${path}`, mount])
  const layouts = [
    ...directories('/sys/fs/cgroup/memory', v1Path).map((directory) => ({ directory, limit: 'memory.limit_in_bytes', usage: 'memory.usage_in_bytes' })),
    ...directories('/sys/fs/cgroup', v2Path).map((directory) => ({ directory, limit: 'memory.max', usage: 'memory.current' })),
  ]
  for (const { directory, limit, usage } of layouts) {
    const file = (name: string) => read(`${directory}/${name}`)
    const limitText = file(limit)?.trim()
    if (limitText === undefined) continue
    const limitBytes = Number(limitText)
    const usedBytes = Number(file(usage)?.trim())
    // 'max' (v2), or v1's "no limit" (a number near 2^63): nothing tighter than the machine.
    if (!(limitBytes > 0 && limitBytes < totalmem() && usedBytes >= 0)) return undefined
    // v2 names it inactive_file; v1 has that (its own) and total_inactive_file (with its children's, as its usage counts).
    const stat = file('memory.stat') ?? ''
    const inactiveFile = Number((/^total_inactive_file (\d+)$/m.exec(stat) ?? /^inactive_file (\d+)$/m.exec(stat))?.[1] ?? 0)
    return { what: 'cgroup memory', inUseBytes: Math.max(0, usedBytes - inactiveFile), limitBytes }
  }
  return undefined
}

const meminfoTotal = /^MemTotal:\s+(\d+) kB$/m
const meminfoAvailable = /^MemAvailable:\s+(\d+) kB$/m

/** MemTotal − MemAvailable against MemTotal, from /proc/meminfo; undefined where there is none to read. */
function systemMemory(text: string | undefined): MemoryGauge | undefined {
  if (text === undefined) return undefined
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
