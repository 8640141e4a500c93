import { execFileSync } from 'node:child_process'
import { readdirSync, readFileSync } from 'node:fs'

/** CPU accounting for the benchmarks, from /proc (Linux): per process tree, and host-wide. */

export const clockTicksPerSecond = (() => {
  try {
    const ticks = Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8', timeout: 5_000 }).trim())
    return ticks > 0 ? ticks : 100
  } catch {
    return 100
  }
})()

export type ProcStat = { pid: number; ppid: number; comm: string; ticks: number }

/** utime+stime of one process from /proc/<pid>/stat, or undefined if it is gone. */
function readStat(pid: number): ProcStat | undefined {
  let text: string
  try {
    text = readFileSync(`/proc/${pid}/stat`, 'utf8')
  } catch {
    return undefined
  }
  // "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ')'.
  const close = text.lastIndexOf(')')
  const comm = text.slice(text.indexOf('(') + 1, close)
  const fields = text.slice(close + 2).split(' ') // fields[0] is field 3 (state)
  const field = (n: number) => Number(fields[n - 3])
  return { pid, ppid: field(4), comm, ticks: field(14) + field(15) }
}

/** Every process in /proc, read once: pass it to processTree and kernelThreads to measure them at the same moment. */
export function allProcesses(): ProcStat[] {
  return readdirSync('/proc')
    .filter((name) => /^\d+$/.test(name))
    .map((name) => readStat(Number(name)))
    .filter((stat): stat is ProcStat => stat !== undefined)
}

/** The process `root` and all its descendants, found through the ppid links in /proc. */
export function processTree(root: number, all = allProcesses()): ProcStat[] {
  const tree: ProcStat[] = []
  const queue = [root]
  while (queue.length > 0) {
    const pid = queue.shift()!
    const stat = all.find((s) => s.pid === pid)
    if (!stat) continue
    tree.push(stat)
    queue.push(...all.filter((s) => s.ppid === pid).map((s) => s.pid))
  }
  return tree
}

/** CPU ms used by each process of the tree between two snapshots, summed by command name. */
export function cpuMsByCommand(before: ProcStat[], after: ProcStat[]): Record<string, number> {
  const start = new Map(before.map((s) => [s.pid, s.ticks]))
  const byCommand: Record<string, number> = {}
  for (const stat of after) {
    const ms = ((stat.ticks - (start.get(stat.pid) ?? 0)) * 1_000) / clockTicksPerSecond
    byCommand[stat.comm] = (byCommand[stat.comm] ?? 0) + ms
  }
  return byCommand
}

/**
 * The kernel's own threads (kthreadd, pid 2, and its children): the
 * machine's housekeeping, such as kdamond, kworkers and ksoftirqd, which
 * takes the same cores as the processes measured. Kernel threads in another
 * PID namespace are not visible; then this is empty.
 */
export function kernelThreads(all = allProcesses()): ProcStat[] {
  return all.filter((stat) => stat.pid === 2 || stat.ppid === 2)
}

/**
 * The sampling intervals (ms) of the kernel's DAMON monitors that are on
 * (kdamond threads; /sys/kernel/mm/damon/admin), empty where there are none
 * or no sysfs to say. On the machine these benchmarks were written on,
 * kdamond woke every 500 ms and took a core for 10-20 ms, and the slow
 * requests came in bursts at that period (see the README).
 */
export function damonSampleIntervalsMs(): number[] {
  const root = '/sys/kernel/mm/damon/admin/kdamonds'
  const intervals: number[] = []
  try {
    for (const kdamond of readdirSync(root).filter((name) => /^\d+$/.test(name))) {
      if (readFileSync(`${root}/${kdamond}/state`, 'utf8').trim() !== 'on') continue
      for (const context of readdirSync(`${root}/${kdamond}/contexts`).filter((name) => /^\d+$/.test(name))) {
        intervals.push(Number(readFileSync(`${root}/${kdamond}/contexts/${context}/monitoring_attrs/intervals/sample_us`, 'utf8')) / 1_000)
      }
    }
  } catch {
    // No DAMON, or not readable here.
  }
  return intervals
}

/**
 * The whole host's ticks (all cores) from the first line of /proc/stat: `busy`
 * is what this machine ran, `steal` the time its virtual CPUs wanted to run
 * and the hypervisor ran something else. On a VM steal is a wait every
 * process here pays in latency, so the benchmarks report it on its own.
 */
export function hostTicks(): { busy: number; steal: number } {
  // cpu user nice system idle iowait irq softirq steal guest guest_nice (guest is already in user)
  const [user, nice, system, , , irq, softirq, steal] = readFileSync('/proc/stat', 'utf8').split('\n')[0]!.trim().split(/\s+/).slice(1).map(Number)
  return { busy: [user, nice, system, irq, softirq].reduce((a: number, b) => a + (b ?? 0), 0), steal: steal ?? 0 }
}

/** The q-quantile (0..1) of ascending-sorted values. */
export function percentile(sorted: ArrayLike<number>, q: number): number {
  if (sorted.length === 0) return NaN
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))]!
}
