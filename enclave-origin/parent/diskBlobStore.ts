import { createHash } from 'node:crypto'
import { mkdir, open, readdir, realpath, rename, rm } from 'node:fs/promises'
import { dirname, join } from 'node:path'
import { crc32 } from 'node:zlib'
import { messageOf } from '../errors.js'
import type { KeyState, SealedKeyRecord, WrappedDek } from '../types.js'
import { lockDirectory, type DirectoryLock } from './directoryLock.js'
import { assertNotOlder, assertStateMayChange, assertWrappedDekIs, copyDek, copyRecord, KeyNotStoredError, keyStates, stateToStore, validateDek, validateRecord, validateState, type BlobStore } from './blobStore.js'

/** zlib's CRC-32 (`crc32(b, crc32(a))` equals `crc32(a ‖ b)`), so other tools can check the log. */
export { crc32 }

/**
 * The embedded BlobStore: one append-only log file in `directory`, replayed
 * into memory on open, a chunk of the file at a time. Each write is a frame
 *
 *   u32le payloadLength ‖ u32le crc32(payloadLength ‖ payload) ‖ payload
 *
 * after a 16-byte magic header. A crash can only tear frames that were never
 * acknowledged (those after the last fsync), so on open what follows the last
 * frame that checks out is truncated away. Frames that do not check out but
 * are followed by ones that do are damage, not a torn tail: the scan skips to
 * the next good frame rather than dropping every acknowledged record after
 * it, the log is first copied aside (`records.log.damaged-<hash>`) for
 * whoever can recover more, and `onDamage` reports the byte ranges. Damage
 * too large to skip quickly fails the open instead (after the copy).
 *
 * Writes are group-committed: one write and one fsync for every record queued
 * within `groupCommitMs` (or `maxGroup` records, whichever comes first), and
 * one more of each for a group that holds state changes, and for one that
 * holds a DEK (see below).
 *
 * The log is compacted when most of its frames have been superseded (replaced
 * records, state changes, old DEKs): when it is opened, and while it runs,
 * between two groups, so no write interleaves (writes queued meanwhile wait
 * for it). The live entries are written to a new log, fsynced, and renamed
 * over the old one, so a crash at any point leaves one complete log.
 *
 * State changes are also written, in the same group, to a second file
 * (`states.log`, same framing): damage that takes a freeze out of the log
 * must not leave the key signing. On open each key takes the more
 * restrictive (active < frozen < archived) of the state the log leaves it in
 * and its last state in the journal. So a freeze lost from either file still
 * holds; an unfreeze lost from either leaves the key frozen, to be unfrozen
 * again. The journal is emptied after each compaction, whose records carry
 * every key's state.
 *
 * Every wrapped DEK is also written, in the same group, to a third file
 * (`data-keys.log`, same framing; a few entries per rotation, emptied only to
 * start again after damage to it).
 * Keys sealed under a DEK open with no other: damage that takes the newest
 * DEK's frame out of the log must not leave the store on an older one. On an
 * open that found the log damaged or cut its tail, a newer copy (the log's
 * own last DEK is among the copies) is the DEK; otherwise the log's (see
 * dataKeyToRestore).
 */

export type DiskBlobStoreOptions = {
  /** The directory the store owns (created, owner-only, if missing); one process at a time may open it. */
  directory: string
  /** How long the first queued write waits for company before the group is flushed. */
  groupCommitMs?: number
  /** A group this large is flushed at once, without waiting. */
  maxGroup?: number
  /** Tests inject failures here; defaults to node:fs/promises. */
  fileSystem?: BlobStoreFileSystem
  /** Compact when the log holds at least this many frames and more than twice as many as are live; default 10,000. */
  compactAfterFrames?: number
  /** Told of each compaction, done or failed (for the operator's log). */
  onCompaction?: (event: CompactionEvent) => void
  /** Told when open found damaged frames in the middle of the log, the state journal or the DEK copies (for the operator's log, at error level). */
  onDamage?: (event: DamageEvent) => void
  /** Told when open took the DEK from `data-keys.log`, the log having lost it (for the operator's log, at error level). */
  onDataKeyFromCopies?: (event: DataKeyFromCopiesEvent) => void
  /** Bytes of a log read at a time when open replays it (4 MiB): only from damage or a torn tail on is the rest read whole. */
  replayChunkBytes?: number
}

/** Byte ranges of the log (or the state journal, or the DEK copies) that held no good frame, each followed by good ones; and where the file as found was copied, under its own name. */
export type DamageEvent = { ranges: Array<{ offset: number; bytes: number }>; keptAside: string }

/**
 * The log lost its newest DEK's frame, to damage or as a cut tail: the DEK came from the copies. `keptAside`: a copy
 * of the log, as found if it was damaged (the damage report's: one that could not be made failed the open before),
 * else as its tail's cut left it; when that one could not be made, `keepAsideError` says why instead (a full disk
 * must not stop the store opening with its DEK).
 */
export type DataKeyFromCopiesEvent = { logDamaged: boolean } & ({ keptAside: string } | { keptAside?: undefined; keepAsideError: string })

export type CompactionEvent = { outcome: 'compacted'; droppedFrames: number; liveEntries: number; ms: number } | { outcome: 'failed'; error: string; /** True when the old log still serves; false when the store refuses writes until reopened. */ serving: boolean }

/** Counted since open, including the writes and fsyncs open itself makes; `compactedFrames` is what compaction dropped. */
export type DiskBlobStoreStats = { writes: number; fsyncs: number; groups: number; records: number; compactedFrames: number }

export type DiskBlobStore = BlobStore & { stats(): DiskBlobStoreStats; writeFailure(): string | undefined }

/** The slice of a node FileHandle the store uses. */
export type LogFile = {
  read(buffer: Uint8Array, offset: number, length: number, position: number): Promise<{ bytesRead: number }>
  write(buffer: Uint8Array, offset: number, length: number): Promise<{ bytesWritten: number }>
  sync(): Promise<void>
  truncate(length: number): Promise<void>
  stat(): Promise<{ size: number }>
  close(): Promise<void>
}

/** `ax+` creates the log, `a+` opens it, `r` opens the directory to fsync it. */
export type BlobStoreFileSystem = { open(path: string, flags: 'ax+' | 'a+' | 'r'): Promise<LogFile> }

export const LOG_FILE_NAME = 'records.log'
/** The new log while compaction writes it; only a rename makes it the log. */
export const COMPACTING_FILE_NAME = 'records.log.compacting'
/** Every state change since the last compaction, again: see above. */
export const STATE_JOURNAL_FILE_NAME = 'states.log'
/** Every wrapped DEK written, again: see above. */
export const DATA_KEY_COPIES_FILE_NAME = 'data-keys.log'

const nodeFileSystem: BlobStoreFileSystem = { open: (path, flags) => open(path, flags) }

export async function openDiskBlobStore(options: DiskBlobStoreOptions): Promise<DiskBlobStore> {
  const { groupCommitMs = 2, maxGroup = 1024, fileSystem = nodeFileSystem, compactAfterFrames = 10_000, replayChunkBytes = 4 * 1024 * 1024 } = options
  // They report to the operator; one that throws must not take an open or a group of writes down with it.
  const onCompaction = unthrowing(options.onCompaction)
  const onDamage = unthrowing(options.onDamage)
  const onDataKeyFromCopies = unthrowing(options.onDataKeyFromCopies)
  if (!Number.isFinite(groupCommitMs) || groupCommitMs < 0) throw new RangeError('groupCommitMs must be a finite number ≥ 0')
  if (!Number.isInteger(maxGroup) || maxGroup < 1) throw new RangeError('maxGroup must be an integer ≥ 1')
  if (!Number.isInteger(replayChunkBytes) || replayChunkBytes < 1) throw new RangeError('replayChunkBytes must be an integer ≥ 1')

  const firstCreated = await mkdir(options.directory, { recursive: true, mode: 0o700 })
  // The kernel's reading of the path, the one mkdir used (a `..` after a symlink leaves the link's target), not join()'s.
  const directory = await realpath(options.directory)
  // A new directory's entry is durable only once its parent is fsynced: each parent from the store's up to that of the
  // first directory mkdir made. (Of `a/../b` mkdir makes `a` as well, which is no ancestor of the store.) Found
  // already there, the store's own parent still is: the process that made it may have died before fsyncing it.
  // A directory the process may pass through or write to but not read (mode 0711 or 0733, say) cannot be opened to
  // fsync: that one is skipped, as the store opened before these fsyncs were made, and still does.
  const above = firstCreated === undefined ? dirname(directory) : await realpath(dirname(firstCreated))
  for (let made = directory; made !== dirname(made); made = dirname(made)) {
    await syncDirectory(fileSystem, dirname(made)).catch((error: NodeJS.ErrnoException) => {
      if (error.code !== 'EACCES' && error.code !== 'EPERM') throw error
    })
    if (dirname(made) === above) break
  }
  const lock = await lockDirectory(directory)
  try {
    return await openLocked({ ...options, directory, groupCommitMs, maxGroup, fileSystem, compactAfterFrames, onCompaction, onDamage, onDataKeyFromCopies, replayChunkBytes, lock })
  } catch (error) {
    return await releaseAfterFailure(lock, error)
  }
}

/** Throws `error` once `lock` is released; should the release fail too, one error saying both, so neither hides the other. */
async function releaseAfterFailure(lock: DirectoryLock, error: unknown): Promise<never> {
  try {
    await lock.release()
  } catch (releaseError) {
    throw new AggregateError([error, releaseError], `${messageOf(error)}; and the store's lock could not be released: ${messageOf(releaseError)}`)
  }
  throw error
}

function unthrowing<Event>(report: ((event: Event) => void) | undefined): (event: Event) => void {
  return (event) => {
    try {
      report?.(event)
    } catch {
      // The report is lost; the store goes on.
    }
  }
}

async function openLocked(options: Required<DiskBlobStoreOptions> & { lock: DirectoryLock }): Promise<DiskBlobStore> {
  const { directory, groupCommitMs, maxGroup, fileSystem, compactAfterFrames, onCompaction, onDamage, onDataKeyFromCopies, replayChunkBytes: chunkBytes, lock } = options
  const counters: DiskBlobStoreStats = { writes: 0, fsyncs: 0, groups: 0, records: 0, compactedFrames: 0 }
  await refuseLostLog(directory)
  // What a compaction interrupted by a crash left behind; the log itself is intact.
  await rm(join(directory, COMPACTING_FILE_NAME), { force: true })
  const opened: LogFile[] = []
  const recover = async (kind: LogKind, onEntry: (entry: LogEntry) => void) => {
    const path = join(directory, kind.name)
    const { file: rawFile, created } = await openOrCreateLog(fileSystem, path)
    const file = countingFile(rawFile, counters)
    opened.push(file)
    const keepAside = () => keepDamagedLogAside({ fileSystem, directory, name: kind.name, source: file, chunkBytes })
    return { file, keepAside, ...(await recoverLog({ file, path, kind, created, onEntry, chunkBytes, onDamage, keepAside })) }
  }
  let log: Awaited<ReturnType<typeof recover>>
  let journal: Awaited<ReturnType<typeof recover>>
  let dataKeys: Awaited<ReturnType<typeof recover>>
  /** The DEK, when it came from the copies rather than the log. */
  let restored: WrappedDek | undefined
  const index = new RecordIndex()
  const dataKeysInLog: WrappedDek[] = []
  const copies: WrappedDek[] = []
  try {
    log = await recover(RECORD_LOG, (entry) => {
      index.apply(entry)
      if (entry.kind === 'dek') dataKeysInLog.push(entry.dek)
    })
    // A new (or torn-at-birth) log's header and directory entry durable before the journal's: a journal without a
    // log then always means a lost log (see refuseLostLog).
    if (log.headerWritten) await syncDirectory(fileSystem, directory)
    // The last state the journal gives each key; it holds nothing but state changes, and one that holds more is not ours.
    const lastStates = new Map<string, KeyState>()
    journal = await recover(STATE_JOURNAL, (entry) => {
      if (entry.kind !== 'state') throw new Error(`${join(directory, STATE_JOURNAL.name)} holds a ${entry.kind} entry; a key state journal holds state changes only`)
      lastStates.set(entry.keyId, entry.state)
    })
    dataKeys = await recover(DATA_KEY_COPIES, (entry) => {
      if (entry.kind !== 'dek') throw new Error(`${join(directory, DATA_KEY_COPIES.name)} holds a ${entry.kind} entry; it holds wrapped data keys only`)
      copies.push(entry.dek)
    })
    // A new file's directory entry is not durable until the directory is fsynced, however often the file is: at every
    // open, since the process that made the files may have died before it did.
    await syncDirectory(fileSystem, directory)
    index.restrictStates(lastStates)
    restored = dataKeyToRestore({ inLog: dataKeysInLog, copies, logLostFrames: log.damaged || log.tailCut })
    if (restored) {
      // It may hold what an operator wants back: a restored backup's DEK.
      const keptAside = log.keptAside ?? (await log.keepAside().catch((error: unknown) => ({ keepAsideError: messageOf(error) })))
      onDataKeyFromCopies({ logDamaged: log.damaged, ...(typeof keptAside === 'string' ? { keptAside } : keptAside) })
      index.apply({ kind: 'dek', dek: restored })
    }
  } catch (error) {
    await Promise.all(opened.map((file) => file.close().catch(() => {})))
    throw error
  }
  const store = new GroupCommitStore({ file: log.file, journal: journal.file, dataKeys: dataKeys.file, index, frames: log.frames, counters, groupCommitMs, maxGroup, compaction: { fileSystem, directory, afterFrames: compactAfterFrames, onCompaction }, lock })
  try {
    // A DEK taken from the copies goes back into the log first, durably, as any DEK write: until it does, the log
    // alone would name an older one at the next open, whether or not the compaction below succeeds.
    if (restored) await store.putWrappedDek(restored, restored)
    // After damage, a rewrite at once: the live log holds only good frames again (the journal is emptied), and the
    // next open does not report (and copy) the same damage.
    const failure = await store.compactIfWasteful({ force: log.damaged || journal.damaged })
    if (failure) throw failure
    // The copies end with the DEK the store opens with, which the log now holds: after damage to them (started
    // again), a store from before them, a log restored from a backup, or one a build without them wrote to.
    const current = index.wrappedDek()
    const lastCopy = restored ?? copies.at(-1)
    if (dataKeys.damaged || (current && !(lastCopy && sameDek(lastCopy, current)))) {
      if (dataKeys.damaged) await startOver(dataKeys.file, DATA_KEY_COPIES.magic)
      if (current) await writeFully(dataKeys.file, encodeFrame({ kind: 'dek', dek: current }))
      await dataKeys.file.sync()
    }
  } catch (error) {
    await store.close().catch(() => {})
    throw error
  }
  return store
}

/**
 * Frames encoded per write of a compaction: a few milliseconds of work, after which the event loop serves what waits
 * (encoding a million keys' log at once would hold the parent's signing up for seconds).
 */
const COMPACTION_CHUNK_FRAMES = 500

/**
 * Writes `live` as a new log, a chunk at a time, fsyncs it, renames it over the old one and
 * fsyncs the directory; returns the new log open for appending. A failure
 * before the rename leaves the old log as the log; one after it
 * (`afterRename`) leaves a new log whose name may not survive a crash.
 */
async function compact(options: { fileSystem: BlobStoreFileSystem; directory: string; live: Iterable<LogEntry> }): Promise<{ file: LogFile } | { error: unknown; afterRename: boolean }> {
  const { fileSystem, directory, live } = options
  const compacting = join(directory, COMPACTING_FILE_NAME)
  let next: LogFile | undefined
  try {
    next = await fileSystem.open(compacting, 'ax+')
    let chunk: Buffer[] = [LOG_MAGIC]
    for (const entry of live) {
      chunk.push(encodeFrame(entry))
      if (chunk.length < COMPACTION_CHUNK_FRAMES) continue
      await writeFully(next, Buffer.concat(chunk))
      chunk = []
    }
    await writeFully(next, Buffer.concat(chunk))
    await next.sync()
    await rename(compacting, join(directory, LOG_FILE_NAME))
  } catch (error) {
    // Compaction is an optimisation: if it fails (a full disk, say), the old log is intact and still serves.
    await next?.close().catch(() => {})
    await rm(compacting, { force: true }).catch(() => {})
    return { error, afterRename: false }
  }
  try {
    // Past the rename the new log is the log: if that cannot be made durable, the store must not serve on.
    await syncDirectory(fileSystem, directory)
    return { file: next }
  } catch (error) {
    await next.close().catch(() => {})
    return { error, afterRename: true }
  }
}

// ---------------------------------------------------------------- the store

type LogEntry =
  | { kind: 'put'; record: SealedKeyRecord }
  | { kind: 'state'; keyId: string; state: KeyState }
  | { kind: 'dek'; dek: WrappedDek }

type QueuedWrite = { entry: LogEntry; frame: Buffer; resolve: () => void; reject: (error: Error) => void }

class GroupCommitStore implements DiskBlobStore {
  private file: LogFile
  /** The state journal (`states.log`). */
  private readonly journal: LogFile
  /** The copies of the wrapped DEKs (`data-keys.log`). */
  private readonly dataKeys: LogFile
  /** Frames in the log now, live or superseded. */
  private frames: number
  private readonly compaction: { fileSystem: BlobStoreFileSystem; directory: string; afterFrames: number; onCompaction: (event: CompactionEvent) => void }
  /** The frame count at which compaction is next considered; pushed on after a compaction that failed harmlessly. */
  private compactAt: number
  /** The compaction under way, if any (see `compactIfWasteful`). */
  private compacting: Promise<Error | undefined> | undefined
  private readonly index: RecordIndex
  private readonly counters: DiskBlobStoreStats
  private readonly groupCommitMs: number
  private readonly maxGroup: number
  /** Versions of every key accepted so far, queued or durable: what `put` and `setState` validate against. */
  private readonly acceptedVersions: Map<string, number>
  /** The keys archived once the writes queued so far land: archiving is final. */
  private readonly acceptedArchived = new Set<string>()
  /** The wrapped DEK once the writes queued so far land: what a `putWrappedDek` must be based on. */
  private acceptedDek: WrappedDek | undefined
  private readonly queue: QueuedWrite[] = []
  private timer: ReturnType<typeof setTimeout> | undefined
  /** The one flush in progress, if any. */
  private flushing: Promise<void> | undefined
  private flushAgain = false
  /** Set by the first failed write or fsync; after it the file's contents are unknown, so nothing more is written. */
  private failure: Error | undefined
  /** Set by the first close: its flush and the closing of the files. */
  private closing: Promise<void> | undefined
  private readonly lock: DirectoryLock

  constructor(parts: {
    file: LogFile
    journal: LogFile
    dataKeys: LogFile
    index: RecordIndex
    frames: number
    counters: DiskBlobStoreStats
    groupCommitMs: number
    maxGroup: number
    compaction: { fileSystem: BlobStoreFileSystem; directory: string; afterFrames: number; onCompaction: (event: CompactionEvent) => void }
    /** Released once the log is closed, not before. */
    lock: DirectoryLock
  }) {
    this.lock = parts.lock
    this.file = parts.file
    this.journal = parts.journal
    this.dataKeys = parts.dataKeys
    this.frames = parts.frames
    this.compaction = parts.compaction
    this.compactAt = parts.compaction.afterFrames
    this.index = parts.index
    this.counters = parts.counters
    this.groupCommitMs = parts.groupCommitMs
    this.maxGroup = parts.maxGroup
    this.acceptedVersions = this.index.versions()
    this.acceptedDek = this.index.wrappedDek()
    for (const record of this.index.all()) if (record.state === 'archived') this.acceptedArchived.add(record.keyId)
  }

  async put(record: SealedKeyRecord): Promise<void> {
    validateRecord(record)
    assertNotOlder(record, this.acceptedVersions.get(record.keyId))
    const state = stateToStore(record.state, this.acceptedArchived.has(record.keyId) ? 'archived' : undefined)
    const durable = this.enqueue({ kind: 'put', record: { ...copyRecord(record), state } })
    this.acceptedVersions.set(record.keyId, record.version)
    if (state === 'archived') this.acceptedArchived.add(record.keyId)
    return durable
  }

  async get(keyId: string): Promise<SealedKeyRecord | undefined> {
    this.assertOpen()
    const record = this.index.get(keyId)
    return record && copyRecord(record)
  }

  async *list(): AsyncIterable<SealedKeyRecord> {
    this.assertOpen()
    for (const record of this.index.all()) yield copyRecord(record)
  }

  async setState(keyId: string, state: KeyState): Promise<void> {
    validateState(state)
    if (!this.acceptedVersions.has(keyId)) throw new KeyNotStoredError(keyId)
    if (this.acceptedArchived.has(keyId)) assertStateMayChange(keyId, 'archived', state)
    const durable = this.enqueue({ kind: 'state', keyId, state })
    if (state === 'archived') this.acceptedArchived.add(keyId)
    return durable
  }

  async putWrappedDek(dek: WrappedDek, replacing: WrappedDek | undefined): Promise<void> {
    validateDek(dek)
    // Against what the writes queued before this one leave, as `put` checks versions.
    assertWrappedDekIs(this.acceptedDek, replacing)
    const durable = this.enqueue({ kind: 'dek', dek: copyDek(dek) })
    this.acceptedDek = copyDek(dek)
    return durable
  }

  async getWrappedDek(): Promise<WrappedDek | undefined> {
    this.assertOpen()
    const dek = this.index.wrappedDek()
    return dek && copyDek(dek)
  }

  stats(): DiskBlobStoreStats {
    return { ...this.counters }
  }

  writeFailure(): string | undefined {
    return this.failure?.message
  }

  close(): Promise<void> {
    this.closing ??= this.closeFiles()
    // The lock goes once the files are closed, whatever became of that. A release that failed is tried again by the
    // next close, so that the process can open the store again without a restart.
    return this.closing.then(
      () => this.lock.release(),
      (error: unknown) => releaseAfterFailure(this.lock, error),
    )
  }

  private async closeFiles(): Promise<void> {
    // Writes queued before close still become durable; new ones are refused (closing is set).
    while (this.queue.length > 0 || this.flushing) {
      if (!this.flushing) this.requestFlush()
      await this.flushing
    }
    clearTimeout(this.timer)
    await Promise.all([this.file.close(), this.journal.close(), this.dataKeys.close()])
  }

  private assertOpen(): void {
    if (this.closing) throw new Error('blob store is closed')
  }

  /** Throws (before queueing anything) if the store cannot take writes; otherwise resolves once the entry is durable. */
  private enqueue(entry: LogEntry): Promise<void> {
    this.assertOpen()
    if (this.failure) throw this.failure
    const frame = encodeFrame(entry)
    return new Promise<void>((resolve, reject) => {
      this.queue.push({ entry, frame, resolve, reject })
      if (this.queue.length >= this.maxGroup) this.requestFlush()
      else this.timer ??= setTimeout(() => this.requestFlush(), this.groupCommitMs)
    })
  }

  private requestFlush(): void {
    clearTimeout(this.timer)
    this.timer = undefined
    // At most one flush at a time: a request during one is served right after it.
    if (this.flushing) this.flushAgain = true
    else this.flushing = this.flushQueued()
  }

  private async flushQueued(): Promise<void> {
    try {
      do {
        this.flushAgain = false
        await this.commitGroup(this.queue.splice(0, this.maxGroup))
        await this.compactIfWasteful()
      } while (this.flushAgain || this.queue.length >= this.maxGroup)
    } finally {
      this.flushing = undefined
      // Writes queued during the last flush started a timer when they arrived; this only guards against a lost one.
      if (this.queue.length > 0) this.timer ??= setTimeout(() => this.requestFlush(), this.groupCommitMs)
    }
  }

  /** Never throws: the outcome goes to each write's promise. */
  private async commitGroup(group: QueuedWrite[]): Promise<void> {
    if (group.length === 0) return
    if (this.failure) return rejectAll(group, this.failure)
    this.counters.groups++
    try {
      await writeFully(this.file, Buffer.concat(group.map((write) => write.frame)))
      await this.file.sync()
      // The copies after the log: a DEK the log lacks is then never among them, but for damage (see dataKeyToRestore).
      for (const [file, kind] of [[this.journal, 'state'], [this.dataKeys, 'dek']] as const) {
        const copied = group.filter((write) => write.entry.kind === kind)
        if (copied.length === 0) continue
        await writeFully(file, Buffer.concat(copied.map((write) => write.frame)))
        await file.sync()
      }
    } catch (error) {
      this.failure = new Error(`blob store write failed, reopen it to recover: ${messageOf(error)}`, { cause: error })
      rejectAll(group, this.failure)
      rejectAll(this.queue.splice(0), this.failure)
      return
    }
    for (const write of group) this.index.apply(write.entry)
    this.counters.records += group.length
    this.frames += group.length
    for (const write of group) write.resolve()
  }

  /**
   * Rewrites the log to its live entries once it holds `afterFrames` frames
   * and more than twice as many as are live. Called at open and between
   * groups only, never during a write, and one call at a time, in order: at
   * open, the call after a DEK restored from the copies meets the one its
   * write's flush makes, and two at once would each take the other's
   * `records.log.compacting` for a stale one. A failure before the rename leaves
   * the old log serving (and waits for another `afterFrames` frames before
   * trying again); after the rename the store must be reopened, and that
   * failure is returned (and refuses every later write).
   */
  compactIfWasteful(options: { force?: boolean } = {}): Promise<Error | undefined> {
    const run = () => this.compactOnceIfWasteful(options)
    const next = (this.compacting ?? Promise.resolve(undefined)).then(run, run)
    this.compacting = next
    const done = () => {
      if (this.compacting === next) this.compacting = undefined
    }
    next.then(done, done)
    return next
  }

  private async compactOnceIfWasteful({ force = false }: { force?: boolean }): Promise<Error | undefined> {
    const live = this.index.liveCount()
    if (this.failure || (!force && (this.frames < this.compactAt || this.frames <= 2 * live))) return this.failure
    const started = performance.now()
    const outcome = await compact({ ...this.compaction, live: this.index.liveEntries() })
    if ('error' in outcome) {
      this.compaction.onCompaction({ outcome: 'failed', error: messageOf(outcome.error), serving: !outcome.afterRename })
      if (!outcome.afterRename) {
        this.compactAt = this.frames + this.compaction.afterFrames
        return undefined
      }
      this.failure = new Error(`blob store compaction could not be made durable, reopen it to recover: ${messageOf(outcome.error)}`, { cause: outcome.error })
      rejectAll(this.queue.splice(0), this.failure)
      return this.failure
    }
    await this.file.close().catch(() => {})
    this.file = countingFile(outcome.file, this.counters)
    try {
      // The new log's records carry every key's state: the journal starts again from there.
      await startOver(this.journal, STATE_JOURNAL.magic)
    } catch (error) {
      // Half emptied, it may have lost its header: nothing more is appended to it, and the next open starts it again.
      this.failure = new Error(`blob store could not empty its state journal after a compaction, reopen it to recover: ${messageOf(error)}`, { cause: error })
      this.compaction.onCompaction({ outcome: 'failed', error: `could not empty the state journal: ${messageOf(error)}`, serving: false })
      rejectAll(this.queue.splice(0), this.failure)
      return this.failure
    }
    this.counters.compactedFrames += this.frames - live
    this.compaction.onCompaction({ outcome: 'compacted', droppedFrames: this.frames - live, liveEntries: live, ms: Math.round(performance.now() - started) })
    this.frames = live
    this.compactAt = this.compaction.afterFrames
    return undefined
  }
}

function rejectAll(writes: QueuedWrite[], error: Error): void {
  for (const write of writes) write.reject(error)
}

/** Latest record per key and the latest wrapped DEK, as the log's entries leave them in order. */
class RecordIndex {
  private readonly records = new Map<string, SealedKeyRecord>()
  private dek: WrappedDek | undefined

  apply(entry: LogEntry): void {
    if (entry.kind === 'put') this.records.set(entry.record.keyId, entry.record)
    else if (entry.kind === 'dek') this.dek = entry.dek
    else {
      const record = this.records.get(entry.keyId)
      // The store refuses state changes for unknown keys, so the log never holds one; ignore rather than fail open.
      if (record) this.records.set(entry.keyId, { ...record, state: entry.state })
    }
  }

  /** Each key named takes the given state where that is the more restrictive; keys not stored are ignored. */
  restrictStates(states: ReadonlyMap<string, KeyState>): void {
    for (const [keyId, state] of states) {
      const record = this.records.get(keyId)
      if (record && keyStates.indexOf(state) > keyStates.indexOf(record.state)) this.records.set(keyId, { ...record, state })
    }
  }

  get(keyId: string): SealedKeyRecord | undefined {
    return this.records.get(keyId)
  }

  all(): SealedKeyRecord[] {
    return [...this.records.values()]
  }

  wrappedDek(): WrappedDek | undefined {
    return this.dek
  }

  liveCount(): number {
    return this.records.size + (this.dek ? 1 : 0)
  }

  /**
   * The fewest entries that rebuild this index: one put per key (with its current state) and the DEK. Read as they
   * are written; the index does not change meanwhile (a compaction runs between groups).
   */
  *liveEntries(): Generator<LogEntry> {
    // The DEK first: as the last frame, damage to it could pass for a torn tail.
    if (this.dek) yield { kind: 'dek', dek: this.dek }
    for (const record of this.records.values()) yield { kind: 'put', record }
  }

  versions(): Map<string, number> {
    return new Map([...this.records].map(([keyId, record]) => [keyId, record.version]))
  }
}

// ---------------------------------------------------------------- opening and recovery

/** Readable in a hex dump; the trailing version byte lets a later format refuse to misread this one. */
const LOG_MAGIC = Buffer.from('sealed-blobs\x00v1\n', 'latin1')
const JOURNAL_MAGIC = Buffer.from('key-states\x00\x00\x00v1\n', 'latin1')
const DATA_KEYS_MAGIC = Buffer.from('data-keys\x00\x00\x00\x00v1\n', 'latin1')
/**
 * The store's three files, each known by its header; `what` names one in the refusal of a file that is not it.
 * `rebuildable`: a file made again from the others, so one whose header is not its own, or whose damage is too large
 * to skip, is reported and kept aside, not refused.
 */
type LogKind = { name: string; magic: Buffer; what: string; rebuildable?: boolean }
const RECORD_LOG: LogKind = { name: LOG_FILE_NAME, magic: LOG_MAGIC, what: 'sealed-blob log' }
const STATE_JOURNAL: LogKind = { name: STATE_JOURNAL_FILE_NAME, magic: JOURNAL_MAGIC, what: 'key state journal' }
const DATA_KEY_COPIES: LogKind = { name: DATA_KEY_COPIES_FILE_NAME, magic: DATA_KEYS_MAGIC, what: 'data key copy log', rebuildable: true }

/**
 * The copy a store opens with in place of its log's last DEK, if any, from the DEKs its log holds and the copies (each
 * in the order written). A DEK
 * write lands in the log (fsynced) before its copy is written, and is acknowledged only once both are: so only damage
 * can take from the log a DEK the copies hold: as frames it skips or as a tail it cuts (damage to a last frame can look
 * torn). On an open that lost such frames, when the log's own last DEK is among the copies (or it has none left), the
 * newest copy is that one or newer, and keys may be sealed under it. (A torn tail that was a DEK's frame is of a DEK
 * never acknowledged, and so not yet copied: the newest copy is then the log's last.)
 * Otherwise none, and the log's stands: a log restored from a backup, whose keys are sealed under the DEK it holds; or
 * one that a build without copies wrote to meanwhile. (Each DEK entry is new: KMS makes a new DEK for each rotation,
 * and its two entries differ in the retiring DEK.)
 */
function dataKeyToRestore({ inLog, copies, logLostFrames }: { inLog: WrappedDek[]; copies: WrappedDek[]; logLostFrames: boolean }): WrappedDek | undefined {
  const last = inLog.at(-1)
  const newestCopy = copies.at(-1)
  if (!logLostFrames || !newestCopy || (last && sameDek(last, newestCopy))) return undefined
  return !last || copies.some((dek) => sameDek(dek, last)) ? newestCopy : undefined
}

/** The same DEK entry: key id, ciphertext and retiring DEK alike (a rotation's two entries differ in the last). */
function sameDek(a: WrappedDek, b: WrappedDek): boolean {
  return encodeEntry({ kind: 'dek', dek: a }).equals(encodeEntry({ kind: 'dek', dek: b }))
}

const FRAME_HEADER_BYTES = 8
/**
 * The largest payload written, and so the largest read or looked for past damage: a length beyond it is a torn or
 * corrupt frame, not a record. Records are a few hundred bytes; a larger limit would make the search past damage
 * checksum far more candidates (see RESYNC_BUDGET_BYTES), and a record it could not find there would be dropped.
 */
const MAX_PAYLOAD_BYTES = 64 * 1024
/** How much checksumming one open spends looking past damage before it gives up (tens of ms; random damage costs about 0.5 MiB of it per MiB). */
const RESYNC_BUDGET_BYTES = 32 * 1024 * 1024

/**
 * Refuses a directory whose record log is missing, or holds no more than an unfinished header, while the directory
 * shows the store had one: the state journal or the DEK copies (made only once the log and its directory entry are
 * durable, at the first open), a damaged copy kept aside, or a compaction's new log. Opened, it would be an empty store, and the
 * parent would make a new data key and serve no keys without a word. Checked before anything is created or removed,
 * so a refused open changes nothing and the next one refuses too.
 */
async function refuseLostLog(directory: string): Promise<void> {
  const head = await open(join(directory, LOG_FILE_NAME), 'r').then(
    async (file) => {
      try {
        // One byte past the header: a header of zeros with more after it is a damaged log (the recovery refuses it), not an empty one.
        const bytes = Buffer.alloc(LOG_MAGIC.length + 1)
        return bytes.subarray(0, (await file.read(bytes, 0, bytes.length, 0)).bytesRead)
      } finally {
        await file.close()
      }
    },
    (error: NodeJS.ErrnoException) => {
      if (error.code === 'ENOENT') return undefined
      throw error
    },
  )
  if (head !== undefined && !isUnfinishedHeader(head, LOG_MAGIC)) return
  const names = await readdir(directory)
  const found = names.filter((name) => name === STATE_JOURNAL_FILE_NAME || name === DATA_KEY_COPIES_FILE_NAME || name === COMPACTING_FILE_NAME || name.startsWith(`${LOG_FILE_NAME}.damaged-`)).sort()
  if (found.length === 0) return
  const compacting = found.includes(COMPACTING_FILE_NAME) ? ` (${COMPACTING_FILE_NAME} may be a whole copy)` : ''
  throw new Error(
    `${LOG_FILE_NAME} is ${head === undefined ? 'missing from' : 'empty in'} ${directory}, though ${found.join(', ')} ${found.length === 1 ? 'is' : 'are'} there: its sealed keys and wrapped data key are gone from here. Restore it from a backup${compacting}, with ${DATA_KEY_COPIES_FILE_NAME} from the same backup (or none); if this store never held a key, remove ${found.join(', ')} to start it empty`,
  )
}

async function openOrCreateLog(fileSystem: BlobStoreFileSystem, path: string): Promise<{ file: LogFile; created: boolean }> {
  try {
    return { file: await fileSystem.open(path, 'ax+'), created: true }
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== 'EEXIST') throw error
    return { file: await fileSystem.open(path, 'a+'), created: false }
  }
}

/**
 * Replays a log's frames (the record log, the state journal or the DEK copies) into `onEntry`, in order, truncating a torn tail and
 * writing the header of a new (or torn-at-birth) one.
 */
async function recoverLog(options: {
  file: LogFile
  path: string
  kind: LogKind
  created: boolean
  onEntry: (entry: LogEntry) => void
  chunkBytes: number
  onDamage: (event: DamageEvent) => void
  /** Copies the log as found somewhere safe before anything changes it; resolves to the copy's path. */
  keepAside: () => Promise<string>
}): Promise<{ frames: number; headerWritten: boolean; damaged: boolean; tailCut: boolean; keptAside?: string }> {
  const { file, path, created } = options
  const { magic, rebuildable } = options.kind
  const { size } = await file.stat()
  const head = await readRange(file, 0, Math.min(size, magic.length))
  // A crash while creating the log can leave it empty, with part of the header, or with the header's size in zeros: nothing was ever stored.
  if (created || (size <= magic.length && isUnfinishedHeader(head, magic))) {
    await startOver(file, magic)
    return { frames: 0, headerWritten: true, damaged: false, tailCut: false }
  }
  // Reported as damage and left as it is: the caller starts it again once what it copies is safe elsewhere.
  const rebuild = async (range: { offset: number; bytes: number }) => {
    options.onDamage({ ranges: [range], keptAside: await options.keepAside() })
    return { frames: 0, headerWritten: false, damaged: true, tailCut: false }
  }
  if (!head.equals(magic)) {
    if (rebuildable) return rebuild({ offset: 0, bytes: size })
    // Truncating a file we do not recognise would destroy it; refuse instead.
    throw new Error(`${path} is not a ${options.kind.what} (bad header)`)
  }
  const { frames, validLength, damaged, unscannedFrom, end } = await replayFrames(file, size, magic.length, options.onEntry, options.chunkBytes)
  if (unscannedFrom !== undefined && rebuildable) return rebuild({ offset: unscannedFrom, bytes: end - unscannedFrom })
  let keptAside: string | undefined
  if (damaged.length > 0 || unscannedFrom !== undefined) {
    keptAside = await options.keepAside()
    if (unscannedFrom !== undefined) {
      throw new Error(`${path} is damaged from byte ${unscannedFrom} over more than can be skipped quickly; refusing to drop what may follow. The log as found is at ${keptAside}`)
    }
    options.onDamage({ ranges: damaged, keptAside })
  }
  const tailCut = validLength < end
  if (tailCut) {
    await file.truncate(validLength)
    // Made durable before anything is appended, so new frames never sit behind old garbage after a crash.
    await file.sync()
  }
  return { frames, headerWritten: false, damaged: damaged.length > 0, tailCut, keptAside }
}

/** Empties a log down to its header, durably. */
async function startOver(file: LogFile, magic: Buffer): Promise<void> {
  await file.truncate(0)
  await writeFully(file, magic)
  await file.sync()
}

function isUnfinishedHeader(bytes: Buffer, magic: Buffer): boolean {
  if (bytes.length <= magic.length && bytes.every((byte) => byte === 0)) return true
  return bytes.length < magic.length && magic.subarray(0, bytes.length).equals(bytes)
}

type FrameScan = { validLength: number; damaged: Array<{ offset: number; bytes: number }>; unscannedFrom?: number }

/**
 * Replays the frames after the header a chunk at a time (and a frame longer than a chunk whole), passing each that
 * checks out to `onEntry`, so a large log is never all in memory at once. From the first frame that does not check
 * out, or a tail too short for one, the rest of the file is read whole and scanned for damage (scanFrames): only a
 * damaged or torn log costs that. `end`: where the file ended (sooner than `size` if it shrank meanwhile).
 */
async function replayFrames(
  file: LogFile,
  size: number,
  headerBytes: number,
  onEntry: (entry: LogEntry) => void,
  chunkBytes: number,
): Promise<FrameScan & { frames: number; end: number }> {
  let frames = 0
  const replay = (entry: LogEntry) => {
    frames++
    onEntry(entry)
  }
  // The file's bytes from `offset` that are read and not yet replayed.
  let offset = headerBytes
  let window: Buffer = Buffer.alloc(0)
  // Where the file ends: where stat said, or sooner if a read finds it shorter.
  let end = size
  const readOn = async (length: number) => {
    const before = window.length
    window = await readOnto(window, file, offset + before, length)
    if (window.length - before < length) end = offset + window.length
  }
  for (;;) {
    const unread = end - offset - window.length
    let wanted = 0
    if (window.length >= FRAME_HEADER_BYTES) {
      const length = window.readUInt32LE(0)
      const frameBytes = FRAME_HEADER_BYTES + length
      if (length > 0 && length <= MAX_PAYLOAD_BYTES && frameBytes > window.length && frameBytes - window.length <= unread) {
        wanted = Math.max(chunkBytes, frameBytes - window.length)
      } else {
        const frameEnd = frameEndAt(window, 0)
        if (frameEnd !== undefined) {
          replay(decodeEntry(window.subarray(FRAME_HEADER_BYTES, frameEnd), offset))
          window = window.subarray(frameEnd)
          offset += frameEnd
          continue
        }
      }
    } else if (unread > 0) {
      wanted = chunkBytes
    }
    if (wanted > 0) {
      await readOn(Math.min(wanted, unread))
      continue
    }
    await readOn(unread)
    const scan = scanFrames(window, offset, replay)
    // A whole frame at the end whose checksum fails was written in full, and may have been acknowledged: damage, not a torn write.
    if (scan.unscannedFrom === undefined && wholeFrameAt(window, scan.validLength - offset)) scan.damaged.push({ offset: scan.validLength, bytes: end - scan.validLength })
    return { ...scan, frames, end }
  }
}

/**
 * Decodes every frame of `bytes` (the file's from byte `base`) that checks
 * out. After one that does not, it looks for the next that does: found, the
 * bytes between are a damaged range; not found, the rest is a torn tail and
 * `validLength` ends before it. Looking checksums candidate frames; past
 * `RESYNC_BUDGET_BYTES` of that it stops and says where (`unscannedFrom`)
 * rather than take the rest for a torn tail. Offsets are the file's.
 */
function scanFrames(bytes: Buffer, base: number, onEntry: (entry: LogEntry) => void): FrameScan {
  const damaged: Array<{ offset: number; bytes: number }> = []
  const budget = { bytesLeft: RESYNC_BUDGET_BYTES }
  let at = 0
  while (bytes.length - at >= FRAME_HEADER_BYTES) {
    const end = frameEndAt(bytes, at)
    if (end === undefined) {
      const next = nextFrameAfter(bytes, at, budget)
      if (next === 'over budget') return { validLength: base + at, damaged, unscannedFrom: base + at }
      if (next === undefined) break
      damaged.push({ offset: base + at, bytes: next - at })
      at = next
      continue
    }
    // A frame that checks out but does not decode was written on purpose (by a newer version?); do not truncate it away.
    onEntry(decodeEntry(bytes.subarray(at + FRAME_HEADER_BYTES, end), base + at))
    at = end
  }
  return { validLength: base + at, damaged }
}

/**
 * Whether a frame at `offset` was written whole, whatever its checksum says:
 * its declared length fits in the file and its payload is not all zeros (a
 * header that landed before its payload, which a crash leaves as zeros, is a
 * torn write).
 */
function wholeFrameAt(bytes: Buffer, offset: number): boolean {
  if (bytes.length - offset < FRAME_HEADER_BYTES) return false
  const length = bytes.readUInt32LE(offset)
  const end = offset + FRAME_HEADER_BYTES + length
  return length > 0 && length <= MAX_PAYLOAD_BYTES && end <= bytes.length && bytes.subarray(offset + FRAME_HEADER_BYTES, end).some((byte) => byte !== 0)
}

/** Where the frame at `offset` ends, if one with a payload of at most MAX_PAYLOAD_BYTES and a matching CRC starts there. */
function frameEndAt(bytes: Buffer, offset: number, budget?: { bytesLeft: number }): number | undefined {
  const length = bytes.readUInt32LE(offset)
  const end = offset + FRAME_HEADER_BYTES + length
  // Zero length is never written: it is what a zero-filled tail (a crash after the size grew, before the data) looks like.
  if (length === 0 || length > MAX_PAYLOAD_BYTES || end > bytes.length) return undefined
  if (budget) budget.bytesLeft -= length
  return frameChecksum(bytes.subarray(offset + FRAME_HEADER_BYTES, end)) === bytes.readUInt32LE(offset + 4) ? end : undefined
}

/**
 * The next offset after a bad frame where a good one starts, undefined if
 * none does, or 'over budget'. Payloads up to 64 KiB, the most a record may be, are tried (records
 * are a few hundred bytes), and the checksumming is charged to `budget`.
 */
function nextFrameAfter(bytes: Buffer, badOffset: number, budget: { bytesLeft: number }): number | undefined | 'over budget' {
  for (let offset = badOffset + 1; bytes.length - offset >= FRAME_HEADER_BYTES; offset++) {
    if (frameEndAt(bytes, offset, budget) !== undefined) return offset
    if (budget.bytesLeft < 0) return 'over budget'
  }
  return undefined
}

/**
 * Copies the log `name` as found, a chunk at a time, to `<name>.damaged-<first 16 hex of its SHA-256>`, owner-only
 * and durable, before recovery changes it. It is written whole under another name and renamed into place: a copy cut
 * short by a crash must not pass for the copy at the next open, which compacts the damage away. The same damage found
 * again (a restart before the rewrite succeeded) replaces that copy, so there is one; a copy that fails half-way is
 * removed, and the open fails (but for a copy of a log that was only cut, whose DEK came from the copies: see
 * DataKeyFromCopiesEvent).
 */
async function keepDamagedLogAside(options: { fileSystem: BlobStoreFileSystem; directory: string; name: string; source: LogFile; chunkBytes: number }): Promise<string> {
  const { fileSystem, directory, name, source, chunkBytes } = options
  const partial = join(directory, `${name}.damaged-partial`)
  let copy: LogFile | undefined
  let path: string | undefined
  try {
    await rm(partial, { force: true })
    copy = await fileSystem.open(partial, 'ax+')
    const hash = createHash('sha256')
    const { size } = await source.stat()
    for (let position = 0; position < size; ) {
      const chunk = await readRange(source, position, Math.min(chunkBytes, size - position))
      if (chunk.length === 0) break
      hash.update(chunk)
      await writeFully(copy, chunk)
      position += chunk.length
    }
    await copy.sync()
    await copy.close()
    copy = undefined
    path = join(directory, `${name}.damaged-${hash.digest('hex').slice(0, 16)}`)
    await rename(partial, path)
    await syncDirectory(fileSystem, directory)
  } catch (error) {
    await copy?.close().catch(() => {})
    // Its own failure must not take the place of the one that says why the copy failed.
    await rm(partial, { force: true }).catch(() => {})
    throw new Error(`could not keep a copy of ${name} aside${path ? ` at ${path}` : ` (copying it to ${partial})`}: ${messageOf(error)}`, { cause: error })
  }
  return path
}

/** Up to `length` bytes of the file from `position`; fewer only at its end. */
function readRange(file: LogFile, position: number, length: number): Promise<Buffer> {
  return readOnto(Buffer.alloc(0), file, position, length)
}

/** `prefix` and then up to `length` bytes of the file from `position` (fewer only at its end), in one new buffer. */
async function readOnto(prefix: Buffer, file: LogFile, position: number, length: number): Promise<Buffer> {
  const bytes = Buffer.alloc(prefix.length + length)
  prefix.copy(bytes)
  let read = 0
  while (read < length) {
    const { bytesRead } = await file.read(bytes, prefix.length + read, length - read, position + read)
    if (bytesRead === 0) break
    read += bytesRead
  }
  return bytes.subarray(0, prefix.length + read)
}

async function writeFully(file: LogFile, bytes: Buffer): Promise<void> {
  let written = 0
  while (written < bytes.length) {
    const { bytesWritten } = await file.write(bytes, written, bytes.length - written)
    written += bytesWritten
  }
}

/** Makes the log's directory entry durable: fsyncing the file alone does not. */
async function syncDirectory(fileSystem: BlobStoreFileSystem, directory: string): Promise<void> {
  const handle = await fileSystem.open(directory, 'r')
  try {
    await handle.sync()
  } finally {
    await handle.close()
  }
}

function countingFile(file: LogFile, counters: DiskBlobStoreStats): LogFile {
  return {
    read: (buffer, offset, length, position) => file.read(buffer, offset, length, position),
    write: (buffer, offset, length) => {
      counters.writes++
      return file.write(buffer, offset, length)
    },
    sync: () => {
      counters.fsyncs++
      return file.sync()
    },
    truncate: (length) => file.truncate(length),
    stat: () => file.stat(),
    close: () => file.close(),
  }
}

// ---------------------------------------------------------------- frame codec

/** `dekRotating`: a `dek` entry that also carries the retiring DEK of a rotation under way. */
const ENTRY_KIND = { put: 1, state: 2, dek: 3, dekRotating: 4 } as const

function encodeFrame(entry: LogEntry): Buffer {
  const payload = encodeEntry(entry)
  if (payload.length > MAX_PAYLOAD_BYTES) throw new RangeError(`record of ${payload.length} bytes exceeds the store's ${MAX_PAYLOAD_BYTES}`)
  const header = Buffer.alloc(FRAME_HEADER_BYTES)
  header.writeUInt32LE(payload.length, 0)
  header.writeUInt32LE(frameChecksum(payload), 4)
  return Buffer.concat([header, payload])
}

/** Covers the length too, so a zeroed or shifted header cannot pass with a matching payload. */
function frameChecksum(payload: Uint8Array): number {
  const length = Buffer.alloc(4)
  length.writeUInt32LE(payload.length, 0)
  return crc32(payload, crc32(length))
}

function encodeEntry(entry: LogEntry): Buffer {
  const fields = new FieldWriter()
  fields.u8(entry.kind === 'dek' && entry.dek.retiring ? ENTRY_KIND.dekRotating : ENTRY_KIND[entry.kind])
  if (entry.kind === 'put') {
    const { keyId, version, state, publicKey, sealed } = entry.record
    fields.string(keyId)
    fields.u32(version)
    // Validated before it was queued, so always found.
    fields.u8(keyStates.indexOf(state))
    fields.bytes(publicKey)
    fields.bytes(sealed)
  } else if (entry.kind === 'state') {
    fields.string(entry.keyId)
    fields.u8(keyStates.indexOf(entry.state))
  } else {
    for (const dek of entry.dek.retiring ? [entry.dek, entry.dek.retiring] : [entry.dek]) {
      fields.string(dek.keyId)
      fields.bytes(dek.ciphertext)
    }
  }
  return fields.finish()
}

function decodeEntry(payload: Buffer, offset: number): LogEntry {
  const fields = new FieldReader(payload, offset)
  const kind = fields.u8()
  let entry: LogEntry
  if (kind === ENTRY_KIND.put) {
    const keyId = fields.string()
    const version = fields.u32()
    const state = fields.state()
    const [publicKey, sealed] = fields.bytesPair()
    entry = { kind: 'put', record: { keyId, version, state, publicKey, sealed } }
  } else if (kind === ENTRY_KIND.state) {
    entry = { kind: 'state', keyId: fields.string(), state: fields.state() }
  } else if (kind === ENTRY_KIND.dek || kind === ENTRY_KIND.dekRotating) {
    const dek: WrappedDek = { keyId: fields.string(), ciphertext: fields.bytes() }
    if (kind === ENTRY_KIND.dekRotating) dek.retiring = { keyId: fields.string(), ciphertext: fields.bytes() }
    entry = { kind: 'dek', dek }
  } else {
    throw fields.unreadable(`unknown entry kind ${kind}`)
  }
  fields.end()
  return entry
}

class FieldWriter {
  private readonly parts: Buffer[] = []

  u8(value: number): void {
    this.parts.push(Buffer.of(value))
  }

  u32(value: number): void {
    const part = Buffer.alloc(4)
    part.writeUInt32LE(value, 0)
    this.parts.push(part)
  }

  /** u16 length ‖ UTF-8. */
  string(value: string): void {
    const part = Buffer.from(value, 'utf8')
    const length = Buffer.alloc(2)
    length.writeUInt16LE(part.length, 0)
    this.parts.push(length, part)
  }

  /** u32 length ‖ bytes. */
  bytes(value: Uint8Array): void {
    this.u32(value.length)
    this.parts.push(Buffer.from(value))
  }

  finish(): Buffer {
    return Buffer.concat(this.parts)
  }
}

class FieldReader {
  private position = 0

  constructor(
    private readonly payload: Buffer,
    /** Where the frame starts in the log, for error messages. */
    private readonly frameOffset: number,
  ) {}

  u8(): number {
    return this.take(1)[0]!
  }

  u32(): number {
    return this.take(4).readUInt32LE(0)
  }

  string(): string {
    return this.take(this.take(2).readUInt16LE(0)).toString('utf8')
  }

  /** Copied out, so the index does not pin the chunk it was read in. */
  bytes(): Uint8Array {
    return new Uint8Array(this.take(this.u32()))
  }

  /** Two length-prefixed fields in a row, copied out into one buffer: an index of a million records holds half as many. */
  bytesPair(): [Uint8Array, Uint8Array] {
    const start = this.position
    const firstLength = this.u32()
    this.take(firstLength)
    const secondLength = this.u32()
    this.take(secondLength)
    const both = new Uint8Array(this.payload.subarray(start + 4, this.position))
    return [both.subarray(0, firstLength), both.subarray(firstLength + 4)]
  }

  state(): KeyState {
    const code = this.u8()
    const state = keyStates[code]
    if (state === undefined) throw this.unreadable(`unknown key state code ${code}`)
    return state
  }

  end(): void {
    if (this.position !== this.payload.length) throw this.unreadable('trailing bytes')
  }

  unreadable(reason: string): Error {
    return new Error(`sealed-blob log: frame at byte ${this.frameOffset} passes its checksum but cannot be read (${reason})`)
  }

  private take(length: number): Buffer {
    if (this.position + length > this.payload.length) throw this.unreadable('too short')
    const part = this.payload.subarray(this.position, this.position + length)
    this.position += length
    return part
  }
}
