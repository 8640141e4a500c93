import { randomBytes } from 'node:crypto'
import { link, readdir, readFile, rename, rm, writeFile } from 'node:fs/promises'
import { join } from 'node:path'

/**
 * One process at a time per store directory: two parents appending to one
 * log, or one compacting it under the other, lose acknowledged keys.
 *
 * The lock is a file, LOCK, naming its holder: pid, and on Linux the boot id
 * and the process's start time (/proc/PID/stat), so that a lock left by a
 * process that is gone (kill -9, a crash, a reboot, its pid since reused) is
 * recognised as stale and taken over, while a live holder's is refused.
 * - A lock appears whole or not at all: it is written under another name
 *   and hard-linked into place, which fails if a lock is there. Of processes
 *   starting together exactly one gets it, and none reads a lock half written.
 * - A stale lock is replaced, never removed, so LOCK is always there for the
 *   others' links to fail on; the replacing is done under a second lock of
 *   the same kind, LOCK.takeover, and only if LOCK is still the stale one
 *   read. A takeover lock whose holder died (in the instant of a takeover)
 *   stops the next start with a message: removing it by name could remove
 *   another process's live one.
 * Processes in different pid namespaces (containers) cannot see each other:
 * share a store directory only on one host.
 */
export const LOCK_FILE_NAME = 'LOCK'
const TAKEOVER_FILE_NAME = 'LOCK.takeover'

export class DirectoryLockedError extends Error {}

export type DirectoryLock = { release(): Promise<void> }

type Holder = { pid: number; bootId: string; startTime: string }

export async function lockDirectory(directory: string): Promise<DirectoryLock> {
  const path = join(directory, LOCK_FILE_NAME)
  const takeover = join(directory, TAKEOVER_FILE_NAME)
  const text = `${JSON.stringify(await describeProcess(process.pid))}\n`
  const draft = `${path}.${randomBytes(6).toString('hex')}`
  await writeFile(draft, text, { mode: 0o600 })
  try {
    // Each pass either locks, refuses, or sees another process's takeover under way and waits for it.
    for (let pass = 0; pass < 100; pass++) {
      if (await linked(draft, path)) return await ownLock({ directory, path, text })
      const found = await readFile(path, 'utf8').catch(() => undefined)
      if (found === undefined) continue
      const holder = parseHolder(found)
      if (holder && (await isAlive(holder))) {
        throw new DirectoryLockedError(`the store directory ${directory} is in use by process ${holder.pid}; only one parent may open a store at a time`)
      }
      if (await linked(draft, takeover)) {
        try {
          // Still the stale lock read: replaced in one step by ours (draft's name goes with it).
          if ((await readFile(path, 'utf8').catch(() => undefined)) === found) {
            await rename(draft, path)
            return await ownLock({ directory, path, text })
          }
        } finally {
          await rm(takeover, { force: true })
        }
        continue
      }
      const takingText = await readFile(takeover, 'utf8').catch(() => undefined)
      // Done and removed since our link failed: look again.
      if (takingText === undefined) continue
      const taking = parseHolder(takingText)
      if (taking && (await isAlive(taking))) {
        await new Promise((resolve) => setTimeout(resolve, 10))
        continue
      }
      // Its holder died in the instant of a takeover. Removing it by name could remove another's live one, so an operator decides.
      throw new DirectoryLockedError(
        `the store directory ${directory} has a takeover lock (${TAKEOVER_FILE_NAME}) left by process ${taking?.pid ?? 'unknown'}, which is gone; make sure no other parent uses this directory, then remove ${takeover}`,
      )
    }
    throw new DirectoryLockedError(`could not lock the store directory ${directory}: other processes keep taking its lock`)
  } finally {
    await rm(draft, { force: true })
  }
}

/** The lock, once ours; drafts that processes now gone left behind (a kill between writing one and removing it) are cleared. */
async function ownLock({ directory, path, text }: { directory: string; path: string; text: string }): Promise<DirectoryLock> {
  for (const name of await readdir(directory).catch(() => [])) {
    if (!/^LOCK\.[0-9a-f]{12}$/.test(name)) continue
    const holder = parseHolder(await readFile(join(directory, name), 'utf8').catch(() => ''))
    // A live process's draft is its way in: only the dead's go.
    if (holder && !(await isAlive(holder))) await rm(join(directory, name), { force: true })
  }
  // Once, every caller sharing its outcome: a second removal could find the same text in a lock that another open in
  // this process took since. One that failed may be tried again.
  let releasing: Promise<void> | undefined
  const removeOwn = async () => {
    const found = await readFile(path, 'utf8').catch((error: NodeJS.ErrnoException) => {
      if (error.code === 'ENOENT') return ''
      throw error
    })
    // Only our own: a lock someone took over meanwhile is theirs.
    if (found === text) await rm(path, { force: true })
  }
  return {
    release: () => {
      releasing ??= removeOwn().catch((error: unknown) => {
        releasing = undefined
        throw error
      })
      return releasing
    },
  }
}

/** Whether `from` could be linked as `to`; false if `to` exists. */
async function linked(from: string, to: string): Promise<boolean> {
  try {
    await link(from, to)
    return true
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'EEXIST') return false
    throw error
  }
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
  // Another boot: its holder is gone, whatever has its pid now.
  if (now.bootId !== '' && holder.bootId !== '' && now.bootId !== holder.bootId) return false
  // Empty where /proc did not say (not Linux, a read that failed, now or when the holder wrote its lock): the pid
  // alone decides, and it exists. Taking a live holder's lock would put two parents on one log.
  return now.startTime === '' || holder.startTime === '' || now.startTime === holder.startTime
}

/** The boot id and the process's start time (clock ticks since boot, field 22 of /proc/PID/stat); empty where unreadable. */
async function describeProcess(pid: number): Promise<Holder> {
  const bootId = (await readFile('/proc/sys/kernel/random/boot_id', 'utf8').catch(() => '')).trim()
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => '')
  // The command name (field 2) is in parentheses and may hold spaces: count fields after its closing one.
  const startTime = stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19] ?? ''
  return { pid, bootId, startTime }
}
