import { randomBytes } from 'node:crypto'
import { readFile, rename, rm, writeFile } from 'node:fs/promises'
import { join } from 'node:path'

/**
 * One process at a time per store directory: two parents appending to one
 * log, or one compacting it under the other, lose acknowledged keys.
 *
 * The lock is a file, LOCK, naming its holder: pid, and on Linux the boot id
 * and the process's start time (/proc/PID/stat), so that a lock left by a
 * process that is gone (kill -9, a crash, a reboot, its pid since reused) is
 * recognised as stale and taken over, while a live holder's is refused. A
 * stale lock is renamed away before a new one is made with O_EXCL, so of two
 * processes taking over the same stale lock one wins. Processes in different
 * pid namespaces (containers) cannot see each other: share a store directory
 * only on one host.
 */
export const LOCK_FILE_NAME = 'LOCK'

export class DirectoryLockedError extends Error {}

export type DirectoryLock = { release(): Promise<void> }

type Holder = { pid: number; bootId: string; startTime: string }

export async function lockDirectory(directory: string): Promise<DirectoryLock> {
  const path = join(directory, LOCK_FILE_NAME)
  const me = await describeProcess(process.pid)
  const text = `${JSON.stringify(me)}\n`
  for (let attempt = 0; attempt < 3; attempt++) {
    try {
      await writeFile(path, text, { flag: 'wx', mode: 0o600 })
      return {
        release: async () => {
          // Only our own: a lock someone took over meanwhile is theirs.
          if ((await readFile(path, 'utf8').catch(() => '')) === text) await rm(path, { force: true })
        },
      }
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== 'EEXIST') throw error
    }
    const holder = parseHolder(await readFile(path, 'utf8').catch(() => ''))
    if (holder && (await isAlive(holder))) {
      throw new DirectoryLockedError(`the store directory ${directory} is in use by process ${holder.pid}; only one parent may open a store at a time`)
    }
    // Stale (or unreadable: a holder that died while writing it). Renamed, not removed: only one taker's rename succeeds.
    const aside = `${path}.stale-${randomBytes(6).toString('hex')}`
    if (await rename(path, aside).then(() => true, () => false)) await rm(aside, { force: true })
  }
  throw new DirectoryLockedError(`could not lock the store directory ${directory}: other processes keep taking its lock`)
}

function parseHolder(text: string): Holder | undefined {
  try {
    const { pid, bootId, startTime } = JSON.parse(text) as Partial<Holder>
    return Number.isInteger(pid) && typeof bootId === 'string' && typeof startTime === 'string' ? { pid: pid!, bootId, startTime } : undefined
  } catch {
    return undefined
  }
}

async function isAlive(holder: Holder): Promise<boolean> {
  try {
    process.kill(holder.pid, 0)
  } catch (error) {
    // EPERM: it exists, as another user.
    if ((error as NodeJS.ErrnoException).code !== 'EPERM') return false
  }
  const now = await describeProcess(holder.pid)
  // Empty where /proc is not there to say (not Linux): the pid alone decides.
  return now.bootId === holder.bootId && now.startTime === holder.startTime
}

/** The boot id and the process's start time (clock ticks since boot, field 22 of /proc/PID/stat); empty where unreadable. */
async function describeProcess(pid: number): Promise<Holder> {
  const bootId = (await readFile('/proc/sys/kernel/random/boot_id', 'utf8').catch(() => '')).trim()
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => '')
  // The command name (field 2) is in parentheses and may hold spaces: count fields after its closing one.
  const startTime = stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19] ?? ''
  return { pid, bootId, startTime }
}
