/**
 * Preload mode, for custodial accounts: at start the enclave loads every
 * account's secp256k1 private key ("share") from one age-encrypted JSON file,
 * `[{ "account_id": "...", "share": "0x…64 hex" }, …]`, opened with the age
 * identity the operator's unlock delivers. The keys then live in memory for
 * the life of the process.
 *
 * Loading is all or nothing: a file that is not age, the wrong identity, bad
 * JSON, one bad entry, a duplicate account id or too little memory throws a
 * `PreloadError` that says why, and the enclave must refuse to serve rather
 * than serve a partial set. Messages name entries by index and never carry
 * key material (nor the file's bytes, nor the identity).
 */
import { constants as bufferConstants } from 'node:buffer'
import { createHash } from 'node:crypto'
import { readFile } from 'node:fs/promises'
import { performance } from 'node:perf_hooks'
import { memoryWarnRatio, processMemory, tightestMemory, type MemoryGauge } from './memory.js'
import { armor, Decrypter, type ReadableStreamWithSize } from 'age-encryption'
import { messageOf, parseJsonQuietly } from '../errors.js'
import { maxKeyIdBytes } from '../protocol/messages.js'
import { secp256k1 } from './nativeSecp256k1.js'
import { zero } from './sealing.js'

/** Longest account id accepted, in UTF-8 bytes: the wire's key-id limit, since an account id is the keyId a SIGN carries. */
export const maxAccountIdBytes = maxKeyIdBytes

const privateKeyBytes = 32
const ageBinaryHeader = 'age-encryption.org/'
const ageArmorHeader = '-----BEGIN AGE ENCRYPTED FILE-----'

/** Why a preload was refused. The message is safe to log: no key material, no identity. */
export class PreloadError extends Error {
  override name = 'PreloadError'
}

/** The file to load: read from disk, or bytes already in hand (tests, an unlock that carries the file). */
export type PreloadSource = { path: string; bytes?: never } | { bytes: Uint8Array; path?: never }

export type LoadPreloadOptions = PreloadSource & {
  /** The age identity (`AGE-SECRET-KEY-1…` or `-PQ-1…`), or an age-keygen identity file's text: `#` comments and blank lines are skipped. */
  identity: string
  /** What to check against its limit; default `processMemory()` (resident set, V8 heap, the VM's memory, a limited cgroup's). */
  memory?: () => MemoryGauge[]
  log: (fields: Record<string, unknown>) => void
  /** Monotonic ms clock that times the load; default `performance.now`. */
  now?: () => number
  /** Makes the decrypted file's buffer and the keys' buffer (tests give one that fails, as a process short of memory would). */
  allocate?: (bytes: number) => ArrayBuffer
}

export type PreloadResult = {
  /** account id → 32-byte private key. Wrap it in `PreloadedKeys` to serve and, at shutdown, zero it. */
  keys: Map<string, Uint8Array>
  /** Hex SHA-256 of the encrypted file as read: operators match it against the file they sealed. */
  fingerprint: string
  loadMs: number
  count: number
}

/** Decrypts, parses and validates a preload file; logs `preload_loaded` with its fingerprint, count and load time. */
export async function loadPreloadFile(options: LoadPreloadOptions): Promise<PreloadResult> {
  const now = options.now ?? (() => performance.now())
  const startedAt = now()
  const file = await readSource(options)
  const fingerprint = createHash('sha256').update(file).digest('hex')
  const allocate = options.allocate ?? newArrayBuffer
  const memory = options.memory ?? processMemory
  const plaintext = await decryptAgeFile({
    file,
    identity: options.identity,
    allocate,
    checkRoom: (bytes, armored) => checkRoomToLoad({ plaintextBytes: bytes, gauges: memory(), armored }),
  })
  let entries: unknown
  try {
    entries = parseDecryptedJson(plaintext)
  } finally {
    zero(plaintext)
  }
  const keys = parseShareEntries(entries, { allocate })
  // Measured while the parsed entries are still alive: the load's peak, not the steady state.
  warnIfMemoryHigh({ gauges: memory(), log: options.log })
  const loadMs = Math.round(now() - startedAt)
  options.log({ event: 'preload_loaded', fingerprint, count: keys.size, loadMs })
  return { keys, fingerprint, loadMs, count: keys.size }
}

/**
 * Validates parsed `[{account_id, share}]` and decodes every share. The keys
 * share one off-heap buffer: a 32-byte typed array of its own would live on
 * the V8 heap, where the garbage collector moves it and leaves copies of the
 * key behind; one `ArrayBuffer` stays put and is zeroed in one place.
 * Exported so that sealing refuses exactly what loading would refuse.
 * `allocate` makes that buffer (tests give one that fails, as a process
 * short of memory would).
 */
export function parseShareEntries(entries: unknown, { allocate = newArrayBuffer }: { allocate?: (bytes: number) => ArrayBuffer } = {}): Map<string, Uint8Array> {
  if (!Array.isArray(entries)) throw new PreloadError('the preload file must hold a JSON array of {account_id, share}')
  if (entries.length === 0) throw new PreloadError('the preload file holds no entries: refusing to serve an empty key set')
  const slab = allocateOrRefuse(entries.length * privateKeyBytes, allocate, `the keys of ${entries.length} entries need`)
  const keys = new Map<string, Uint8Array>()
  try {
    for (const [index, entry] of (entries as unknown[]).entries()) {
      const { accountId, shareHex } = readEntry(entry, index)
      const earlier = keys.get(accountId)
      if (earlier) throw new PreloadError(`entry at index ${index}: duplicate account_id (first at index ${earlier.byteOffset / privateKeyBytes})`)
      // Slot i holds entry i, which is how a duplicate finds its first occurrence above.
      const key = slab.subarray(index * privateKeyBytes, (index + 1) * privateKeyBytes)
      Buffer.from(key.buffer, key.byteOffset, privateKeyBytes).write(shareHex, 'hex')
      if (!secp256k1.privateKeyVerify(key)) {
        throw new PreloadError(`entry at index ${index}: share is not a valid secp256k1 private key (zero or not below the curve order)`)
      }
      keys.set(accountId, key)
    }
  } catch (error) {
    zero(slab)
    throw error
  }
  return keys
}

/** The preloaded keys the enclave serves from. `clear()` zeroes them; call it at shutdown. */
export class PreloadedKeys {
  private readonly keys: Map<string, Uint8Array>

  constructor(keys: Map<string, Uint8Array>) {
    this.keys = keys
  }

  get size(): number {
    return this.keys.size
  }

  /** The key's own buffer, not a copy: use it synchronously and never hold it past `clear()`. */
  get(accountId: string): Uint8Array | undefined {
    return this.keys.get(accountId)
  }

  clear(): void {
    zeroKeys(this.keys)
  }
}

function zeroKeys(keys: Map<string, Uint8Array>): void {
  for (const key of keys.values()) zero(key)
  keys.clear()
}

async function readSource(source: PreloadSource): Promise<Uint8Array> {
  if (source.bytes !== undefined) return source.bytes
  try {
    return await readFile(source.path)
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code ?? 'unknown error'
    throw new PreloadError(`cannot read the preload file ${source.path}: ${code}`)
  }
}

/** Opens a binary or ASCII-armored age file into one plaintext buffer, zeroing the decrypted chunks it copies. */
async function decryptAgeFile(options: {
  file: Uint8Array
  identity: string
  allocate: (bytes: number) => ArrayBuffer
  /** Room for a decrypted file of `bytes`, or, `armored`, for decoding and loading an armored file of `bytes`. */
  checkRoom: (bytes: number, armored?: boolean) => void
}): Promise<Uint8Array> {
  const ciphertext = ageBinary(options.file, options.checkRoom)
  const decrypter = identityDecrypter(options.identity)
  let plaintextStream: ReadableStreamWithSize
  let size: number
  try {
    plaintextStream = await decrypter.decrypt(streamOf(ciphertext))
    size = plaintextStream.size(ciphertext.length)
  } catch (error) {
    throw headerError(error)
  }
  options.checkRoom(size)
  // Read chunk by chunk, not with decrypt(bytes): age would concatenate the chunks into a buffer we could not zero.
  const plaintext = allocateOrRefuse(size, options.allocate, 'the decrypted preload file needs')
  const reader = plaintextStream.getReader()
  let filled = 0
  try {
    for (;;) {
      const { done, value } = await reader.read()
      if (done) break
      plaintext.set(value, filled)
      filled += value.length
      zero(value)
    }
  } catch (error) {
    zero(plaintext)
    throw new PreloadError(`the preload file's payload does not decrypt (corrupted or truncated): ${messageOf(error)}`)
  }
  return plaintext
}

function ageBinary(file: Uint8Array, checkRoom: (bytes: number, armored: boolean) => void): Uint8Array {
  // Armor may start after blank space; 256 bytes is ample for that and either header.
  const start = new TextDecoder().decode(file.subarray(0, 256)).trimStart()
  if (start.startsWith(ageBinaryHeader)) return file
  if (!start.startsWith(ageArmorHeader)) {
    throw new PreloadError('the preload file is not an age file (no age-encryption.org header and no age ASCII armor)')
  }
  // Decoding armor holds the file as a string and a few copies of it on the V8 heap, before the header gives the
  // decrypted size: room for about as much as a decrypted file of the armor's size is asked first.
  checkRoom(file.length, true)
  try {
    return armor.decode(new TextDecoder().decode(file))
  } catch (error) {
    throw new PreloadError(`the preload file's age ASCII armor is malformed: ${messageOf(error)}`)
  }
}

function identityDecrypter(identityText: string): Decrypter {
  const identities = identityText
    .split('\n')
    .map((line) => line.trim())
    .filter((line) => line !== '' && !line.startsWith('#'))
  if (identities.length === 0) throw new PreloadError('the age identity is empty')
  const decrypter = new Decrypter()
  for (const identity of identities) {
    try {
      decrypter.addIdentity(identity)
    } catch {
      // age's own message could quote the identity: say only what was expected.
      throw new PreloadError('the age identity is not an age secret key (expected AGE-SECRET-KEY-1… or AGE-SECRET-KEY-PQ-1…)')
    }
  }
  return decrypter
}

function headerError(error: unknown): PreloadError {
  const message = messageOf(error)
  if (message.includes('no identity matched')) {
    return new PreloadError("the age identity does not match any of the preload file's recipients: the file was sealed for another identity")
  }
  if (message.includes('header HMAC')) return new PreloadError("the preload file's age header fails authentication (corrupted file?)")
  return new PreloadError(`the preload file is not a valid age file: ${message}`)
}

/** The decrypted file's JSON; exported for tests, which cannot afford an age file too large to be one string. */
export function parseDecryptedJson(plaintext: Uint8Array): unknown {
  let text: string
  try {
    // The string cannot be zeroed (JS strings are immutable); it is dropped as soon as parsing ends.
    text = new TextDecoder('utf-8', { fatal: true, ignoreBOM: false }).decode(plaintext)
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ERR_ENCODING_INVALID_ENCODED_DATA') throw new PreloadError('the decrypted preload file is not UTF-8 text')
    throw new PreloadError(
      `the decrypted preload file (${megabytes(plaintext.length)} MB) is too large to parse: JSON text here is limited to ${bufferConstants.MAX_STRING_LENGTH} characters in one string (${messageOf(error)})`,
    )
  }
  try {
    return parseJsonQuietly(text, 'the decrypted preload file')
  } catch (error) {
    throw new PreloadError(messageOf(error))
  }
}

function readEntry(entry: unknown, index: number): { accountId: string; shareHex: string } {
  if (typeof entry !== 'object' || entry === null || Array.isArray(entry)) {
    throw new PreloadError(`entry at index ${index} is not an object with account_id and share`)
  }
  const { account_id: accountId, share } = entry as Record<string, unknown>
  if (typeof accountId !== 'string' || accountId === '') {
    throw new PreloadError(`entry at index ${index}: account_id is missing or not a non-empty string`)
  }
  // A lone surrogate becomes U+FFFD in UTF-8, on the wire as in the map: two such ids would collide and neither be found.
  if (Buffer.from(accountId, 'utf8').toString('utf8') !== accountId) {
    throw new PreloadError(`entry at index ${index}: account_id is not well-formed Unicode (a lone surrogate)`)
  }
  const accountIdBytes = Buffer.byteLength(accountId, 'utf8')
  if (accountIdBytes > maxAccountIdBytes) {
    throw new PreloadError(`entry at index ${index}: account_id is ${accountIdBytes} bytes, over the ${maxAccountIdBytes}-byte limit`)
  }
  if (typeof share !== 'string') throw new PreloadError(`entry at index ${index}: share is missing or not a string`)
  const shareHex = share.startsWith('0x') || share.startsWith('0X') ? share.slice(2) : share
  if (!/^[0-9a-fA-F]{64}$/.test(shareHex)) {
    throw new PreloadError(`entry at index ${index}: share is not a 32-byte private key in hex (64 hex digits, 0x optional)`)
  }
  return { accountId, shareHex }
}

function newArrayBuffer(bytes: number): ArrayBuffer {
  return new ArrayBuffer(bytes)
}

/** One off-heap buffer of `bytes`; a process that cannot allocate it is refused with what needed it, not an unexpected error. */
function allocateOrRefuse(bytes: number, allocate: (bytes: number) => ArrayBuffer, whoNeeds: string): Uint8Array {
  try {
    return new Uint8Array(allocate(bytes))
  } catch (error) {
    if (!(error instanceof RangeError)) throw error
    throw new PreloadError(`not enough memory: ${whoNeeds} ${megabytes(bytes)} MB in one buffer, which this process could not allocate (${error.message})`)
  }
}

/**
 * V8 heap that parsing takes per byte of decrypted JSON: its string and the parsed entries (measured: 2.5; the rest
 * is room for the garbage the parse makes on its way).
 */
const parseHeapPerByte = 3

/**
 * Refuses a load that would not fit, before any of it is decrypted: the parse is where memory runs out, and there
 * V8 (or the kernel, with no swap in an enclave) would kill the process, every key it serves with it, rather than
 * let the load fail. Each gauge must have room for the decrypted file and its parse.
 */
function checkRoomToLoad({ plaintextBytes, gauges, armored = false }: { plaintextBytes: number; gauges: MemoryGauge[]; armored?: boolean }): void {
  const needs = plaintextBytes * (1 + parseHeapPerByte)
  for (const { what, inUseBytes, limitBytes } of gauges) {
    if (inUseBytes + needs <= limitBytes) continue
    const file = armored ? `the ASCII-armored preload file is ${megabytes(plaintextBytes)} MB, and decoding and loading` : `the decrypted preload file is ${megabytes(plaintextBytes)} MB, and loading`
    throw new PreloadError(`not enough memory: ${file} it needs about ${megabytes(needs)} MB more of ${what}, of which ${megabytes(Math.max(0, limitBytes - inUseBytes))} MB are free`)
  }
}

function warnIfMemoryHigh(options: { gauges: MemoryGauge[]; log: LoadPreloadOptions['log'] }): void {
  const { what, inUseBytes, limitBytes, ratio } = tightestMemory(options.gauges)
  if (ratio > memoryWarnRatio) {
    options.log({ level: 'warn', event: 'preload_memory_high', what, inUseBytes, limitBytes, percent: Math.round(ratio * 100) })
  }
}

function megabytes(bytes: number): string {
  return (bytes / 2 ** 20).toFixed(1)
}

function streamOf(bytes: Uint8Array): ReadableStream<Uint8Array> {
  return new ReadableStream<Uint8Array>({
    start(controller) {
      controller.enqueue(bytes)
      controller.close()
    },
  })
}
