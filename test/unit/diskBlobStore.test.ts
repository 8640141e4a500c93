import { spawn } from 'node:child_process'
import { appendFile, cp, mkdir, mkdtemp, open, readdir, readFile, rename, rm, rmdir, stat, symlink, truncate, writeFile, type FileHandle } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'
import { pathToFileURL } from 'node:url'
import { afterEach, beforeEach, describe, expect, it } from 'vitest'
import {
  COMPACTING_FILE_NAME,
  crc32,
  DATA_KEY_COPIES_FILE_NAME,
  LOG_FILE_NAME,
  openDiskBlobStore,
  STATE_JOURNAL_FILE_NAME,
  type BlobStoreFileSystem,
  type CompactionEvent,
  type DamageEvent,
  type DataKeyFromCopiesEvent,
  type DiskBlobStore,
  type DiskBlobStoreOptions,
  type LogFile,
} from '../../enclave-origin/parent/diskBlobStore.js'
import { lockDirectory, LOCK_FILE_NAME } from '../../enclave-origin/parent/directoryLock.js'
import { KeyArchivedError, WrappedDekChangedError } from '../../enclave-origin/parent/blobStore.js'
import { listAll, sealedRecord } from '../support/sealedRecords.js'

const projectRoot = resolve(import.meta.dirname, '../..')
const storeModule = join(projectRoot, 'enclave-origin/parent/diskBlobStore.ts')

let directory: string
/** Every store a test opens, closed afterwards even when the test fails. */
let opened: DiskBlobStore[]

beforeEach(async () => {
  directory = await mkdtemp(join(tmpdir(), 'disk-blob-store-'))
  opened = []
})

afterEach(async () => {
  await Promise.allSettled(opened.map((store) => store.close()))
  await rm(directory, { recursive: true, force: true })
})

async function openStore(options: Omit<DiskBlobStoreOptions, 'directory'> = {}): Promise<DiskBlobStore> {
  const store = await openDiskBlobStore({ directory, ...options })
  opened.push(store)
  return store
}

async function reopen(store: DiskBlobStore): Promise<DiskBlobStore> {
  await store.close()
  return openStore()
}

const logPath = () => join(directory, LOG_FILE_NAME)
const journalPath = () => join(directory, STATE_JOURNAL_FILE_NAME)
const dataKeysPath = () => join(directory, DATA_KEY_COPIES_FILE_NAME)
/** Both files start with a 16-byte header. */
const HEADER_BYTES = 16

async function flipByte(path: string, offset: number): Promise<void> {
  const bytes = await readFile(path)
  bytes[offset]! ^= 0xff
  await writeFile(path, bytes)
}

/** Node's file system, with some of a file's operations replaced: `tap` gives the replacements for each file as it is opened. */
function tappedFileSystem(tap: (path: string, handle: FileHandle) => Partial<LogFile>): BlobStoreFileSystem {
  return {
    async open(path, flags) {
      const handle = await open(path, flags)
      return {
        read: (buffer, offset, length, position) => handle.read(buffer, offset, length, position),
        write: (buffer, offset, length) => handle.write(buffer, offset, length),
        sync: () => handle.sync(),
        truncate: (length) => handle.truncate(length),
        stat: () => handle.stat(),
        close: () => handle.close(),
        ...tap(path, handle),
      }
    },
  }
}

/**
 * Node's file system, with writes or fsyncs failing on files whose path ends with `only` (every file without it);
 * with `armedBy`, only once a file whose path ends with that has been opened (a compaction's new log, say).
 */
function faultyFileSystem(failing: { sync: boolean; write: boolean; only?: string; armedBy?: string }): BlobStoreFileSystem {
  let armed = failing.armedBy === undefined
  return tappedFileSystem((path, handle) => {
    if (failing.armedBy !== undefined && path.endsWith(failing.armedBy)) armed = true
    const faulty = armed && (failing.only === undefined || path.endsWith(failing.only))
    return {
      write: async (buffer, offset, length) => {
        if (faulty && failing.write) throw Object.assign(new Error('ENOSPC: no space left on device'), { code: 'ENOSPC' })
        return handle.write(buffer, offset, length)
      },
      sync: async () => {
        if (faulty && failing.sync) throw Object.assign(new Error('EIO: i/o error, fsync'), { code: 'EIO' })
        return handle.sync()
      },
    }
  })
}

describe('crc32', () => {
  it('matches the standard check value, so other tools can verify the log', () => {
    expect(crc32(Buffer.from('123456789'))).toBe(0xcbf43926)
    expect(crc32(Buffer.from('6789'), crc32(Buffer.from('12345')))).toBe(0xcbf43926)
  })
})

describe('round trips across close and reopen', () => {
  it('creates a missing store directory, owner-only, and fsyncs each parent that gained one', async () => {
    const nested = join(directory, 'not', 'yet')
    const synced: string[] = []
    const fileSystem: BlobStoreFileSystem = {
      open: async (path, flags) => {
        if (flags === 'r') synced.push(path)
        return (await open(path, flags)) as unknown as LogFile
      },
    }
    const store = await openDiskBlobStore({ directory: nested, fileSystem })
    opened.push(store)
    await store.put(sealedRecord(1))
    expect((await stat(nested)).mode & 0o777).toBe(0o700)
    // Each directory that gained an entry, from the deepest up, then the store directory for its new log and again for its journal.
    expect(synced).toEqual([join(directory, 'not'), directory, nested, nested])
    await store.close()
    // Found there, the store directory and its own parent are fsynced again: whoever made them may have died first.
    synced.length = 0
    const again = await openDiskBlobStore({ directory: nested, fileSystem })
    opened.push(again)
    expect(await again.get('key-1')).toEqual(sealedRecord(1))
    expect(synced).toEqual([join(directory, 'not'), nested])
    await again.close()
    // A parent it may pass through but not read: that fsync is skipped, and the store opens as it did before it.
    const unreadable: BlobStoreFileSystem = {
      open: async (path, flags) => {
        if (flags === 'r' && path === join(directory, 'not')) throw Object.assign(new Error(`EACCES: permission denied, open '${path}'`), { code: 'EACCES' })
        return (await open(path, flags)) as unknown as LogFile
      },
    }
    const third = await openDiskBlobStore({ directory: nested, fileSystem: unreadable })
    opened.push(third)
    expect(await third.get('key-1')).toEqual(sealedRecord(1))
  })

  it('makes a store directory named through a missing directory and `..`, as mkdir -p does, and fsyncs what gained it', async () => {
    const synced: string[] = []
    const fileSystem: BlobStoreFileSystem = {
      open: async (path, flags) => {
        if (flags === 'r') synced.push(path)
        return (await open(path, flags)) as unknown as LogFile
      },
    }
    // Not join(), which would take the `..` out. mkdir makes `missing` on its way; it is no ancestor of the store.
    const store = await openDiskBlobStore({ directory: `${directory}/missing/../made/here`, fileSystem })
    opened.push(store)
    await store.put(sealedRecord(1))
    expect(synced).toEqual([join(directory, 'made'), directory, join(directory, 'made', 'here'), join(directory, 'made', 'here')])
  })

  it('reads a `..` after a symlink as the kernel does: the store is beside the link\'s target', async () => {
    await mkdir(join(directory, 'other', 'real'), { recursive: true })
    await mkdir(join(directory, 'here'))
    await symlink(join(directory, 'other', 'real'), join(directory, 'here', 'link'))
    const store = await openDiskBlobStore({ directory: `${directory}/here/link/../store` })
    opened.push(store)
    await store.put(sealedRecord(1))
    await store.close()
    expect((await readdir(join(directory, 'other', 'store'))).length).toBeGreaterThan(0)
    await expect(stat(join(directory, 'here', 'store'))).rejects.toThrow('ENOENT')
    const again = await openDiskBlobStore({ directory: join(directory, 'other', 'store') })
    opened.push(again)
    expect(await again.get('key-1')).toEqual(sealedRecord(1))
  })

  it('keeps records, the latest version, state changes and the wrapped DEK', async () => {
    let store = await openStore()
    await store.put(sealedRecord(1))
    await store.put(sealedRecord(2))
    await store.put(sealedRecord(2, 3))
    await store.setState('key-1', 'frozen')
    await store.putWrappedDek({ keyId: 'alias/dek', ciphertext: Uint8Array.of(1, 2, 3) }, await store.getWrappedDek())
    await store.putWrappedDek({ keyId: 'alias/dek', ciphertext: Uint8Array.of(9, 9) }, await store.getWrappedDek())

    for (let round = 0; round < 2; round++) {
      expect(await store.get('key-1')).toEqual({ ...sealedRecord(1), state: 'frozen' })
      expect(await store.get('key-2')).toEqual(sealedRecord(2, 3))
      expect(await store.get('key-3')).toBeUndefined()
      expect(await store.getWrappedDek()).toEqual({ keyId: 'alias/dek', ciphertext: Uint8Array.of(9, 9) })
      const listed = await listAll(store)
      expect(listed.map((record) => record.keyId).sort()).toEqual(['key-1', 'key-2'])
      store = await reopen(store)
    }
  })

  it('keeps the retiring DEK of a rotation under way, and forgets it when the rotation ends', async () => {
    let store = await openStore()
    const rotating = { keyId: 'alias/dek', ciphertext: Uint8Array.of(2, 2), retiring: { keyId: 'alias/old', ciphertext: Uint8Array.of(1, 1, 1) } }
    await store.putWrappedDek(rotating, await store.getWrappedDek())
    store = await reopen(store)
    expect(await store.getWrappedDek()).toEqual(rotating)
    await store.putWrappedDek({ keyId: 'alias/dek', ciphertext: Uint8Array.of(2, 2) }, await store.getWrappedDek())
    store = await reopen(store)
    expect(await store.getWrappedDek()).toEqual({ keyId: 'alias/dek', ciphertext: Uint8Array.of(2, 2) })
    await expect(store.putWrappedDek({ ...rotating, retiring: { keyId: '', ciphertext: Uint8Array.of(1) } }, await store.getWrappedDek())).rejects.toThrow('keyId must be a non-empty string')
  })

  it('keeps an archived key archived: a put from an earlier read stays archived, and no state change brings it back', async () => {
    let store = await openStore()
    await store.put(sealedRecord(1))
    await store.setState('key-1', 'archived')
    // A re-seal made from a read taken before the archiving.
    await store.put(sealedRecord(1, 2))
    expect(await store.get('key-1')).toEqual({ ...sealedRecord(1, 2), state: 'archived' })
    for (const state of ['active', 'frozen'] as const) await expect(store.setState('key-1', state)).rejects.toThrow(KeyArchivedError)
    // Queued together, not yet durable: the put lands after the archiving, and keeps it.
    await store.put(sealedRecord(2))
    await Promise.all([store.setState('key-2', 'archived'), store.put(sealedRecord(2, 2))])
    store = await reopen(store)
    expect((await listAll(store)).map((record) => [record.keyId, record.version, record.state])).toEqual([
      ['key-1', 2, 'archived'],
      ['key-2', 2, 'archived'],
    ])
    await expect(store.setState('key-1', 'active')).rejects.toThrow('key key-1 is archived, which is final: its state cannot change')
  })

  it('writes a wrapped DEK only over the one its caller read, counting the DEK writes queued before it', async () => {
    const store = await openStore()
    const first = { keyId: 'alias/dek', ciphertext: Uint8Array.of(1) }
    const second = { keyId: 'alias/dek', ciphertext: Uint8Array.of(2), retiring: first }
    await store.putWrappedDek(first, undefined)
    await expect(store.putWrappedDek(second, undefined)).rejects.toThrow(WrappedDekChangedError)
    await expect(store.putWrappedDek(second, { ...first, retiring: first })).rejects.toThrow(WrappedDekChangedError)
    // Two written at once, both read before either: the second is refused, though the first is not durable yet.
    const writes = await Promise.allSettled([store.putWrappedDek(second, first), store.putWrappedDek({ keyId: 'alias/dek', ciphertext: Uint8Array.of(3), retiring: first }, first)])
    expect(writes.map((write) => write.status)).toEqual(['fulfilled', 'rejected'])
    expect(await (await reopen(store)).getWrappedDek()).toEqual(second)
  })

  it('starts empty, with no wrapped DEK', async () => {
    const store = await openStore()
    expect(await listAll(store)).toEqual([])
    expect(await store.getWrappedDek()).toBeUndefined()
  })

  it('hands out copies, so a caller mutating a record does not change the store', async () => {
    const store = await openStore()
    const record = sealedRecord(1)
    const durable = store.put(record)
    record.sealed.fill(0)
    await durable
    const stored = await store.get('key-1')
    stored!.publicKey.fill(0)
    expect(await store.get('key-1')).toEqual(sealedRecord(1))
  })

  it('refuses a key id with a lone surrogate, which UTF-8 would store as another id', async () => {
    const store = await openStore()
    for (const keyId of ['k\ud800', 'k\udc00']) {
      await expect(store.put({ ...sealedRecord(1), keyId })).rejects.toThrow('keyId must be well-formed Unicode (it holds a lone surrogate)')
    }
    await store.put({ ...sealedRecord(1), keyId: 'k\u{1f511}' })
    expect((await listAll(await reopen(store))).map((record) => record.keyId)).toEqual(['k\u{1f511}'])
  })

  it('refuses a record larger than a damaged log could be searched for (64 KiB), and goes on', async () => {
    const store = await openStore()
    await expect(store.put({ ...sealedRecord(1), sealed: new Uint8Array(70_000) })).rejects.toThrow(/^record of 70\d{3} bytes exceeds the store's 65536$/)
    await store.put(sealedRecord(2))
    expect((await listAll(await reopen(store))).map((record) => record.keyId)).toEqual(['key-2'])
  })

  it('opens, writes and compacts on when the operator\u2019s callbacks throw', async () => {
    const throwing = () => {
      throw new Error('the log sink broke')
    }
    let store = await openDiskBlobStore({ directory, compactAfterFrames: 4, onCompaction: throwing })
    opened.push(store)
    for (let round = 0; round < 12; round++) await store.put(sealedRecord(1, round + 1))
    expect(store.stats().compactedFrames).toBeGreaterThan(0)
    await store.close()
    // Its frames twice over, a byte of the first copy flipped: damage with good frames after it.
    const log = await readFile(logPath())
    const damaged = Buffer.from(log)
    damaged[HEADER_BYTES + 20]! ^= 0xff
    await writeFile(logPath(), Buffer.concat([damaged, log.subarray(HEADER_BYTES)]))
    const damage: string[] = []
    store = await openDiskBlobStore({ directory, onDamage: (event) => (damage.push(event.keptAside), throwing()) })
    opened.push(store)
    expect(damage).toHaveLength(1)
    expect(await store.get('key-1')).toEqual(sealedRecord(1, 12))
  })

  it('refuses a state change for an unknown key and a version older than the stored one', async () => {
    const store = await openStore()
    await expect(store.setState('missing', 'archived')).rejects.toThrow(/not stored/)
    await store.put(sealedRecord(1, 5))
    await expect(store.put(sealedRecord(1, 4))).rejects.toThrow(/older/)
    await expect(store.put({ ...sealedRecord(2), state: 'lost' as never })).rejects.toThrow(/unknown key state/)
  })

  it('makes writes queued before close durable, and refuses writes after it', async () => {
    const store = await openStore({ groupCommitMs: 1_000 })
    const durable = store.put(sealedRecord(1))
    await store.close()
    await durable
    await expect(store.put(sealedRecord(2))).rejects.toThrow(/closed/)
    expect(await (await openStore()).get('key-1')).toEqual(sealedRecord(1))
  })
})

describe('group commit', () => {
  it('resolves 5,000 concurrent puts with far fewer fsyncs than puts, all there after reopen', async () => {
    let store = await openStore()
    const count = 5_000
    await Promise.all(Array.from({ length: count }, (_, index) => store.put(sealedRecord(index))))
    const stats = store.stats()
    expect(stats.records).toBe(count)
    expect(stats.groups).toBeGreaterThanOrEqual(Math.ceil(count / 1024))
    expect(stats.fsyncs).toBeLessThan(count / 100)
    expect(stats.writes).toBeLessThan(count / 100)

    store = await reopen(store)
    const listed = await listAll(store)
    expect(listed).toHaveLength(count)
    expect(await store.get('key-4321')).toEqual(sealedRecord(4321))
  })

  it('flushes at once when maxGroup is reached, without waiting for the timer', async () => {
    const store = await openDiskBlobStore({ directory, groupCommitMs: 60_000, maxGroup: 10 })
    opened.push(store)
    await Promise.all(Array.from({ length: 30 }, (_, index) => store.put(sealedRecord(index))))
    expect(store.stats().groups).toBe(3)
  })
})

describe('the state journal', () => {
  /** key-1 and key-2 stored, then `changes` (state changes, each a frame in both files), then key-3: the two files' sizes after each change. */
  async function stateChangesBetweenPuts(changes: Array<[keyId: string, state: 'active' | 'frozen']>) {
    const store = await openStore()
    await store.put(sealedRecord(1))
    await store.put(sealedRecord(2))
    const log = [(await stat(logPath())).size]
    const journal = [(await stat(journalPath())).size]
    for (const [keyId, state] of changes) {
      await store.setState(keyId, state)
      log.push((await stat(logPath())).size)
      journal.push((await stat(journalPath())).size)
    }
    await store.put(sealedRecord(3))
    await store.close()
    return { log, journal }
  }

  it('holds a freeze that damage took out of the middle of the log: the journal has it', async () => {
    const { log } = await stateChangesBetweenPuts([['key-1', 'frozen']])
    await flipByte(logPath(), log[1]! - 1)

    const damage: DamageEvent[] = []
    let store = await openStore({ onDamage: (event) => damage.push(event) })
    expect(damage).toEqual([{ ranges: [{ offset: log[0], bytes: log[1]! - log[0]! }], keptAside: expect.stringContaining(`${LOG_FILE_NAME}.damaged-`) }])
    expect((await store.get('key-1'))?.state).toBe('frozen')
    expect(await store.get('key-2')).toEqual(sealedRecord(2))
    expect(await store.get('key-3')).toEqual(sealedRecord(3))
    // The rewrite after damage carries the state in key-1's record, and the journal starts again from it.
    expect((await stat(journalPath())).size).toBe(HEADER_BYTES)
    store = await reopen(store)
    expect((await store.get('key-1'))?.state).toBe('frozen')
    expect(damage).toHaveLength(1)
  })

  it('holds a freeze that damage took out of the journal, by the log, and reports that damage too', async () => {
    const { journal } = await stateChangesBetweenPuts([
      ['key-1', 'frozen'],
      ['key-2', 'frozen'],
    ])
    await flipByte(journalPath(), journal[1]! - 1)

    const damage: DamageEvent[] = []
    const store = await openStore({ onDamage: (event) => damage.push(event) })
    expect(damage).toEqual([{ ranges: [{ offset: journal[0], bytes: journal[1]! - journal[0]! }], keptAside: expect.stringContaining(`${STATE_JOURNAL_FILE_NAME}.damaged-`) }])
    expect((await store.get('key-1'))?.state).toBe('frozen')
    expect((await store.get('key-2'))?.state).toBe('frozen')
    expect((await stat(journalPath())).size).toBe(HEADER_BYTES)
  })

  it('leaves a key frozen whose unfreeze damage took out of either file: the more restrictive state stands', async () => {
    for (const damaged of ['log', 'journal'] as const) {
      const sizes = await stateChangesBetweenPuts([
        ['key-1', 'frozen'],
        ['key-1', 'active'],
        ['key-2', 'frozen'],
      ])
      await flipByte(damaged === 'log' ? logPath() : journalPath(), sizes[damaged][2]! - 1)
      const damage: DamageEvent[] = []
      const store = await openStore({ onDamage: (event) => damage.push(event) })
      expect(damage, damaged).toHaveLength(1)
      expect((await store.get('key-1'))?.state, damaged).toBe('frozen')
      expect((await store.get('key-2'))?.state, damaged).toBe('frozen')
      await store.close()
      await rm(directory, { recursive: true })
    }
  })

  it('a state change whose journal write fails is refused, as is every write after it until the store is reopened', async () => {
    let store = await openStore()
    await store.put(sealedRecord(1))
    await store.close()
    store = await openStore({ fileSystem: faultyFileSystem({ sync: false, write: true, only: STATE_JOURNAL_FILE_NAME }) })
    await expect(store.setState('key-1', 'frozen')).rejects.toThrow(/reopen it to recover: ENOSPC/)
    await expect(store.put(sealedRecord(2))).rejects.toThrow(/reopen/)
    await store.close()
    // The log has the freeze, the journal not: never acknowledged, and the more restrictive state stands.
    store = await openStore()
    expect((await store.get('key-1'))?.state).toBe('frozen')
    await store.setState('key-1', 'active')
    store = await reopen(store)
    expect((await store.get('key-1'))?.state).toBe('active')
  })

  it('a journal that cannot be emptied after a compaction stops the store taking writes, reported as a compaction that failed', async () => {
    let store = await openStore()
    await Promise.all(Array.from({ length: 10 }, (_, index) => store.put(sealedRecord(index))))
    await store.close()
    const events: CompactionEvent[] = []
    // Writes to the journal fail; the log's do not, and no state change asks for a journal write before the compaction.
    store = await openDiskBlobStore({ directory, compactAfterFrames: 20, onCompaction: (event) => events.push(event), fileSystem: faultyFileSystem({ sync: false, write: true, only: STATE_JOURNAL_FILE_NAME }) })
    opened.push(store)
    expect(events).toEqual([])
    // Newer versions of the same ten keys: past 20 frames, more than twice the live ones, the next group compacts.
    for (let version = 2; version <= 4; version++) await Promise.all(Array.from({ length: 10 }, (_, index) => store.put(sealedRecord(index, version)).catch(() => {})))
    expect(events).toEqual([{ outcome: 'failed', error: expect.stringMatching(/^could not empty the state journal: ENOSPC/), serving: false }])
    expect(store.writeFailure()).toMatch(/could not empty its state journal/)
    await expect(store.put(sealedRecord(11))).rejects.toThrow(/reopen/)
    // Reopened, with writes that work: the compacted log and a journal started again.
    store = await reopen(store)
    expect(await store.get('key-9')).toEqual(sealedRecord(9, 3))
    expect((await stat(journalPath())).size).toBe(HEADER_BYTES)
  })

  it('truncates a torn journal tail, and refuses a journal that is not one', async () => {
    const { journal } = await stateChangesBetweenPuts([['key-1', 'frozen']])
    await appendFile(journalPath(), Buffer.from('\x30\x00\x00\x00torn'))
    let store = await openStore()
    expect((await store.get('key-1'))?.state).toBe('frozen')
    expect((await stat(journalPath())).size).toBe(journal[1])
    await store.close()

    // A record log's frames under the journal's header: not state changes only.
    const log = await readFile(logPath())
    const header = (await readFile(journalPath())).subarray(0, HEADER_BYTES)
    await writeFile(journalPath(), Buffer.concat([header, log.subarray(HEADER_BYTES)]))
    await expect(openStore()).rejects.toThrow(`${journalPath()} holds a put entry; a key state journal holds state changes only`)
    await writeFile(journalPath(), log)
    await expect(openStore()).rejects.toThrow(`${journalPath()} is not a key state journal (bad header)`)
    // Neither refusal kept the store's lock: with a journal again, it opens.
    await writeFile(journalPath(), header)
    store = await openStore()
    expect((await store.get('key-1'))?.state).toBe('frozen')
  })
})

describe('the copies of the wrapped DEK', () => {
  const first = { keyId: 'alias/dek', ciphertext: Uint8Array.of(1, 1, 1) }
  const rotating = { keyId: 'alias/dek', ciphertext: Uint8Array.of(2, 2), retiring: first }
  const rotated = { keyId: 'alias/dek', ciphertext: Uint8Array.of(2, 2) }

  /** `first` and key-1 stored, then a rotation's new DEK (`rotating`), then key-2: the log's size before and after the new DEK's frame, and the copies' size. */
  async function rotationBetweenPuts() {
    const store = await openStore()
    await store.putWrappedDek(first, undefined)
    await store.put(sealedRecord(1))
    const before = (await stat(logPath())).size
    await store.putWrappedDek(rotating, first)
    const after = (await stat(logPath())).size
    await store.put(sealedRecord(2))
    await store.close()
    return { before, after, copies: (await stat(dataKeysPath())).size }
  }

  it('opens with the newest DEK when damage took its frame out of the log: its copy has it', async () => {
    const { before, after } = await rotationBetweenPuts()
    await flipByte(logPath(), after - 1)
    const damage: DamageEvent[] = []
    let store = await openStore({ onDamage: (event) => damage.push(event) })
    expect(damage).toEqual([{ ranges: [{ offset: before, bytes: after - before }], keptAside: expect.stringContaining(`${LOG_FILE_NAME}.damaged-`) }])
    expect(await store.getWrappedDek()).toEqual(rotating)
    expect(await store.get('key-2')).toEqual(sealedRecord(2))
    // The rewrite after damage holds it in the log again; the rotation carries on from it.
    store = await reopen(store)
    expect(await store.getWrappedDek()).toEqual(rotating)
    await store.putWrappedDek(rotated, rotating)
    expect(await (await reopen(store)).getWrappedDek()).toEqual(rotated)
    expect(damage).toHaveLength(1)
  })

  it('compacts one at a time at open when the DEK came from its copies and the log is wasteful: each rewrite succeeds', async () => {
    let store = await openStore()
    await store.putWrappedDek(first, undefined)
    // Ten versions of one key: ten frames, one live.
    for (let version = 1; version <= 10; version++) await store.put(sealedRecord(1, version))
    const before = (await stat(logPath())).size
    await store.putWrappedDek(rotating, first)
    const after = (await stat(logPath())).size
    await store.put(sealedRecord(2))
    await store.close()
    await flipByte(logPath(), after - 1)
    // The restored DEK's write flushes a group, which compacts the wasteful log; the open's own (forced, after the
    // damage) comes after it, not beside it.
    const compactions: CompactionEvent[] = []
    store = await openStore({ compactAfterFrames: 2, onCompaction: (event) => compactions.push(event) })
    expect(compactions.length).toBeGreaterThanOrEqual(2)
    expect(compactions.filter((event) => event.outcome !== 'compacted')).toEqual([])
    expect(before).toBeLessThan(after)
    expect(await store.getWrappedDek()).toEqual(rotating)
    store = await reopen(store)
    expect(await store.getWrappedDek()).toEqual(rotating)
    expect(await store.get('key-1')).toEqual(sealedRecord(1, 10))
    expect(await store.get('key-2')).toEqual(sealedRecord(2))
  })

  it('opens with the newest DEK when its frame, the log\u2019s last, lost its length or its payload and so passed for a torn tail', async () => {
    for (const harm of ['length', 'payload'] as const) {
      let store = await openStore()
      await store.putWrappedDek(first, undefined)
      await store.put(sealedRecord(1))
      const before = (await stat(logPath())).size
      await store.putWrappedDek(rotating, first)
      await store.close()
      const log = await readFile(logPath())
      if (harm === 'length') log.writeUInt32LE(0x00ffffff, before)
      else log.fill(0, before + 8)
      await writeFile(logPath(), log)
      const restored: DataKeyFromCopiesEvent[] = []
      store = await openStore({ onDataKeyFromCopies: (event) => restored.push(event) })
      expect(await store.getWrappedDek(), harm).toEqual(rotating)
      // Said at error level, with the log as it was left (its cut tail gone) kept aside.
      expect(restored, harm).toEqual([{ logDamaged: false, keptAside: expect.stringContaining(`${LOG_FILE_NAME}.damaged-`) }])
      expect((await readFile(restored[0]!.keptAside!)).equals(log.subarray(0, before)), harm).toBe(true)
      // Written back to the log at once: the next open finds it there.
      expect(await (await reopen(store)).getWrappedDek(), harm).toEqual(rotating)
      await Promise.all(opened.splice(0).map((each) => each.close()))
      await rm(directory, { recursive: true })
    }
  })

  it('opens with the DEK from the copies when the disk has no room for a copy of the log, and says none was made', async () => {
    const { before, after } = await rotationBetweenPuts()
    // The new DEK's frame, the log's last, lost its length: it passes for a torn tail.
    await truncate(logPath(), after)
    const log = await readFile(logPath())
    log.writeUInt32LE(0x00ffffff, before)
    await writeFile(logPath(), log)
    const restored: DataKeyFromCopiesEvent[] = []
    const noRoom = faultyFileSystem({ sync: false, write: true, only: '.damaged-partial' })
    const store = await openStore({ fileSystem: noRoom, onDataKeyFromCopies: (event) => restored.push(event) })
    expect(restored).toEqual([{ logDamaged: false, keepAsideError: expect.stringContaining('ENOSPC') }])
    expect(await store.getWrappedDek()).toEqual(rotating)
    // The half-made copy is gone.
    expect((await readdir(directory)).filter((name) => name.includes('.damaged'))).toEqual([])
  })

  it('writes a DEK taken from the copies back to the log before anything else: a compaction failing at open cannot lose it', async () => {
    const next = { keyId: 'alias/dek', ciphertext: Uint8Array.of(3, 3), retiring: rotated }
    let store = await openStore()
    await store.putWrappedDek(first, undefined)
    await store.putWrappedDek(rotating, first)
    await store.putWrappedDek(rotated, rotating)
    await store.put(sealedRecord(1))
    const before = (await stat(logPath())).size
    await store.putWrappedDek(next, rotated)
    await store.put(sealedRecord(2))
    await store.close()
    // The newest DEK's frame damaged in the log, and the oldest copy's in the copies; and a torn tail on the log, so
    // that the log as found and as its cut left it differ.
    await flipByte(logPath(), before + 9)
    await flipByte(dataKeysPath(), HEADER_BYTES + 9)
    await appendFile(logPath(), Buffer.from([7, 0, 0]))
    const restored: DataKeyFromCopiesEvent[] = []
    const damage: DamageEvent[] = []
    store = await openStore({
      fileSystem: faultyFileSystem({ sync: false, write: true, only: COMPACTING_FILE_NAME }),
      onDataKeyFromCopies: (event) => restored.push(event),
      onDamage: (event) => damage.push(event),
      onCompaction: () => {},
    })
    // The damage report's copy of the log as found: no second one.
    const logDamage = damage.find((event) => event.keptAside.includes(`${LOG_FILE_NAME}.damaged-`))
    expect(restored).toEqual([{ logDamaged: true, keptAside: logDamage?.keptAside }])
    expect((await readdir(directory)).filter((name) => name.startsWith(`${LOG_FILE_NAME}.damaged-`))).toHaveLength(1)
    expect(await store.getWrappedDek()).toEqual(next)
    store = await reopen(store)
    expect(await store.getWrappedDek()).toEqual(next)
  })

  it('writes the DEK first when it compacts the log, so that damage to its frame is reported rather than cut as a torn tail', async () => {
    let store = await openStore()
    await store.putWrappedDek(first, undefined)
    await store.put(sealedRecord(1))
    for (let round = 0; round < 30; round++) await store.put(sealedRecord(2, round + 1))
    await store.close()
    // Compacted as it opens, and nothing written after: the log is the compaction's alone.
    store = await openStore({ compactAfterFrames: 10 })
    expect(store.stats().compactedFrames).toBe(29)
    await store.close()
    const log = await readFile(logPath())
    // The first frame's payload zeroed, good frames after it.
    log.fill(0, HEADER_BYTES + 8, HEADER_BYTES + 8 + log.readUInt32LE(HEADER_BYTES))
    await writeFile(logPath(), log)
    const damage: DamageEvent[] = []
    store = await openStore({ onDamage: (event) => damage.push(event) })
    expect(damage).toHaveLength(1)
    expect(await store.getWrappedDek()).toEqual(first)
    expect(await listAll(store)).toEqual([sealedRecord(1), sealedRecord(2, 30)])
  })

  it('reports, keeps aside and starts again copies whose header is not theirs; the store opens', async () => {
    await rotationBetweenPuts()
    await writeFile(dataKeysPath(), 'not a copy of anything, and long enough for a header')
    const damage: DamageEvent[] = []
    const store = await openStore({ onDamage: (event) => damage.push(event) })
    expect(damage).toEqual([{ ranges: [{ offset: 0, bytes: 52 }], keptAside: expect.stringContaining(`${DATA_KEY_COPIES_FILE_NAME}.damaged-`) }])
    expect(await readFile(damage[0]!.keptAside, 'utf8')).toBe('not a copy of anything, and long enough for a header')
    expect(await store.getWrappedDek()).toEqual(rotating)
    expect((await stat(dataKeysPath())).size).toBe(await dataKeyCopiesOf([rotating]))
  })

  it('takes a torn DEK frame, a crash\u2019s, for what it is: the DEK before it stands, and nothing is rewritten', async () => {
    const { before, after } = await rotationBetweenPuts()
    // The crash came before the rotation's DEK was fsynced (so before its copy): only the frame's first bytes landed.
    const copiesBefore = await dataKeyCopiesOf([first])
    await truncate(dataKeysPath(), copiesBefore)
    await truncate(logPath(), after - 5)
    const compactions: CompactionEvent[] = []
    const store = await openStore({ onCompaction: (event) => compactions.push(event) })
    expect(await store.getWrappedDek()).toEqual(first)
    expect((await stat(logPath())).size).toBe(before)
    expect((await stat(dataKeysPath())).size).toBe(copiesBefore)
    expect(compactions).toEqual([])
  })

  it('keeps the log\u2019s DEK when the copies lost their newest (a torn tail), and copies it again', async () => {
    const { copies } = await rotationBetweenPuts()
    const torn = copies - 3
    await truncate(dataKeysPath(), torn)
    const store = await openStore()
    expect(await store.getWrappedDek()).toEqual(rotating)
    // The torn frame cut away, and the DEK written there again: the same bytes as before.
    expect((await stat(dataKeysPath())).size).toBe(copies)
  })

  it('reports damage to the copies, and starts them again from the DEK the store opens with', async () => {
    const { copies } = await rotationBetweenPuts()
    await flipByte(dataKeysPath(), HEADER_BYTES + 9)
    const damage: DamageEvent[] = []
    const store = await openStore({ onDamage: (event) => damage.push(event) })
    expect(damage).toEqual([{ ranges: [expect.objectContaining({ offset: HEADER_BYTES })], keptAside: expect.stringContaining(`${DATA_KEY_COPIES_FILE_NAME}.damaged-`) }])
    expect(await store.getWrappedDek()).toEqual(rotating)
    const rotatingFrameBytes = copies - (await dataKeyCopiesOf([first]))
    expect((await stat(dataKeysPath())).size).toBe(HEADER_BYTES + rotatingFrameBytes)
  })

  it('keeps the DEK of a log restored from a backup, undamaged, though the copies hold a newer one', async () => {
    let store = await openStore()
    await store.putWrappedDek(first, undefined)
    await store.put(sealedRecord(1))
    await store.close()
    const backup = await readFile(logPath())
    store = await openStore()
    await store.putWrappedDek(rotating, first)
    await store.putWrappedDek(rotated, rotating)
    await store.close()
    await writeFile(logPath(), backup)
    store = await openStore()
    // The backup's keys are sealed under the DEK it holds.
    expect(await store.getWrappedDek()).toEqual(first)
    // The copies end with it now: damage to the log later (no rotation since) leaves it the DEK, not the newer copies.
    const before = (await stat(logPath())).size
    await store.put(sealedRecord(2))
    await store.put(sealedRecord(3))
    await store.close()
    await flipByte(logPath(), before + 9)
    expect(await (await openStore({ onDamage: () => {} })).getWrappedDek()).toEqual(first)
  })

  it('keeps the log\u2019s DEK, found damaged, when the copies do not hold it: a build without them wrote it', async () => {
    let store = await openStore()
    await store.putWrappedDek(first, undefined)
    await store.close()
    const copiesBefore = await readFile(dataKeysPath())
    store = await openStore({ compactAfterFrames: 10 })
    await store.putWrappedDek(rotating, first)
    await store.putWrappedDek(rotated, rotating)
    // Compacted since: `first` is no longer in the log.
    for (let round = 0; round < 30; round++) await store.put(sealedRecord(2, round + 1))
    expect(store.stats().compactedFrames).toBeGreaterThan(0)
    // Two more records, with no compaction to move them: the first is damaged below.
    store = await reopen(store)
    const before = (await stat(logPath())).size
    await store.put(sealedRecord(3))
    await store.put(sealedRecord(4))
    await store.close()
    await writeFile(dataKeysPath(), copiesBefore)
    await flipByte(logPath(), before + 9)
    const damage: DamageEvent[] = []
    store = await openStore({ onDamage: (event) => damage.push(event) })
    expect(damage).toHaveLength(1)
    expect(await store.getWrappedDek()).toEqual(rotated)
  })

  it('gives a store from before the copies its copy at the next open', async () => {
    let store = await openStore()
    await store.putWrappedDek(first, undefined)
    await store.close()
    await rm(dataKeysPath())
    store = await openStore()
    expect((await stat(dataKeysPath())).size).toBe(await dataKeyCopiesOf([first]))
    expect(await store.getWrappedDek()).toEqual(first)
  })

  it('refuses a DEK write whose copy cannot be made durable, and every write after it until the store is reopened', async () => {
    let failing = false
    const fileSystem = tappedFileSystem((path, handle) => ({
      sync: async () => {
        if (failing && path.endsWith(DATA_KEY_COPIES_FILE_NAME)) throw Object.assign(new Error('EIO: i/o error, fsync'), { code: 'EIO' })
        return handle.sync()
      },
    }))
    let store = await openStore({ fileSystem })
    await store.put(sealedRecord(1))
    failing = true
    await store.put(sealedRecord(2))
    await expect(store.putWrappedDek(first, undefined)).rejects.toThrow(/reopen it to recover: EIO/)
    await expect(store.put(sealedRecord(3))).rejects.toThrow(/reopen/)
    await store.close()
    store = await openStore()
    expect((await listAll(store)).map((record) => record.keyId)).toEqual(['key-1', 'key-2'])
  })

  /** The size of a copies file holding `deks`, as a fresh store writes it. */
  async function dataKeyCopiesOf(deks: Array<typeof first>): Promise<number> {
    const elsewhere = await mkdtemp(join(tmpdir(), 'disk-blob-store-copies-'))
    try {
      const store = await openDiskBlobStore({ directory: elsewhere })
      let previous: typeof first | undefined
      for (const dek of deks) {
        await store.putWrappedDek(dek, previous)
        previous = dek
      }
      await store.close()
      return (await stat(join(elsewhere, DATA_KEY_COPIES_FILE_NAME))).size
    } finally {
      await rm(elsewhere, { recursive: true, force: true })
    }
  }
})

describe('compaction', () => {
  it('rewrites a log that is mostly superseded frames to its live entries, keeping every record, state and the DEK', async () => {
    let store = await openStore()
    for (let index = 0; index < 50; index++) await store.put(sealedRecord(index))
    // 400 superseded frames: state toggles and newer versions of the same keys, and DEK replacements.
    for (let round = 0; round < 4; round++) {
      await Promise.all(Array.from({ length: 50 }, (_, index) => store.setState(`key-${index}`, round % 2 === 0 ? 'frozen' : 'active')))
      await Promise.all(Array.from({ length: 50 }, (_, index) => store.put({ ...sealedRecord(index, round + 2), state: round % 2 === 0 ? 'frozen' : 'active' })))
      await store.putWrappedDek({ keyId: 'alias/dek', ciphertext: Uint8Array.of(round) }, await store.getWrappedDek())
    }
    await store.setState('key-7', 'archived')
    const before = await listAll(store)
    const sizeBefore = (await stat(logPath())).size
    expect((await stat(journalPath())).size).toBeGreaterThan(HEADER_BYTES + 200 * 8)
    await store.close()

    store = await openDiskBlobStore({ directory, compactAfterFrames: 100 })
    opened.push(store)
    // 50 puts + 400 replacements + 4 DEKs + 1 state change in; 50 puts + 1 DEK out.
    expect(store.stats().compactedFrames).toBe(455 - 51)
    // The compacted log's records carry every state: the journal starts again, empty.
    expect((await stat(journalPath())).size).toBe(HEADER_BYTES)
    expect((await stat(logPath())).size).toBeLessThan(sizeBefore / 5)
    expect(await listAll(store)).toEqual(before)
    expect((await store.get('key-7'))?.state).toBe('archived')
    expect(await store.getWrappedDek()).toEqual({ keyId: 'alias/dek', ciphertext: Uint8Array.of(3) })
    // The compacted log takes appends and survives another reopen unchanged.
    await store.put(sealedRecord(99))
    store = await reopen(store)
    expect(store.stats().compactedFrames).toBe(0)
    expect(await listAll(store)).toEqual([...before, sealedRecord(99)])
  })

  it('leaves a log alone below the frame threshold or when most frames are live', async () => {
    let store = await openStore()
    for (let index = 0; index < 20; index++) await store.put(sealedRecord(index))
    for (let index = 0; index < 20; index++) await store.setState(`key-${index}`, 'frozen')
    await store.close()
    const size = (await stat(logPath())).size
    store = await openDiskBlobStore({ directory, compactAfterFrames: 1_000 })
    opened.push(store)
    expect(store.stats().compactedFrames).toBe(0)
    await store.close()
    // 40 frames for 20 live entries is not more than twice as many.
    store = await openStore({ compactAfterFrames: 10 })
    expect(store.stats().compactedFrames).toBe(0)
    expect((await stat(logPath())).size).toBe(size)
  })

  it('refuses to open without its record log while the directory shows it had one, changing nothing, and keeps refusing', async () => {
    let store = await openStore({ compactAfterFrames: 10 })
    await store.put(sealedRecord(1))
    await store.setState('key-1', 'frozen')
    // Compacted since: the journal is empty, and still shows that the store had a log.
    for (let round = 0; round < 30; round++) await store.put(sealedRecord(2, round + 1))
    expect(store.stats().compactedFrames).toBeGreaterThan(0)
    await store.close()
    const refusal = (how: string, found: string, extra = '') =>
      `${LOG_FILE_NAME} is ${how} ${directory}, though ${found} ${found.includes(',') ? 'are' : 'is'} there: its sealed keys and wrapped data key are gone from here. Restore it from a backup${extra}, with ${DATA_KEY_COPIES_FILE_NAME} from the same backup (or none); if this store never held a key, remove ${found} to start it empty`
    await rm(logPath())
    const before = (await readdir(directory)).sort()
    const evidence = `${DATA_KEY_COPIES_FILE_NAME}, ${STATE_JOURNAL_FILE_NAME}`
    await expect(openDiskBlobStore({ directory })).rejects.toThrow(refusal('missing from', evidence))
    expect((await readdir(directory)).sort()).toEqual(before)
    await expect(openDiskBlobStore({ directory })).rejects.toThrow(refusal('missing from', evidence))
    // Found empty, or with a header of zeros (a restore that wrote nothing), it is as lost.
    for (const empty of [Buffer.alloc(0), Buffer.alloc(16)]) {
      await writeFile(logPath(), empty)
      await expect(openDiskBlobStore({ directory })).rejects.toThrow(refusal('empty in', evidence))
    }
    // Either copy alone shows it too.
    await rm(logPath())
    await rm(journalPath())
    await expect(openDiskBlobStore({ directory })).rejects.toThrow(refusal('missing from', DATA_KEY_COPIES_FILE_NAME))
    // A header of zeros with more after it is a damaged log, not an empty one: the recovery refuses it as such.
    await writeFile(logPath(), Buffer.concat([Buffer.alloc(16), Buffer.from('records after it')]))
    await expect(openDiskBlobStore({ directory })).rejects.toThrow(/not a sealed-blob log/)
    await rm(logPath())
    await rm(dataKeysPath())
    // A compaction's new log is evidence, and is not removed by the refused open: it may be a whole copy.
    await writeFile(join(directory, COMPACTING_FILE_NAME), 'a compaction under way')
    await writeFile(join(directory, `${LOG_FILE_NAME}.damaged-0123456789abcdef`), 'kept aside')
    await expect(openDiskBlobStore({ directory })).rejects.toThrow(refusal('missing from', `${COMPACTING_FILE_NAME}, ${LOG_FILE_NAME}.damaged-0123456789abcdef`, ` (${COMPACTING_FILE_NAME} may be a whole copy)`))
    expect(await readFile(join(directory, COMPACTING_FILE_NAME), 'utf8')).toBe('a compaction under way')
    await rm(join(directory, COMPACTING_FILE_NAME))
    await rm(join(directory, `${LOG_FILE_NAME}.damaged-0123456789abcdef`))
    store = await openStore()
    expect(await listAll(store)).toEqual([])
  })

  it('keeps serving from the old log when compaction fails', async () => {
    let store = await openStore()
    for (let round = 0; round < 30; round++) await store.put(sealedRecord(1, round + 1))
    await store.close()
    const fileSystem = faultyFileSystem({ sync: false, write: true, only: COMPACTING_FILE_NAME })
    store = await openDiskBlobStore({ directory, compactAfterFrames: 10, fileSystem })
    opened.push(store)
    expect(store.stats().compactedFrames).toBe(0)
    expect(await store.get('key-1')).toEqual(sealedRecord(1, 30))
    await store.put(sealedRecord(2))
    store = await reopen(store)
    expect(await listAll(store)).toEqual([sealedRecord(1, 30), sealedRecord(2)])
    await expect(stat(join(directory, COMPACTING_FILE_NAME))).rejects.toThrow(/ENOENT/)
  })

  it('fails the open if the compacted log cannot be made durable after the rename, and the next open serves it', async () => {
    let store = await openStore()
    for (let round = 0; round < 30; round++) await store.put(sealedRecord(1, round + 1))
    await store.close()
    const before = (await stat(logPath())).size
    const events: CompactionEvent[] = []
    // Only the directory fsync that follows the rename fails: the open's own, before the compaction, goes through.
    const fileSystem = faultyFileSystem({ sync: true, write: false, only: directory, armedBy: COMPACTING_FILE_NAME })
    await expect(openDiskBlobStore({ directory, compactAfterFrames: 10, fileSystem, onCompaction: (event) => events.push(event) })).rejects.toThrow(
      /^blob store compaction could not be made durable, reopen it to recover: EIO/,
    )
    expect(events).toEqual([{ outcome: 'failed', error: expect.stringContaining('EIO'), serving: false }])
    // The rename happened: the next open finds the compacted log.
    expect((await stat(logPath())).size).toBeLessThan(before / 10)
    store = await openStore()
    expect(await listAll(store)).toEqual([sealedRecord(1, 30)])
  })

  it('refuses every write of a running store whose compacted log cannot be made durable after the rename, until reopened', async () => {
    const events: CompactionEvent[] = []
    const fileSystem = faultyFileSystem({ sync: true, write: false, only: directory, armedBy: COMPACTING_FILE_NAME })
    let store = await openDiskBlobStore({ directory, compactAfterFrames: 10, fileSystem, onCompaction: (event) => events.push(event) })
    opened.push(store)
    // Writes land until the compaction they set off fails after its rename; every later one is refused.
    const outcomes = []
    for (let round = 0; round < 30; round++) outcomes.push(await store.put(sealedRecord(1, round + 1)).then(() => 'stored', (error: Error) => error.message))
    const firstRefused = outcomes.findIndex((outcome) => outcome !== 'stored')
    expect(firstRefused).toBeGreaterThan(0)
    expect(new Set(outcomes.slice(firstRefused))).toEqual(new Set([expect.stringMatching(/^blob store compaction could not be made durable, reopen it to recover: EIO/)]))
    expect(events).toEqual([{ outcome: 'failed', error: expect.stringContaining('EIO'), serving: false }])
    expect(store.writeFailure()).toMatch(/^blob store compaction could not be made durable/)
    store = await reopen(store)
    expect(await listAll(store)).toEqual([sealedRecord(1, firstRefused)])
    expect(store.writeFailure()).toBeUndefined()
  })

  it('compacts a running store between groups; writes queued during it are durable', async () => {
    const events: CompactionEvent[] = []
    let store = await openDiskBlobStore({ directory, compactAfterFrames: 100, onCompaction: (event) => events.push(event) })
    opened.push(store)
    for (let index = 0; index < 10; index++) await store.put(sealedRecord(index))
    for (let round = 0; round < 30; round++) await Promise.all(Array.from({ length: 10 }, (_, index) => store.setState(`key-${index}`, round % 2 === 0 ? 'frozen' : 'active')))
    // 310 frames written for 10 live entries: compacted at least twice on the way, never reopened.
    expect(store.stats().compactedFrames).toBeGreaterThan(180)
    expect(events.length).toBeGreaterThanOrEqual(2)
    expect(events[0]).toMatchObject({ outcome: 'compacted', droppedFrames: 90, liveEntries: 10 })
    expect((await stat(logPath())).size).toBeLessThan(100 * 200)
    // A burst in flight across the next compaction.
    await Promise.all([
      ...Array.from({ length: 200 }, (_, round) => store.setState(`key-${round % 10}`, 'archived')),
      ...Array.from({ length: 20 }, (_, index) => store.put(sealedRecord(100 + index))),
    ])
    const before = await listAll(store)
    expect(before).toHaveLength(30)
    store = await reopen(store)
    expect(await listAll(store)).toEqual(before)
    expect((await store.get('key-3'))?.state).toBe('archived')
  })

  it('writes a compaction a chunk of frames at a time, so that the parent serves between chunks rather than wait for the whole log', async () => {
    const compactionWrites: number[] = []
    const fileSystem = tappedFileSystem((path, handle) =>
      path.endsWith(COMPACTING_FILE_NAME)
        ? {
            write: (buffer, offset, length) => {
              compactionWrites.push(length)
              return handle.write(buffer, offset, length)
            },
          }
        : {},
    )
    // Read when it ends: the compacted file then goes on as the log, taking appends.
    let writesOfCompaction: number[] = []
    let store = await openDiskBlobStore({ directory, compactAfterFrames: 100, fileSystem, onCompaction: () => (writesOfCompaction = [...compactionWrites]) })
    opened.push(store)
    await Promise.all(Array.from({ length: 1_200 }, (_, index) => store.put(sealedRecord(index))))
    for (const state of ['frozen', 'active'] as const) await Promise.all(Array.from({ length: 1_200 }, (_, index) => store.setState(`key-${index}`, state)))
    // Up to 3,600 frames for 1,200 live: compacted once, in three writes of at most 500 frames (the first with the header).
    expect(store.stats().compactedFrames).toBeGreaterThan(2_000)
    expect(writesOfCompaction).toHaveLength(3)
    const before = await listAll(store)
    store = await reopen(store)
    expect(await listAll(store)).toEqual(before)
  })

  it('keeps a running store serving when compaction fails, and tries again only after another threshold of frames', async () => {
    const failing = { sync: false, write: true, only: COMPACTING_FILE_NAME }
    const events: CompactionEvent[] = []
    let store = await openDiskBlobStore({ directory, compactAfterFrames: 50, fileSystem: faultyFileSystem(failing), onCompaction: (event) => events.push(event) })
    opened.push(store)
    for (let round = 0; round < 60; round++) await store.put(sealedRecord(1, round + 1))
    expect(store.stats().compactedFrames).toBe(0)
    expect(events).toEqual([{ outcome: 'failed', error: expect.stringMatching(/ENOSPC/), serving: true }])
    await expect(stat(join(directory, COMPACTING_FILE_NAME))).rejects.toThrow(/ENOENT/)
    failing.write = false
    // The failed attempt was at frame 50: the next is due at 100, not at the next write.
    for (let round = 60; round < 99; round++) await store.put(sealedRecord(1, round + 1))
    expect(store.stats().compactedFrames).toBe(0)
    await store.put(sealedRecord(1, 100))
    // Compaction runs right after the group that reached 100 frames; the next write waits for it.
    await store.put(sealedRecord(2))
    expect(store.stats().compactedFrames).toBe(99)
    store = await reopen(store)
    expect(await listAll(store)).toEqual([sealedRecord(1, 100), sealedRecord(2)])
  })

  it('ignores and removes a half-written compaction left by a crash', async () => {
    let store = await openStore()
    await store.put(sealedRecord(1))
    await store.close()
    await writeFile(join(directory, COMPACTING_FILE_NAME), 'a compaction cut short')
    store = await openStore()
    expect(await listAll(store)).toEqual([sealedRecord(1)])
    await expect(stat(join(directory, COMPACTING_FILE_NAME))).rejects.toThrow(/ENOENT/)
  })
})

describe('torn and corrupt tails', () => {
  async function storeThreeRecords(): Promise<number[]> {
    const store = await openStore()
    const sizes: number[] = []
    for (const index of [1, 2, 3]) {
      await store.put(sealedRecord(index))
      sizes.push((await stat(logPath())).size)
    }
    await store.close()
    return sizes
  }

  /** Puts `count` records, and one of 5,000 sealed bytes after the first half; returns the log's size after each put. */
  async function storeRecordsAndALargeOne(count: number): Promise<number[]> {
    const store = await openStore()
    const sizes: number[] = []
    for (let index = 0; index < count; index++) {
      await store.put(index === count / 2 ? { ...sealedRecord(index), sealed: new Uint8Array(5_000).fill(7) } : sealedRecord(index))
      sizes.push((await stat(logPath())).size)
    }
    await store.close()
    return sizes
  }

  /** Node's file system, noting the length of each read of the record log. */
  function readLengthsOfLog(lengths: number[]): BlobStoreFileSystem {
    return tappedFileSystem((path, handle) =>
      path.endsWith(LOG_FILE_NAME)
        ? {
            read: (buffer, offset, length, position) => {
              lengths.push(length)
              return handle.read(buffer, offset, length, position)
            },
          }
        : {},
    )
  }

  it.each([1_000, 157, 13])('replays the log a chunk at a time (%i bytes), never reading it whole: frames and headers across chunk ends, one longer than a chunk', async (replayChunkBytes) => {
    const sizes = await storeRecordsAndALargeOne(100)
    const lengths: number[] = []
    const store = await openStore({ replayChunkBytes, fileSystem: readLengthsOfLog(lengths) })
    const listed = await listAll(store)
    expect(listed).toHaveLength(100)
    expect(listed.find((record) => record.keyId === 'key-50')!.sealed).toEqual(new Uint8Array(5_000).fill(7))
    expect(await store.get('key-99')).toEqual(sealedRecord(99))
    // A chunk, or what the large frame needs beyond what is read: never the whole log.
    expect(sizes.at(-1)).toBeGreaterThan(18_000)
    expect(Math.max(...lengths)).toBeLessThanOrEqual(5_100)
    expect(lengths.filter((length) => length === replayChunkBytes).length).toBeGreaterThan(10)
  })

  it('opens a log that turns out shorter than its size said (cut meanwhile), as torn where it ends', async () => {
    const sizes = await storeRecordsAndALargeOne(20)
    let cut = false
    const cutAfterStat = tappedFileSystem((path, handle) => ({
      stat: async () => {
        const stats = await handle.stat()
        if (path.endsWith(LOG_FILE_NAME) && !cut) {
          cut = true
          await truncate(path, stats.size - 50)
        }
        return stats
      },
    }))
    const store = await openStore({ replayChunkBytes: 100, fileSystem: cutAfterStat })
    expect(cut).toBe(true)
    expect((await listAll(store)).map((record) => record.keyId).sort()).toEqual(Array.from({ length: 19 }, (_, index) => `key-${index}`).sort())
    expect((await stat(logPath())).size).toBe(sizes[18])
  })

  it.each([
    ['damage and a torn tail', true, Buffer.from('\x40\x00\x00\x00torn')],
    ['a torn tail alone', false, Buffer.from('\x40\x00\x00\x00torn')],
    ['a frame header cut short at the end', false, Buffer.from('\x40\x00\x00')],
  ])('finds the same records, damage and log after %s whatever the chunk', async (_, damaged, tail) => {
    const sizes = await storeRecordsAndALargeOne(40)
    const log = await readFile(logPath())
    if (damaged) log[sizes[24]! + 30]! ^= 0xff
    await writeFile(logPath(), Buffer.concat([log, tail]))
    const copies = [await mkdtemp(join(tmpdir(), 'disk-blob-store-copy-')), await mkdtemp(join(tmpdir(), 'disk-blob-store-copy-'))]
    try {
      for (const copy of copies) await cp(directory, copy, { recursive: true })
      const results = []
      for (const [where, replayChunkBytes] of [[directory, 7], [copies[0]!, 1_000], [copies[1]!, 4 * 1024 * 1024]] as const) {
        const damage: DamageEvent[] = []
        const store = await openDiskBlobStore({ directory: where, replayChunkBytes, onDamage: (event) => damage.push(event) })
        opened.push(store)
        const keptAside = damage.length > 0 ? await readFile(damage[0]!.keptAside) : undefined
        results.push({ keyIds: (await listAll(store)).map((record) => record.keyId).sort(), ranges: damage.map((event) => event.ranges), keptAside, logBytes: (await stat(join(where, LOG_FILE_NAME))).size })
      }
      expect(results[0]).toEqual(results[1])
      expect(results[0]).toEqual(results[2])
      expect(results[0]!.ranges).toEqual(damaged ? [[{ offset: sizes[24], bytes: sizes[25]! - sizes[24]! }]] : [])
      expect(results[0]!.keyIds).toHaveLength(damaged ? 39 : 40)
      if (damaged) expect(results[0]!.keptAside).toEqual(Buffer.concat([log, tail]))
    } finally {
      for (const copy of copies) await rm(copy, { recursive: true, force: true })
    }
  })

  it('truncates appended garbage, keeps every earlier record, and appends after it', async () => {
    const [, , sizeAfterThird] = await storeThreeRecords()
    await appendFile(logPath(), Buffer.from('\x07\x00\x00\x00garbage that never checks out'))

    let store = await openStore()
    expect((await listAll(store)).map((record) => record.keyId).sort()).toEqual(['key-1', 'key-2', 'key-3'])
    expect((await stat(logPath())).size).toBe(sizeAfterThird)
    await store.put(sealedRecord(4))
    store = await reopen(store)
    expect(await listAll(store)).toHaveLength(4)
  })

  it('drops a record cut off mid-write and keeps the ones before it', async () => {
    const [, sizeAfterSecond, sizeAfterThird] = await storeThreeRecords()
    await truncate(logPath(), sizeAfterThird! - 5)

    const store = await openStore()
    expect((await listAll(store)).map((record) => record.keyId).sort()).toEqual(['key-1', 'key-2'])
    expect((await stat(logPath())).size).toBe(sizeAfterSecond)
  })

  it('drops a whole last record whose bytes were corrupted (CRC mismatch), but reports it and copies the log aside first: it may have been acknowledged', async () => {
    const [, sizeAfterSecond, sizeAfterThird] = await storeThreeRecords()
    const bytes = await readFile(logPath())
    bytes[sizeAfterThird! - 1]! ^= 0xff
    await writeFile(logPath(), bytes)

    const damage: DamageEvent[] = []
    const store = await openStore({ onDamage: (event) => damage.push(event) })
    expect(await store.get('key-3')).toBeUndefined()
    expect(await store.get('key-2')).toEqual(sealedRecord(2))
    expect((await stat(logPath())).size).toBe(sizeAfterSecond)
    expect(damage).toEqual([{ ranges: [{ offset: sizeAfterSecond, bytes: sizeAfterThird! - sizeAfterSecond! }], keptAside: expect.stringContaining(`${LOG_FILE_NAME}.damaged-`) }])
    expect(await readFile(damage[0]!.keptAside)).toEqual(bytes)
  })

  it('treats a zero-filled tail (size grew, data never landed) as torn', async () => {
    const [, , sizeAfterThird] = await storeThreeRecords()
    await appendFile(logPath(), Buffer.alloc(4096))
    const store = await openStore()
    expect(await listAll(store)).toHaveLength(3)
    expect((await stat(logPath())).size).toBe(sizeAfterThird)
  })

  it('treats a last frame whose header landed and whose payload is zeros as torn, not damage', async () => {
    const [, sizeAfterSecond, sizeAfterThird] = await storeThreeRecords()
    const bytes = await readFile(logPath())
    // The frame header is length (u32) and checksum (u32): everything after it never landed.
    bytes.fill(0, sizeAfterSecond! + 8, sizeAfterThird)
    await writeFile(logPath(), bytes)
    const damage: DamageEvent[] = []
    const store = await openStore({ onDamage: (event) => damage.push(event) })
    expect((await listAll(store)).map((record) => record.keyId).sort()).toEqual(['key-1', 'key-2'])
    expect(damage).toEqual([])
    expect((await stat(logPath())).size).toBe(sizeAfterSecond)
  })

  it('skips a damaged record in the middle of the log, keeps every acknowledged record after it, and copies the log aside first', async () => {
    const [sizeAfterFirst, sizeAfterSecond] = await storeThreeRecords()
    const damagedLog = await readFile(logPath())
    damagedLog[sizeAfterFirst! + 20]! ^= 0xff
    await writeFile(logPath(), damagedLog)

    const damage: DamageEvent[] = []
    let store = await openStore({ onDamage: (event) => damage.push(event) })
    expect((await listAll(store)).map((record) => record.keyId).sort()).toEqual(['key-1', 'key-3'])
    expect(await store.get('key-3')).toEqual(sealedRecord(3))
    expect(damage).toEqual([{ ranges: [{ offset: sizeAfterFirst, bytes: sizeAfterSecond! - sizeAfterFirst! }], keptAside: expect.stringContaining(`${LOG_FILE_NAME}.damaged-`) }])
    expect(await readFile(damage[0]!.keptAside)).toEqual(damagedLog)

    // The log was rewritten with its good frames: the next open finds no damage, and writes go on.
    await store.put(sealedRecord(4))
    await store.close()
    store = await openStore({ onDamage: (event) => damage.push(event) })
    expect((await listAll(store)).map((record) => record.keyId).sort()).toEqual(['key-1', 'key-3', 'key-4'])
    expect(damage).toHaveLength(1)
  })

  it('after damage, still truncates a torn tail, and keeps one copy of the same damaged log however often it is found', async () => {
    const [sizeAfterFirst, , sizeAfterThird] = await storeThreeRecords()
    const damagedLog = await readFile(logPath())
    damagedLog[sizeAfterFirst! + 20]! ^= 0xff
    const withTornTail = Buffer.concat([damagedLog, Buffer.from('\x30\x00\x00\x00torn')])
    const damage: DamageEvent[] = []
    for (let open = 0; open < 2; open++) {
      // The second time as if the rewrite after the first had never happened, and a crash had cut the first copy short.
      if (open === 1) await writeFile(damage[0]!.keptAside, '')
      await writeFile(logPath(), withTornTail)
      const store = await openStore({ onDamage: (event) => damage.push(event) })
      expect((await listAll(store)).map((record) => record.keyId).sort()).toEqual(['key-1', 'key-3'])
      await store.close()
    }
    expect(damage).toHaveLength(2)
    expect(damage[1]!.keptAside).toBe(damage[0]!.keptAside)
    expect((await readdir(directory)).filter((name) => name.includes('.damaged-'))).toHaveLength(1)
    expect(await readFile(damage[0]!.keptAside)).toEqual(withTornTail)
    expect((await stat(logPath())).size).toBeLessThan(sizeAfterThird!)
  })

  it('refuses to open, keeping the log as found, when the damage is too large to skip quickly', async () => {
    const [sizeAfterFirst] = await storeThreeRecords()
    const log = await readFile(logPath())
    // Every fourth offset of this region reads as a 65,535-byte frame whose CRC must be computed to be refused.
    const costly = Buffer.alloc(128 * 1024)
    for (let i = 0; i < costly.length; i += 4) costly.writeUInt32LE(0xffff, i)
    await writeFile(logPath(), Buffer.concat([log.subarray(0, sizeAfterFirst), costly, log.subarray(sizeAfterFirst)]))
    const asFound = await readFile(logPath())

    await expect(openDiskBlobStore({ directory })).rejects.toThrow(new RegExp(`damaged from byte ${sizeAfterFirst} over more than can be skipped quickly; .* at .*\\.damaged-`))
    // Buffer.equals: a deep toEqual over 130 KB costs a second.
    expect((await readFile(logPath())).equals(asFound)).toBe(true)
    const copies = (await readdir(directory)).filter((name) => name.includes('.damaged-'))
    expect(copies).toHaveLength(1)
    expect((await readFile(join(directory, copies[0]!))).equals(asFound)).toBe(true)
  })

  it('re-creates a log whose header was torn at birth, and refuses a file that is not a log', async () => {
    // Part of the header; or its size in zeros, the data never written.
    for (const torn of [Buffer.from('seal'), Buffer.alloc(16)]) {
      await writeFile(logPath(), torn)
      // Its new header and directory entry made durable before the journal is created, then the journal's: two fsyncs of the directory.
      let directorySyncs = 0
      const fileSystem: BlobStoreFileSystem = {
        open: async (path, flags) => {
          if (flags === 'r' && path === directory) directorySyncs += 1
          return (await open(path, flags)) as unknown as LogFile
        },
      }
      const store = await openStore({ fileSystem })
      expect(directorySyncs).toBe(2)
      await store.put(sealedRecord(1))
      expect(await (await reopen(store)).get('key-1')).toEqual(sealedRecord(1))
      await Promise.all(opened.splice(0).map((each) => each.close()))
      // Every file: a journal or copies beside a log torn at birth cannot happen (the log's header and entry are durable first), and is refused.
      await rm(logPath())
      await rm(journalPath())
      await rm(dataKeysPath())
    }

    await writeFile(logPath(), 'someone else’s file, long enough to have a header')
    await expect(openDiskBlobStore({ directory })).rejects.toThrow(/not a sealed-blob log/)
    expect(await readFile(logPath(), 'utf8')).toBe('someone else’s file, long enough to have a header')
  })
})

describe('failed writes', () => {
  /** The real file system, except that the log's sync or write fails once `failing` says so. */
  it('rejects every put waiting on a failed fsync, and every write after it', async () => {
    const failing = { sync: false, write: false }
    const store = await openStore({ fileSystem: faultyFileSystem(failing) })
    await store.put(sealedRecord(0))
    failing.sync = true

    const outcomes = await Promise.allSettled(Array.from({ length: 50 }, (_, index) => store.put(sealedRecord(index + 1))))
    expect(outcomes.every((outcome) => outcome.status === 'rejected')).toBe(true)
    expect(String((outcomes[0] as PromiseRejectedResult).reason)).toMatch(/EIO/)
    // Nothing written after a failed fsync can be trusted, even if a retry would succeed.
    failing.sync = false
    await expect(store.put(sealedRecord(99))).rejects.toThrow(/reopen/)
    await expect(store.setState('key-0', 'frozen')).rejects.toThrow(/reopen/)
    // The acknowledged record was never in doubt.
    await store.close()
    expect(await (await openStore()).get('key-0')).toEqual(sealedRecord(0))
  })

  it('rejects the puts of a group whose write fails', async () => {
    const failing = { sync: false, write: false }
    const store = await openStore({ fileSystem: faultyFileSystem(failing) })
    failing.write = true
    const outcomes = await Promise.allSettled([store.put(sealedRecord(1)), store.putWrappedDek({ keyId: 'k', ciphertext: Uint8Array.of(1) }, undefined)])
    expect(outcomes.map((outcome) => outcome.status)).toEqual(['rejected', 'rejected'])
    expect(await store.get('key-1')).toBeUndefined()
    // Said for the parent's /healthz, until a reopen.
    expect(store.writeFailure()).toBe('blob store write failed, reopen it to recover: ENOSPC: no space left on device')
    failing.write = false
    expect((await reopen(store)).writeFailure()).toBeUndefined()
  })
})

describe('crash', () => {
  it('keeps every put that resolved before kill -9', { timeout: 60_000 }, async () => {
    const script = join(directory, 'writer.mjs')
    const storeDirectory = join(directory, 'store')
    await mkdir(storeDirectory)
    await writeFile(
      script,
      `import { openDiskBlobStore } from ${JSON.stringify(pathToFileURL(storeModule).href)}
const store = await openDiskBlobStore({ directory: process.argv[2] })
process.stdout.write('ready\\n')
let next = 0
async function writer() {
  for (;;) {
    const keyId = 'key-' + next++
    await store.put({ keyId, version: 1, state: 'active', publicKey: new Uint8Array(65).fill(4), sealed: new Uint8Array(60).fill(next % 256) })
    process.stdout.write(keyId + '\\n')
  }
}
await Promise.all(Array.from({ length: 32 }, writer))
`,
    )

    const child = spawn(process.execPath, ['--import', 'tsx', script, storeDirectory], { cwd: projectRoot, stdio: ['ignore', 'pipe', 'pipe'] })
    let stdout = ''
    let stderr = ''
    child.stdout.setEncoding('utf8').on('data', (chunk: string) => (stdout += chunk))
    child.stderr.setEncoding('utf8').on('data', (chunk: string) => (stderr += chunk))
    const exited = new Promise<NodeJS.Signals | null>((resolveExit) => child.once('exit', (_code, signal) => resolveExit(signal)))

    // Killed mid-stream once more than 100 writes are acknowledged, however slow this machine's fsync.
    await new Promise<void>((acknowledged, failed) => {
      const onData = () => {
        if (stdout.split('\n').length > 102) child.stdout.off('data', onData), acknowledged()
      }
      child.stdout.on('data', onData)
      child.once('exit', () => failed(new Error(`writer exited before it was killed: ${stderr}`)))
    })
    child.kill('SIGKILL')
    expect(await exited).toBe('SIGKILL')

    // Only whole lines: a line cut short by the kill was never fully printed.
    const printed = stdout.split('\n').slice(1, -1)
    expect(printed.length).toBeGreaterThan(100)

    const store = await openDiskBlobStore({ directory: storeDirectory })
    opened.push(store)
    const stored = new Set<string>()
    for await (const record of store.list()) stored.add(record.keyId)
    const missing = printed.filter((keyId) => !stored.has(keyId))
    expect(missing).toEqual([])
    expect(stored.size).toBeGreaterThanOrEqual(printed.length)
  })
})

describe('crash during state changes', () => {
  it('after kill -9 mid-stream of freezes and unfreezes, with compactions along the way, each key has its last acknowledged state', { timeout: 60_000 }, async () => {
    const script = join(directory, 'toggler.mjs')
    const storeDirectory = join(directory, 'store')
    // Written with writeSync, so a line is in the file before the toggler goes on: stdout to a pipe is asynchronous, and
    // lines still buffered in the process would be lost to the kill while the changes after them landed.
    const journalOfChanges = join(directory, 'changes.txt')
    await mkdir(storeDirectory)
    // 64 keys, each toggled by a writer of its own: the odd ones stop after a few changes, the even ones go on to the
    // kill. A compaction every few hundred frames empties the state journal as it goes, after the odd ones have settled.
    await writeFile(
      script,
      `import { openSync, writeSync } from 'node:fs'
import { openDiskBlobStore } from ${JSON.stringify(pathToFileURL(storeModule).href)}
const out = openSync(process.argv[3], 'a')
const line = (text) => writeSync(out, text + '\\n')
const store = await openDiskBlobStore({ directory: process.argv[2], compactAfterFrames: 300, onCompaction: (event) => line('compaction ' + event.outcome) })
const keyIds = Array.from({ length: 64 }, (_, index) => 'key-' + index)
await Promise.all(keyIds.map((keyId) => store.put({ keyId, version: 1, state: 'active', publicKey: new Uint8Array(65).fill(4), sealed: new Uint8Array(60).fill(7) })))
await Promise.all(keyIds.map(async (keyId) => {
  const rounds = Number(keyId.slice(4)) % 2 === 1 ? 1 + (Number(keyId.slice(4)) % 5) : Infinity
  for (let round = 0; round < rounds; round++) {
    const state = round % 2 === 0 ? 'frozen' : 'active'
    line('start ' + keyId + ' ' + state)
    await store.setState(keyId, state)
    line('done ' + keyId + ' ' + state)
  }
}))
`,
    )
    await writeFile(journalOfChanges, '')
    const child = spawn(process.execPath, ['--import', 'tsx', script, storeDirectory, journalOfChanges], { cwd: projectRoot, stdio: ['ignore', 'ignore', 'pipe'] })
    let stderr = ''
    child.stderr.setEncoding('utf8').on('data', (chunk: string) => (stderr += chunk))
    const exited = new Promise<NodeJS.Signals | null>((resolveExit) => child.once('exit', (_code, signal) => resolveExit(signal)))
    let ran: NodeJS.Signals | null | undefined
    void exited.then((signal) => (ran = signal))
    // Killed once the state journal has been emptied twice (and refilled after), however fast this disk is.
    const compactions = async () => (await readFile(journalOfChanges, 'utf8')).split('\n').filter((text) => text === 'compaction compacted').length
    await expect.poll(async () => (ran === undefined ? compactions() : `exited: ${stderr}`), { timeout: 30_000, interval: 20 }).toBeGreaterThanOrEqual(2)
    await new Promise((wait) => setTimeout(wait, 50))
    child.kill('SIGKILL')
    expect(await exited).toBe('SIGKILL')

    // Per key: its last acknowledged state, and the change in flight at the kill, if any. Whole lines only.
    const acknowledged = new Map<string, string>()
    const inFlight = new Map<string, string>()
    for (const text of (await readFile(journalOfChanges, 'utf8')).split('\n').slice(0, -1)) {
      const [phase, keyId, state] = text.split(' ') as [string, string, string]
      if (phase === 'start') inFlight.set(keyId, state)
      else if (phase === 'done') (acknowledged.set(keyId, state), inFlight.delete(keyId))
    }

    const store = await openDiskBlobStore({ directory: storeDirectory })
    opened.push(store)
    let settled = 0
    for (let index = 0; index < 64; index++) {
      const keyId = `key-${index}`
      const state = (await store.get(keyId))?.state
      const before = acknowledged.get(keyId) ?? 'active'
      // A change still in flight may or may not have landed; one that was acknowledged has.
      if (inFlight.has(keyId)) expect([before, inFlight.get(keyId)], keyId).toContain(state)
      else (expect(state, keyId).toBe(before), settled++)
    }
    // Every odd key had settled long before the kill, through the compactions after it.
    expect(settled).toBeGreaterThanOrEqual(32)
  })
})

describe('one process per store', () => {
  it('refuses a second open of a directory in use, names the holder, and opens once it is closed', async () => {
    const first = await openStore()
    await expect(openDiskBlobStore({ directory })).rejects.toThrow(`the store directory ${directory} is in use by process ${process.pid}`)
    await first.put(sealedRecord(1))
    await first.close()
    const second = await openStore()
    expect(await second.get('key-1')).toBeDefined()
  })

  it('releases a lock once: a second release leaves alone the lock a later open in the same process took', async () => {
    const lock = await lockDirectory(directory)
    await lock.release()
    const store = await openStore()
    await lock.release()
    await expect(openStore()).rejects.toThrow(`the store directory ${directory} is in use by process ${process.pid}`)
    await store.close()
  })

  /** Puts a directory in the lock file's place, so that reading it fails with EISDIR; the function returned puts the lock back. */
  async function makeLockUnreadable(): Promise<() => Promise<void>> {
    const path = join(directory, LOCK_FILE_NAME)
    await rename(path, `${path}.aside`)
    await mkdir(path)
    return async () => {
      await rmdir(path)
      await rename(`${path}.aside`, path)
    }
  }

  it('reports a close whose lock release failed, and releases on the next close, so the store opens again', async () => {
    const store = await openStore()
    await store.put(sealedRecord(1))
    const putBack = await makeLockUnreadable()
    // A lock it cannot read is not taken for one already gone.
    await expect(store.close()).rejects.toThrow('EISDIR')
    await putBack()
    await store.close()
    await expect(readdir(directory)).resolves.not.toContain(LOCK_FILE_NAME)
    expect(await (await openStore()).get('key-1')).toEqual(sealedRecord(1))
  })

  it('says why an open failed even when releasing its lock fails too', async () => {
    let putBack: (() => Promise<void>) | undefined
    const failing: BlobStoreFileSystem = {
      open: async (path, flags) => {
        if (path !== logPath()) return (await open(path, flags)) as unknown as LogFile
        putBack = await makeLockUnreadable()
        throw Object.assign(new Error(`EIO: i/o error, open '${path}'`), { code: 'EIO' })
      },
    }
    const failure = openDiskBlobStore({ directory, fileSystem: failing })
    await expect(failure).rejects.toThrow(`EIO: i/o error, open '${logPath()}'; and the store's lock could not be released: EISDIR`)
    await putBack!()
    // That lock is this process's, with nothing left to release it: an operator removes it once the process is gone.
    await rm(join(directory, LOCK_FILE_NAME))
  })

  it('resolves a second release, called while the first runs, only once the lock is gone', async () => {
    const lock = await lockDirectory(directory)
    const first = lock.release()
    await lock.release()
    await expect(readdir(directory)).resolves.not.toContain(LOCK_FILE_NAME)
    await first
  })

  it('takes over a lock its holder left behind: a process that is gone, or a lock file cut short', async () => {
    const gone = spawn(process.execPath, ['-e', ''])
    await new Promise((exited) => gone.once('exit', exited))
    for (const lock of [JSON.stringify({ pid: gone.pid, bootId: 'b', startTime: '1' }), '{"pid": 12', '']) {
      await writeFile(join(directory, LOCK_FILE_NAME), lock)
      const store = await openStore()
      await store.close()
      await expect(readdir(directory)).resolves.not.toContain(LOCK_FILE_NAME)
    }
  })

  it('of processes taking the lock at the same instant exactly one gets it, with no lock there or a stale one', { timeout: 60_000 }, async () => {
    const script = join(directory, 'locker.mjs')
    await writeFile(
      script,
      `import { lockDirectory } from ${JSON.stringify(pathToFileURL(join(projectRoot, 'enclave-origin/parent/directoryLock.ts')).href)}
// Held until the test has heard from every process: none may release before the last has tried.
process.stdin.once('data', async () => {
  let lock
  try {
    lock = await lockDirectory(process.argv[2])
    process.stdout.write('locked\\n')
  } catch (error) {
    process.stdout.write('refused: ' + error.message + '\\n')
  }
  process.stdin.once('data', () => (lock ? lock.release() : Promise.resolve()).then(() => process.exit(0)))
})
process.stdout.write('ready\\n')
`,
    )
    const storeDirectory = join(directory, 'store')
    await mkdir(storeDirectory)
    const gone = spawn(process.execPath, ['-e', ''])
    await new Promise((exited) => gone.once('exit', exited))
    for (const stale of [undefined, JSON.stringify({ pid: gone.pid, bootId: 'b', startTime: '1' }), undefined, JSON.stringify({ pid: gone.pid, bootId: 'b', startTime: '1' })]) {
      if (stale) await writeFile(join(storeDirectory, LOCK_FILE_NAME), stale)
      const lockers = Array.from({ length: 4 }, () => spawn(process.execPath, ['--import', 'tsx', script, storeDirectory], { cwd: projectRoot, stdio: ['pipe', 'pipe', 'inherit'] }))
      const outputs = lockers.map((locker) => {
        let output = ''
        locker.stdout.setEncoding('utf8').on('data', (chunk: string) => (output += chunk))
        const printedLines = (count: number) => new Promise<void>((seen) => locker.stdout.on('data', () => output.split('\n').length > count && seen()))
        return { ready: printedLines(1), tried: printedLines(2), exited: new Promise((exited) => locker.once('exit', exited)), text: () => output }
      })
      await Promise.all(outputs.map((output) => output.ready))
      for (const locker of lockers) locker.stdin.write('go\n')
      await Promise.all(outputs.map((output) => output.tried))
      for (const locker of lockers) locker.stdin.write('exit\n')
      await Promise.all(outputs.map((output) => output.exited))
      const results = outputs.map((output) => output.text().replace('ready\n', '').trim())
      expect(results.filter((result) => result === 'locked'), results.join(' | ')).toHaveLength(1)
      expect(results.filter((result) => result.startsWith(`refused: the store directory ${storeDirectory} is in use by process`))).toHaveLength(3)
      await expect(readdir(storeDirectory)).resolves.toEqual([])
    }
  })

  it('refuses, for an operator to decide, a takeover lock its holder left in dying; and clears drafts the dead left', async () => {
    // This process as a lock names it.
    const first = await openStore()
    const ours = await readFile(join(directory, LOCK_FILE_NAME), 'utf8')
    await first.close()
    const gone = spawn(process.execPath, ['-e', ''])
    await new Promise((exited) => gone.once('exit', exited))
    const deadHolder = JSON.stringify({ pid: gone.pid, bootId: 'b', startTime: '1' })
    await writeFile(join(directory, LOCK_FILE_NAME), deadHolder)
    await writeFile(join(directory, 'LOCK.takeover'), deadHolder)
    await expect(openDiskBlobStore({ directory })).rejects.toThrow(
      `the store directory ${directory} has a takeover lock (LOCK.takeover) left by process ${gone.pid}, which is gone; make sure no other parent uses this directory, then remove ${join(directory, 'LOCK.takeover')}`,
    )
    await rm(join(directory, 'LOCK.takeover'))
    // A draft a dead process wrote before it could link it goes; a live process's stays.
    await writeFile(join(directory, 'LOCK.0123456789ab'), deadHolder)
    await writeFile(join(directory, 'LOCK.ba9876543210'), ours)
    const store = await openStore()
    expect((await readdir(directory)).filter((name) => name.startsWith('LOCK')).sort()).toEqual([LOCK_FILE_NAME, 'LOCK.ba9876543210'])
    await store.close()
  })

  it('leaves the lock of a live pid whose start it cannot compare (its holder could not read /proc), for an operator to decide, unless it is of another boot', async () => {
    const bootId = (await readFile('/proc/sys/kernel/random/boot_id', 'utf8')).trim()
    for (const unread of [{ bootId: '', startTime: '' }, { bootId, startTime: '' }]) {
      await writeFile(join(directory, LOCK_FILE_NAME), JSON.stringify({ pid: process.pid, ...unread }))
      await expect(openDiskBlobStore({ directory })).rejects.toThrow(`the store directory ${directory} is in use by process ${process.pid}`)
    }
    await writeFile(join(directory, LOCK_FILE_NAME), JSON.stringify({ pid: process.pid, bootId: 'another boot', startTime: '' }))
    await (await openStore()).close()
  })

  it('takes over the lock of a pid that now belongs to another process: from before a reboot, or from a process that had the pid first', async () => {
    const bootId = (await readFile('/proc/sys/kernel/random/boot_id', 'utf8')).trim()
    for (const holder of [{ bootId: 'another boot', startTime: '1' }, { bootId, startTime: '1' }]) {
      await writeFile(join(directory, LOCK_FILE_NAME), JSON.stringify({ pid: process.pid, ...holder }))
      const store = await openStore()
      await store.close()
    }
  })
})
