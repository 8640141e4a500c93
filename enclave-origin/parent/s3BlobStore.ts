import { GetObjectCommand, ListObjectsV2Command, PutObjectCommand, S3Client, type S3ClientConfig } from '@aws-sdk/client-s3'
import { randomBytes } from 'node:crypto'
import { setTimeout as sleep } from 'node:timers/promises'
import { boundedAwsRequests } from '../awsRequests.js'
import { messageOf, parseJsonQuietly } from '../errors.js'
import type { KeyState, SealedKeyRecord, WrappedDek } from '../types.js'
import { assertNotOlder, assertStateMayChange, assertWrappedDekIs, copyDek, copyRecord, isValidVersion, KeyNotStoredError, keyStates, sameWrappedDek, stateToStore, validateDek, validateKeyId, validateRecord, validateState, type BlobStore } from './blobStore.js'

/**
 * A BlobStore in an S3 bucket, for parents that should not keep the only copy
 * of the sealed keys on their own disk. One object per key,
 *
 *   <prefix>keys/<encodeURIComponent(keyId)>.json   the SealedKeyRecord (binary fields base64)
 *   <prefix>dek.json                               the wrapped DEK (and, mid-rotation, the retiring one)
 *
 * S3 answers a PutObject only once the object is stored durably, so `put`,
 * `setState` and `putWrappedDek` resolve when their PutObject does. A write
 * that fails without S3's answer has an unknown outcome (the request may have
 * reached S3 and only the answer was lost), so the store forgets what it
 * cached for that object and reads it from S3 again next time.
 *
 * Every write is conditional on the version of the object it read: `If-Match`
 * with that version's ETag, or `If-None-Match: *` for an object not there
 * yet. S3 checks the condition when the write lands, so a write this store
 * gave up on that S3 takes later (an unfreeze after the freeze that followed
 * it) is refused once any later write of the object has landed: its ETag no
 * longer matches. Every call writes, even a state change to the state S3
 * already shows, so that it lands and fences any earlier write, this
 * process's or a stopped one's. Until a write lands after one whose outcome
 * is unknown, the object is *unsettled*: its reads are not cached. A write
 * whose condition fails (the object changed since it was read, or another
 * write of it is under way) is read and applied again, three times at most.
 *
 * Operations on one key run one after another, in call order, so the version
 * check of `put` and the read-modify-write of `setState` see every earlier
 * write of this process. One process at a time may use a bucket and prefix,
 * as with the disk store (stop the old parent before a new one starts): a
 * conflicting write is read and applied again, and each process serves from
 * its own cache, so the conditions do not make two running writers safe.
 *
 * The credentials need s3:ListBucket (also so that reading a missing object
 * answers 404 rather than 403), s3:GetObject and s3:PutObject.
 */

/**
 * The parent's S3 client. Every request is bounded: a bucket endpoint that
 * goes silent must not hold a key's reload, and every state change queued
 * behind it, for ever.
 */
export function parentS3Client(options: { region: string; endpoint?: string; timeoutMs: number; credentials?: S3ClientConfig['credentials'] }): S3Client {
  const { region, endpoint, timeoutMs, credentials } = options
  return new S3Client({
    region,
    endpoint,
    forcePathStyle: Boolean(endpoint),
    credentials,
    ...boundedAwsRequests({ timeoutMs }),
  })
}

export type S3BlobStoreOptions = {
  /** The caller owns the client: `close` does not destroy it. */
  client: S3Client
  /** An existing bucket. */
  bucket: string
  /** Put before every object name, e.g. `origin-1/`; empty by default. */
  prefix?: string
  /** GetObject requests `list` keeps in flight at once. */
  listConcurrency?: number
  /** MaxKeys of each ListObjectsV2 page `list` reads (S3 caps it at 1000). */
  listPageSize?: number
}

/** Counted since open, including the probe open itself makes. */
export type S3BlobStoreStats = {
  /** GetObject requests sent (each SDK call once, whatever its retries). */
  gets: number
  /** PutObject requests sent. */
  puts: number
  /** ListObjectsV2 pages requested. */
  lists: number
  /** Requests of any kind that failed (a GetObject of a missing object, or a conflict, is not a failure). */
  failures: number
  /** PutObjects S3 refused because the object changed since it was read; each is read and applied again. */
  conflicts: number
  /** Writes (records, state changes, DEKs) acknowledged as durable. */
  records: number
}

export type S3BlobStore = BlobStore & { stats(): S3BlobStoreStats }

export const S3_KEYS_FOLDER = 'keys/'
export const S3_DEK_OBJECT = 'dek.json'
/** S3 refuses object names longer than this many UTF-8 bytes. */
const MAX_OBJECT_NAME_BYTES = 1024
/** Tries of one write whose condition fails, each after reading the object again, the second and third after a pause of this many ms times the tries made. */
const CONFLICT_TRIES = 3
const CONFLICT_BACKOFF_MS = 50

export async function openS3BlobStore(options: S3BlobStoreOptions): Promise<S3BlobStore> {
  const { client, bucket, prefix = '', listConcurrency = 16, listPageSize = 1000 } = options
  if (typeof bucket !== 'string' || bucket.length === 0) throw new TypeError('bucket must be a non-empty string')
  if (typeof prefix !== 'string') throw new TypeError('prefix must be a string')
  if (!Number.isInteger(listConcurrency) || listConcurrency < 1) throw new RangeError('listConcurrency must be an integer ≥ 1')
  if (!Number.isInteger(listPageSize) || listPageSize < 1 || listPageSize > 1000) throw new RangeError('listPageSize must be an integer in [1, 1000]')

  const store = new S3Store({ client, bucket, prefix, listConcurrency, listPageSize })
  // Fails fast, with a clear message, on a missing bucket or credentials that cannot list it.
  await store.probe()
  return store
}

// ---------------------------------------------------------------- the store

type StoreParts = { client: S3Client; bucket: string; prefix: string; listConcurrency: number; listPageSize: number }
/** A value as one version of its object holds it, and that version's ETag. */
type Versioned<T> = { value: T; etag: string }

/** S3 did not store a conditional write: the object is not the version the write was conditioned on, or another write of it is under way. */
class ConflictError extends Error {
  constructor(
    readonly objectName: string,
    cause: unknown,
  ) {
    super(`conditional PutObject of ${objectName} refused`, { cause })
  }
}

class S3Store implements S3BlobStore {
  private readonly client: S3Client
  private readonly bucket: string
  private readonly prefix: string
  private readonly listConcurrency: number
  private readonly listPageSize: number
  private readonly counters: S3BlobStoreStats = { gets: 0, puts: 0, lists: 0, failures: 0, conflicts: 0, records: 0 }
  /** What this process last wrote or read per key; a key missing here is read from S3. Only durable values of settled keys are cached. */
  private readonly records = new Map<string, Versioned<SealedKeyRecord>>()
  private dek: Versioned<WrappedDek> | undefined
  /** The last operation queued per key (`key:<id>`) and for the DEK (`dek`); each runs after the one before it. */
  private readonly chains = new Map<string, Promise<unknown>>()
  /** Chains whose object a write of this store may still land on (its outcome unknown), until a later write of it lands. */
  private readonly unsettled = new Set<string>()
  /** Writes not settled yet, for `close`. */
  private readonly pendingWrites = new Set<Promise<unknown>>()
  private closing: Promise<void> | undefined

  constructor(parts: StoreParts) {
    this.client = parts.client
    this.bucket = parts.bucket
    this.prefix = parts.prefix
    this.listConcurrency = parts.listConcurrency
    this.listPageSize = parts.listPageSize
  }

  async probe(): Promise<void> {
    await this.listPage(undefined, 1)
  }

  async put(record: SealedKeyRecord): Promise<void> {
    this.assertOpen()
    validateRecord(record)
    const copy = copyRecord(record)
    const objectName = this.keyObjectName(record.keyId)
    return this.write(`key:${record.keyId}`, async () => {
      const stored = await this.loadRecord(copy.keyId)
      assertNotOlder(copy, stored?.value.version)
      await this.writeRecord(objectName, { ...copy, state: stateToStore(copy.state, stored?.value.state) }, stored?.etag)
    })
  }

  async get(keyId: string): Promise<SealedKeyRecord | undefined> {
    this.assertOpen()
    validateKeyId(keyId)
    const cached = this.records.get(keyId)
    if (cached) return copyRecord(cached.value)
    // Queued behind this key's writes, so a read never caches a value older than one written meanwhile.
    const stored = await this.serialize(`key:${keyId}`, () => this.loadRecord(keyId))
    return stored && copyRecord(stored.value)
  }

  async *list(): AsyncIterable<SealedKeyRecord> {
    this.assertOpen()
    // A window of GETs in flight, yielded in listing order; the next one starts as the oldest is taken.
    const inFlight: Promise<Versioned<SealedKeyRecord> | undefined>[] = []
    for await (const keyId of this.listKeyIds()) {
      const loading = this.serialize(`key:${keyId}`, () => this.loadRecord(keyId))
      // Marked handled so a failure is not reported as unhandled before its turn (or after the caller stops early).
      loading.catch(() => {})
      inFlight.push(loading)
      if (inFlight.length >= this.listConcurrency) {
        const stored = await inFlight.shift()!
        if (stored) yield copyRecord(stored.value)
      }
    }
    while (inFlight.length > 0) {
      const stored = await inFlight.shift()!
      if (stored) yield copyRecord(stored.value)
    }
  }

  async setState(keyId: string, state: KeyState): Promise<void> {
    this.assertOpen()
    validateKeyId(keyId)
    validateState(state)
    const objectName = this.keyObjectName(keyId)
    return this.write(`key:${keyId}`, async () => {
      const stored = await this.loadRecord(keyId)
      if (stored === undefined) throw new KeyNotStoredError(keyId)
      assertStateMayChange(keyId, stored.value.state, state)
      // Written even if S3 shows this state already, to fence a write that may still land (see the top).
      await this.writeRecord(objectName, { ...copyRecord(stored.value), state }, stored.etag)
    })
  }

  async putWrappedDek(dek: WrappedDek, replacing: WrappedDek | undefined): Promise<void> {
    this.assertOpen()
    validateDek(dek)
    const copy = copyDek(dek)
    return this.write('dek', async () => {
      const stored = await this.loadDek()
      // Checked at each try: a conflict's retry reads anew, and what landed meanwhile must not simply be written over.
      // Unless it is this very DEK (an attempt whose answer was lost landed, and the SDK's retry of it met a 412):
      // then it is written once more, over that, which fences any earlier write still under way.
      if (!sameWrappedDek(stored?.value, copy)) assertWrappedDekIs(stored?.value, replacing)
      this.dek = undefined
      const etag = await this.putObject('dek', this.prefix + S3_DEK_OBJECT, encodeDek(copy), stored?.etag)
      this.dek = { value: copy, etag }
      this.counters.records++
    })
  }

  async getWrappedDek(): Promise<WrappedDek | undefined> {
    this.assertOpen()
    const dek = this.dek ?? (await this.serialize('dek', () => this.loadDek()))
    return dek && copyDek(dek.value)
  }

  stats(): S3BlobStoreStats {
    return { ...this.counters }
  }

  close(): Promise<void> {
    this.closing ??= this.shutdown()
    return this.closing
  }

  private async shutdown(): Promise<void> {
    // Writes queued before close still run to the end; new ones are refused (closing is set).
    while (this.pendingWrites.size > 0) await Promise.allSettled([...this.pendingWrites])
  }

  private assertOpen(): void {
    if (this.closing) throw new Error('blob store is closed')
  }

  // ------------------------------------------------ ordering

  /** Runs `operation` after every operation queued before it on `chain`, whatever their outcome. */
  private serialize<T>(chain: string, operation: () => Promise<T>): Promise<T> {
    const previous = this.chains.get(chain) ?? Promise.resolve()
    const result = previous.then(operation, operation)
    const settled = result.then(
      () => {},
      () => {},
    )
    this.chains.set(chain, settled)
    void settled.then(() => {
      if (this.chains.get(chain) === settled) this.chains.delete(chain)
    })
    return result
  }

  /** Queues a write on `chain`; one whose condition fails is run again, reading the object anew, up to CONFLICT_TRIES times. */
  private write(chain: string, operation: () => Promise<void>): Promise<void> {
    const result = this.serialize(chain, async () => {
      for (let tries = 1; ; tries++) {
        try {
          return await operation()
        } catch (error) {
          if (!(error instanceof ConflictError)) throw error
          if (tries === CONFLICT_TRIES) {
            const outcome = this.unsettled.has(chain) ? 'an attempt of it may or may not be stored' : 'nothing was stored'
            throw new Error(
              `S3 blob store: PutObject s3://${this.bucket}/${error.objectName} was refused ${CONFLICT_TRIES} times because the object changed after it was read` +
                ` or another write of it was under way (does another process write to this bucket and prefix?); ${outcome}`,
              { cause: error.cause },
            )
          }
          await sleep(CONFLICT_BACKOFF_MS * tries)
        }
      }
    })
    this.pendingWrites.add(result)
    const forget = () => {
      this.pendingWrites.delete(result)
    }
    result.then(forget, forget)
    return result
  }

  // ------------------------------------------------ records

  private keyObjectName(keyId: string): string {
    const name = `${this.prefix}${S3_KEYS_FOLDER}${encodeURIComponent(keyId)}.json`
    if (Buffer.byteLength(name, 'utf8') > MAX_OBJECT_NAME_BYTES) {
      throw new RangeError(`key ${keyId}: object name is longer than ${MAX_OBJECT_NAME_BYTES} bytes`)
    }
    return name
  }

  /** Runs `store` (which caches a value) unless the chain is unsettled: a late write of ours may change its object under the cache. */
  private cache(chain: string, store: () => void): void {
    if (!this.unsettled.has(chain)) store()
  }

  /** The key's record as cached, else as S3 has it (and then cached). Call only from the key's chain. */
  private async loadRecord(keyId: string): Promise<Versioned<SealedKeyRecord> | undefined> {
    const cached = this.records.get(keyId)
    if (cached) return cached
    const objectName = this.keyObjectName(keyId)
    const object = await this.getObject(objectName)
    if (object === undefined) return undefined
    const record = decodeRecord(object.body, `s3://${this.bucket}/${objectName}`)
    if (record.keyId !== keyId) {
      throw new Error(`S3 blob store: s3://${this.bucket}/${objectName} holds key ${record.keyId}, not ${keyId}`)
    }
    const stored = { value: record, etag: object.etag }
    this.cache(`key:${keyId}`, () => this.records.set(keyId, stored))
    return stored
  }

  /** Writes the record over the version with `etag` (a new object if undefined). Call only from the key's chain. */
  private async writeRecord(objectName: string, record: SealedKeyRecord, etag: string | undefined): Promise<void> {
    // Until S3 answers, what it holds is unknown: forget the cached value so the next read asks S3.
    this.records.delete(record.keyId)
    const written = await this.putObject(`key:${record.keyId}`, objectName, encodeRecord(record), etag)
    this.records.set(record.keyId, { value: record, etag: written })
    this.counters.records++
  }

  private async loadDek(): Promise<Versioned<WrappedDek> | undefined> {
    if (this.dek) return this.dek
    const objectName = this.prefix + S3_DEK_OBJECT
    const object = await this.getObject(objectName)
    if (object === undefined) return undefined
    const where = `s3://${this.bucket}/${objectName}`
    const fields = parseObject(object.body, where)
    if (fields.format !== FORMAT) throw unreadable(where, `unknown format ${String(fields.format)}`)
    if (typeof fields.keyId !== 'string' || fields.keyId.length === 0) throw unreadable(where, 'keyId is not a non-empty string')
    const dek: WrappedDek = { keyId: fields.keyId, ciphertext: fromBase64(fields.ciphertext, where, 'ciphertext') }
    if (fields.retiring !== undefined) {
      const retiring = fields.retiring as Record<string, unknown> | null
      if (typeof retiring?.keyId !== 'string' || retiring.keyId.length === 0) throw unreadable(where, 'retiring.keyId is not a non-empty string')
      dek.retiring = { keyId: retiring.keyId, ciphertext: fromBase64(retiring.ciphertext, where, 'retiring.ciphertext') }
    }
    const stored = { value: dek, etag: object.etag }
    this.cache('dek', () => (this.dek = stored))
    return stored
  }

  /** Object names under `keys/`, page by page, decoded back to key ids. */
  private async *listKeyIds(): AsyncIterable<string> {
    const folder = this.prefix + S3_KEYS_FOLDER
    let continuationToken: string | undefined
    do {
      const page = await this.listPage(continuationToken, this.listPageSize)
      for (const object of page.Contents ?? []) {
        if (object.Key !== undefined) yield this.keyIdOf(object.Key, folder)
      }
      continuationToken = page.IsTruncated ? page.NextContinuationToken : undefined
      if (page.IsTruncated && continuationToken === undefined) {
        throw new Error(`S3 blob store: listing s3://${this.bucket}/${folder} was truncated without a continuation token`)
      }
    } while (continuationToken !== undefined)
  }

  /** The prefix is the store's own: an object there that it did not write is refused rather than skipped. */
  private keyIdOf(objectName: string, folder: string): string {
    const where = `s3://${this.bucket}/${objectName}`
    const encoded = objectName.slice(folder.length)
    if (!objectName.startsWith(folder) || !encoded.endsWith('.json')) throw new Error(`S3 blob store: unexpected object ${where}`)
    let keyId: string
    try {
      keyId = decodeURIComponent(encoded.slice(0, -'.json'.length))
    } catch {
      throw new Error(`S3 blob store: unexpected object ${where} (its name does not decode to a key id)`)
    }
    if (keyId.length === 0 || `${folder}${encodeURIComponent(keyId)}.json` !== objectName) {
      throw new Error(`S3 blob store: unexpected object ${where} (not a name this store writes)`)
    }
    return keyId
  }

  // ------------------------------------------------ S3 requests

  private async listPage(continuationToken: string | undefined, maxKeys: number) {
    const folder = this.prefix + S3_KEYS_FOLDER
    this.counters.lists++
    try {
      return await this.client.send(
        new ListObjectsV2Command({ Bucket: this.bucket, Prefix: folder, MaxKeys: maxKeys, ContinuationToken: continuationToken }),
      )
    } catch (error) {
      this.counters.failures++
      throw describeS3Error(error, { operation: 'ListObjectsV2', bucket: this.bucket, objectName: folder, write: false })
    }
  }

  /** The object's body and ETag, or undefined if S3 says there is no such object. */
  private async getObject(objectName: string): Promise<{ body: string; etag: string } | undefined> {
    this.counters.gets++
    try {
      const response = await this.client.send(new GetObjectCommand({ Bucket: this.bucket, Key: objectName }))
      if (!response.Body) throw new Error('the response has no body')
      const body = await response.Body.transformToString('utf8')
      if (!response.ETag) throw new Error('the response has no ETag, which conditional writes need')
      return { body, etag: response.ETag }
    } catch (error) {
      if (errorName(error) === 'NoSuchKey') return undefined
      this.counters.failures++
      throw describeS3Error(error, { operation: 'GetObject', bucket: this.bucket, objectName, write: false })
    }
  }

  /**
   * Writes the object over its version with `etag`, or as a new object if
   * undefined, and resolves to the new version's ETag once S3 acknowledged
   * it, which it does only once it is durable. Rejects with a ConflictError
   * if S3 refused the condition; any other failure leaves the outcome
   * unknown and `chain` unsettled.
   */
  private async putObject(chain: string, objectName: string, body: string, etag: string | undefined): Promise<string> {
    this.counters.puts++
    let written: string | undefined
    try {
      const condition = etag === undefined ? { IfNoneMatch: '*' } : { IfMatch: etag }
      written = (await this.client.send(new PutObjectCommand({ Bucket: this.bucket, Key: objectName, Body: body, ContentType: 'application/json', ...condition }))).ETag
    } catch (error) {
      if (isConflict(error)) {
        this.counters.conflicts++
        // A refusal only says this attempt was not stored. A 409 (a write of the object under way) may be an earlier attempt of
        // this write, and one retried by the SDK may still land or may have: either way the object is unsettled until a later write lands.
        if (httpStatus(error) === 409 || attemptsOf(error) > 1) this.unsettled.add(chain)
        throw new ConflictError(objectName, error)
      }
      this.counters.failures++
      this.unsettled.add(chain)
      throw describeS3Error(error, { operation: 'PutObject', bucket: this.bucket, objectName, write: true })
    }
    if (!written) {
      this.counters.failures++
      this.unsettled.add(chain)
      throw new Error(`S3 blob store: PutObject s3://${this.bucket}/${objectName} was answered without an ETag, which conditional writes need`)
    }
    // This version landed, so no earlier write of ours (conditioned on an older ETag) can land after it.
    this.unsettled.delete(chain)
    return written
  }
}

// ---------------------------------------------------------------- errors

const ACCESS_DENIED_NAMES = new Set([
  'AccessDenied',
  'Forbidden',
  'InvalidAccessKeyId',
  'SignatureDoesNotMatch',
  'ExpiredToken',
  'InvalidToken',
  'AllAccessDisabled',
  'AccountProblem',
])

function errorName(error: unknown): string | undefined {
  if (typeof error !== 'object' || error === null) return undefined
  const { name, Code } = error as { name?: unknown; Code?: unknown }
  if (typeof Code === 'string') return Code
  return typeof name === 'string' ? name : undefined
}

/**
 * S3 did not store a conditional write because the object is not the version
 * it named: 412 (the ETag differs, or the object exists for `If-None-Match`),
 * 404 NoSuchKey (`If-Match` on an object gone), or 409 (a conflicting write
 * under way).
 */
function isConflict(error: unknown): boolean {
  const status = httpStatus(error)
  return status === 412 || status === 409 || (status === 404 && errorName(error) === 'NoSuchKey')
}

/** Attempts the SDK made of a request (more than one after a retry). */
function attemptsOf(error: unknown): number {
  if (typeof error !== 'object' || error === null) return 1
  const attempts = (error as { $metadata?: { attempts?: unknown } }).$metadata?.attempts
  return typeof attempts === 'number' ? attempts : 1
}

function httpStatus(error: unknown): number | undefined {
  if (typeof error !== 'object' || error === null) return undefined
  const status = (error as { $metadata?: { httpStatusCode?: unknown } }).$metadata?.httpStatusCode
  return typeof status === 'number' ? status : undefined
}

/** One message naming the request, the object and what went wrong; the SDK's error is the cause. */
function describeS3Error(
  error: unknown,
  { operation, bucket, objectName, write }: { operation: string; bucket: string; objectName: string; write: boolean },
): Error {
  const name = errorName(error) ?? 'Error'
  const status = httpStatus(error)
  const detail = messageOf(error)
  const target = `s3://${bucket}/${objectName}`
  let reason: string
  if (name === 'NoSuchBucket' || (operation === 'ListObjectsV2' && status === 404)) {
    reason = `bucket "${bucket}" does not exist (${name})`
  } else if (ACCESS_DENIED_NAMES.has(name) || status === 403) {
    reason = `access denied (${name}: ${detail}); the credentials need s3:ListBucket on the bucket and s3:GetObject and s3:PutObject on its objects`
  } else {
    reason = `${name}${status !== undefined ? ` (HTTP ${status})` : ''}: ${detail}`
  }
  const outcome = write ? '; the write may or may not be stored' : ''
  return new Error(`S3 blob store: ${operation} ${target} failed: ${reason}${outcome}`, { cause: error })
}

// ---------------------------------------------------------------- object codec

/** Written into every object, so a later layout can refuse to misread this one. */
const FORMAT = 'sealed-blob-store/v1'

/**
 * Random per write, so no two versions of an object share an ETag: a late
 * write conditioned on an older version's ETag would otherwise match a later
 * version with the same content (active, frozen, active again).
 */
function writeId(): string {
  return randomBytes(12).toString('base64url')
}

function encodeRecord(record: SealedKeyRecord): string {
  return JSON.stringify({
    format: FORMAT,
    keyId: record.keyId,
    version: record.version,
    state: record.state,
    publicKey: toBase64(record.publicKey),
    sealed: toBase64(record.sealed),
    writeId: writeId(),
  })
}

function encodeDek(dek: WrappedDek): string {
  const retiring = dek.retiring && { keyId: dek.retiring.keyId, ciphertext: toBase64(dek.retiring.ciphertext) }
  return JSON.stringify({ format: FORMAT, keyId: dek.keyId, ciphertext: toBase64(dek.ciphertext), ...(retiring && { retiring }), writeId: writeId() })
}

function decodeRecord(body: string, where: string): SealedKeyRecord {
  const fields = parseObject(body, where)
  if (fields.format !== FORMAT) throw unreadable(where, `unknown format ${String(fields.format)}`)
  const { keyId, version, state } = fields
  if (typeof keyId !== 'string' || keyId.length === 0) throw unreadable(where, 'keyId is not a non-empty string')
  if (typeof version !== 'number' || !isValidVersion(version)) throw unreadable(where, 'version is not an integer in [0, 2^32)')
  if (!keyStates.includes(state as KeyState)) throw unreadable(where, `unknown key state ${String(state)}`)
  return {
    keyId,
    version,
    state: state as KeyState,
    publicKey: fromBase64(fields.publicKey, where, 'publicKey'),
    sealed: fromBase64(fields.sealed, where, 'sealed'),
  }
}

function parseObject(body: string, where: string): Record<string, unknown> {
  let value: unknown
  try {
    // Quietly: JSON.parse's own message quotes the text at the fault, base64 of sealed keys or a wrapped DEK here.
    value = parseJsonQuietly(body, 'the object')
  } catch (error) {
    throw unreadable(where, messageOf(error))
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value)) throw unreadable(where, 'not a JSON object')
  return value as Record<string, unknown>
}

const BASE64 = /^[A-Za-z0-9+/]*={0,2}$/

function toBase64(bytes: Uint8Array): string {
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString('base64')
}

function fromBase64(value: unknown, where: string, field: string): Uint8Array {
  if (typeof value !== 'string' || value.length % 4 !== 0 || !BASE64.test(value)) throw unreadable(where, `${field} is not base64`)
  return new Uint8Array(Buffer.from(value, 'base64'))
}

function unreadable(where: string, reason: string): Error {
  return new Error(`S3 blob store: ${where} cannot be read (${reason})`)
}

