/**
 * Payload codecs, one pair per opcode and direction. Each message carries only
 * what its operation needs (SIGN is a key id and a digest, never a key). Every
 * decoder checks lengths, enums, UTF-8 and trailing bytes, and throws
 * `FrameError`; encoders throw it too for values the wire cannot carry, so the
 * mistake surfaces at the sender.
 *
 * Wire pieces: key id = u8 length ‖ UTF-8 (1..128 bytes); integers big-endian;
 * variable byte strings = u32 length ‖ bytes.
 */
import type { CacheState, KeyState, RawSignature, SealedKeyRecord } from '../types.js'
import { checkUint, FrameError } from './frames.js'
import { sealedLength } from '../enclave/sealing.js'
import { smallBytes } from './smallBytes.js'

export type SignRequest = { keyId: string; digest: Uint8Array }
/** The signature, and how long the enclave took from decoding the request to signing (queue in the engine included), in µs. */
export type SignResponse = RawSignature & { enclaveMicros: number }
export type CreateRequest = { keyId: string }
export type CreateResponse = { publicKey: Uint8Array; sealed: Uint8Array; version: number }
/**
 * LOAD and SET_STATE carry a `sequence` (u64 on the wire, at most 2^53 - 1).
 * Each UNLOCK answer opens an epoch of `sequenceEpochSize` sequences above
 * every earlier one (`UnlockResponse.sequenceFloor`), and the parent numbers
 * its requests from there. The enclave applies one only if its sequence lies
 * in the current epoch (else NEEDS_UNLOCK: its sender must unlock to get
 * one) and is above the last it applied to the key (else STALE). So a
 * request the parent gave up on (timed out), or one of a parent before it,
 * that lands late cannot undo a newer one.
 */
export type LoadRequest = SealedKeyRecord & { sequence: number }
/** Sequences per epoch: more LOADs and SET_STATEs than a parent sends between two UNLOCKs. */
export const sequenceEpochSize = 2 ** 32
export type GetRequest = { keyId: string }
export type GetResponse = { state: KeyState; cacheState: CacheState; publicKey: Uint8Array }
export type SetStateRequest = { keyId: string; state: KeyState; sequence: number }
/**
 * `retiringWrappedDek`: during a DEK rotation, the DEK being replaced, which
 * still opens the records not yet re-sealed.
 * `sequenceFloorAtLeast`: the epoch this UNLOCK opens starts there or above
 * (rounded up to a whole epoch): above every sequence its parent has used,
 * so that none numbered for the enclave process before a restart can count
 * in the new one.
 * `sealedPreloadIdentity`: the preload file's age identity, age-encrypted to
 * the enclave's own delivery recipient (see ATTEST), so the parent that
 * carries it cannot read it. Absent and empty are the same on the wire.
 */
export type UnlockRequest = { wrappedDek: Uint8Array; retiringWrappedDek?: Uint8Array; sealedPreloadIdentity?: Uint8Array; sequenceFloorAtLeast?: number }
/** `sequenceFloor`: the first sequence of the epoch this UNLOCK opened (see LoadRequest). */
export type UnlockResponse = { wrappedDek: Uint8Array; sequenceFloor: number }
export type HealthResponse = Record<string, unknown>
/** AWS credentials for the enclave's KMS calls, which the parent delivers (an enclave has no other source). */
export type AwsCredentials = { accessKeyId: string; secretAccessKey: string; sessionToken?: string }
/** The enclave's age recipient for secrets sent to it, and the NSM's attestation document binding it (empty without attestation). */
export type AttestResponse = { recipient: string; attestationDocument: Uint8Array }
export type NeedsUnlockResponse = { retryAfterMs: number }

export const maxKeyIdBytes = 128
export const maxErrorMessageBytes = 512
const digestBytes = 32
const signatureBytes = 64
const publicKeyBytes = 65

const utf8Encoder = new TextEncoder()
/** Rejects invalid UTF-8 instead of substituting U+FFFD; keeps a leading BOM, which is part of an id. */
const strictUtf8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true })

/** The index is the wire value. */
const keyStates = ['active', 'frozen', 'archived'] as const satisfies readonly KeyState[]
const cacheStates = ['WARM', 'COOL', 'INVALID'] as const satisfies readonly CacheState[]

/** Payload of HEALTH requests and of OK answers to LOAD and SET_STATE. */
export const emptyPayload: Uint8Array = new Uint8Array(0)

export function decodeEmptyPayload(payload: Uint8Array, message: string): void {
  new PayloadReader(payload, message).end()
}

// SIGN

export function encodeSignRequest(request: SignRequest): Uint8Array {
  return encodeKeyIdAndDigest({ keyId: request.keyId, digest: request.digest, field: 'SIGN digest' })
}

export function decodeSignRequest(payload: Uint8Array): SignRequest {
  return decodeKeyIdAndDigest(payload, { message: 'SIGN request', field: 'digest' })
}

/** Key id ‖ 32 bytes: SIGN's digest, RESEAL's wrapped-DEK hash. */
function encodeKeyIdAndDigest({ keyId, digest, field }: { keyId: string; digest: Uint8Array; field: string }): Uint8Array {
  const id = keyIdBytes(keyId)
  checkLength({ bytes: digest, expected: digestBytes, field })
  return new PayloadWriter(1 + id.length + digestBytes).keyId(id).bytes(digest).done()
}

function decodeKeyIdAndDigest(payload: Uint8Array, { message, field }: { message: string; field: string }): { keyId: string; digest: Uint8Array } {
  const reader = new PayloadReader(payload, message)
  const decoded = { keyId: reader.keyId(), digest: reader.bytes(digestBytes, field) }
  reader.end()
  return decoded
}

export function encodeSignResponse(response: SignResponse): Uint8Array {
  checkLength({ bytes: response.signature, expected: signatureBytes, field: 'SIGN signature' })
  if (response.recoveryId !== 0 && response.recoveryId !== 1) {
    throw new FrameError(`SIGN recoveryId ${response.recoveryId} is not 0 or 1`)
  }
  return new PayloadWriter(signatureBytes + 5).bytes(response.signature).u8(response.recoveryId).u32(Math.min(response.enclaveMicros, 0xffffffff)).done()
}

export function decodeSignResponse(payload: Uint8Array): SignResponse {
  const reader = new PayloadReader(payload, 'SIGN response')
  const signature = reader.bytes(signatureBytes, 'signature')
  const recoveryId = reader.u8('recoveryId')
  if (recoveryId > 1) throw new FrameError(`SIGN response: recoveryId ${recoveryId} is not 0 or 1`)
  const enclaveMicros = reader.u32('enclaveMicros')
  reader.end()
  return { signature, recoveryId, enclaveMicros }
}

// CREATE

export function encodeCreateRequest(request: CreateRequest): Uint8Array {
  return encodeKeyIdOnly(request.keyId)
}

export function decodeCreateRequest(payload: Uint8Array): CreateRequest {
  return decodeKeyIdOnly(payload, 'CREATE request')
}

export function encodeCreateResponse(response: CreateResponse): Uint8Array {
  checkLength({ bytes: response.publicKey, expected: publicKeyBytes, field: 'CREATE publicKey' })
  checkUint({ value: response.version, bits: 32, field: 'CREATE version' })
  return new PayloadWriter(publicKeyBytes + 4 + response.sealed.length + 4)
    .bytes(response.publicKey)
    .u32Bytes(response.sealed)
    .u32(response.version)
    .done()
}

export function decodeCreateResponse(payload: Uint8Array): CreateResponse {
  const reader = new PayloadReader(payload, 'CREATE response')
  const response = { publicKey: reader.bytes(publicKeyBytes, 'publicKey'), sealed: reader.u32Bytes('sealed'), version: reader.u32('version') }
  reader.end()
  return response
}

// RESEAL: a key id and the SHA-256 of the wrapped DEK to seal under (the enclave answers NEEDS_UNLOCK
// while it seals under another); the OK answer is laid out as CREATE's (the record sealed again, one version up).
// GENERATE_DATA_KEY: an empty request; the OK answer is laid out as UNLOCK's (the new wrapped DEK).

export type ResealRequest = { keyId: string; wrappedDekSha256: Uint8Array }

export function encodeResealRequest(request: ResealRequest): Uint8Array {
  return encodeKeyIdAndDigest({ keyId: request.keyId, digest: request.wrappedDekSha256, field: 'RESEAL wrappedDekSha256' })
}

export function decodeResealRequest(payload: Uint8Array): ResealRequest {
  const { keyId, digest } = decodeKeyIdAndDigest(payload, { message: 'RESEAL request', field: 'wrappedDekSha256' })
  return { keyId, wrappedDekSha256: digest }
}

// LOAD (the OK answer is empty)

export function encodeLoadRequest(record: LoadRequest): Uint8Array {
  const keyId = keyIdBytes(record.keyId)
  checkUint({ value: record.version, bits: 32, field: 'LOAD version' })
  checkLength({ bytes: record.publicKey, expected: publicKeyBytes, field: 'LOAD publicKey' })
  checkLength({ bytes: record.sealed, expected: sealedLength, field: 'LOAD sealed' })
  return new PayloadWriter(1 + keyId.length + 8 + 4 + 1 + publicKeyBytes + 4 + record.sealed.length)
    .keyId(keyId)
    .u64(record.sequence, 'LOAD sequence')
    .u32(record.version)
    .u8(keyStateCode(record.state))
    .bytes(record.publicKey)
    .u32Bytes(record.sealed)
    .done()
}

export function decodeLoadRequest(payload: Uint8Array): LoadRequest {
  const reader = new PayloadReader(payload, 'LOAD request')
  const record = {
    keyId: reader.keyId(),
    sequence: reader.u64('sequence'),
    version: reader.u32('version'),
    state: reader.keyState(),
    publicKey: reader.bytes(publicKeyBytes, 'publicKey'),
    sealed: reader.u32Bytes('sealed'),
  }
  reader.end()
  // Any other length cannot open, and the key cache keeps one slab per length it holds.
  checkLength({ bytes: record.sealed, expected: sealedLength, field: 'LOAD request: sealed' })
  return record
}

// GET

export function encodeGetRequest(request: GetRequest): Uint8Array {
  return encodeKeyIdOnly(request.keyId)
}

export function decodeGetRequest(payload: Uint8Array): GetRequest {
  return decodeKeyIdOnly(payload, 'GET request')
}

export function encodeGetResponse(response: GetResponse): Uint8Array {
  checkLength({ bytes: response.publicKey, expected: publicKeyBytes, field: 'GET publicKey' })
  return new PayloadWriter(2 + publicKeyBytes)
    .u8(keyStateCode(response.state))
    .u8(cacheStateCode(response.cacheState))
    .bytes(response.publicKey)
    .done()
}

export function decodeGetResponse(payload: Uint8Array): GetResponse {
  const reader = new PayloadReader(payload, 'GET response')
  const response = { state: reader.keyState(), cacheState: reader.cacheState(), publicKey: reader.bytes(publicKeyBytes, 'publicKey') }
  reader.end()
  return response
}

// SET_STATE (the OK answer is empty)

export function encodeSetStateRequest(request: SetStateRequest): Uint8Array {
  const keyId = keyIdBytes(request.keyId)
  return new PayloadWriter(1 + keyId.length + 8 + 1).keyId(keyId).u64(request.sequence, 'SET_STATE sequence').u8(keyStateCode(request.state)).done()
}

export function decodeSetStateRequest(payload: Uint8Array): SetStateRequest {
  const reader = new PayloadReader(payload, 'SET_STATE request')
  const request = { keyId: reader.keyId(), sequence: reader.u64('sequence'), state: reader.keyState() }
  reader.end()
  return request
}

// UNLOCK

export function encodeUnlockRequest(request: UnlockRequest): Uint8Array {
  const retiring = request.retiringWrappedDek ?? emptyPayload
  const sealed = request.sealedPreloadIdentity ?? emptyPayload
  return new PayloadWriter(8 + 12 + request.wrappedDek.length + retiring.length + sealed.length)
    .u64(request.sequenceFloorAtLeast ?? 0, 'UNLOCK sequenceFloorAtLeast')
    .u32Bytes(request.wrappedDek)
    .u32Bytes(retiring)
    .u32Bytes(sealed)
    .done()
}

/** Empty optional fields are left out. */
export function decodeUnlockRequest(payload: Uint8Array): UnlockRequest {
  const reader = new PayloadReader(payload, 'UNLOCK request')
  const sequenceFloorAtLeast = reader.u64('sequenceFloorAtLeast')
  const request: UnlockRequest = { wrappedDek: reader.u32Bytes('wrappedDek') }
  const retiringWrappedDek = reader.u32Bytes('retiringWrappedDek')
  const sealedPreloadIdentity = reader.u32Bytes('sealedPreloadIdentity')
  reader.end()
  if (retiringWrappedDek.length > 0) request.retiringWrappedDek = retiringWrappedDek
  if (sealedPreloadIdentity.length > 0) request.sealedPreloadIdentity = sealedPreloadIdentity
  if (sequenceFloorAtLeast > 0) request.sequenceFloorAtLeast = sequenceFloorAtLeast
  return request
}

/**
 * The OK answer: the epoch's sequence floor, then the wrapped DEK bytes as
 * they are: the new one when the request asked KMS for a first data key (an
 * empty wrapped DEK), else none.
 */
export function encodeUnlockResponse(response: UnlockResponse): Uint8Array {
  return new PayloadWriter(8 + response.wrappedDek.length).u64(response.sequenceFloor, 'UNLOCK sequenceFloor').bytes(response.wrappedDek).done()
}

export function decodeUnlockResponse(payload: Uint8Array): UnlockResponse {
  const reader = new PayloadReader(payload, 'UNLOCK response')
  const sequenceFloor = reader.u64('sequenceFloor')
  const response = { sequenceFloor, wrappedDek: reader.bytes(payload.length - 8, 'wrappedDek') }
  reader.end()
  return response
}

// GENERATE_DATA_KEY (the request is empty): the OK answer is the new wrapped DEK's bytes as they are.

export function encodeGeneratedDataKey(wrappedDek: Uint8Array): Uint8Array {
  return new PayloadWriter(wrappedDek.length).bytes(wrappedDek).done()
}

export function decodeGeneratedDataKey(payload: Uint8Array): Uint8Array {
  return new PayloadReader(payload, 'GENERATE_DATA_KEY response').bytes(payload.length, 'wrappedDek')
}

// ATTEST (the request is empty)

export function encodeAttestResponse(response: AttestResponse): Uint8Array {
  const recipient = u16Utf8(response.recipient, 'ATTEST recipient')
  return new PayloadWriter(2 + recipient.length + 4 + response.attestationDocument.length)
    .u16Bytes(recipient)
    .u32Bytes(response.attestationDocument)
    .done()
}

export function decodeAttestResponse(payload: Uint8Array): AttestResponse {
  const reader = new PayloadReader(payload, 'ATTEST response')
  const response = { recipient: reader.u16Utf8('recipient'), attestationDocument: reader.u32Bytes('attestationDocument') }
  reader.end()
  return response
}

// CREDENTIALS (the OK answer is empty). Each field is u16 length ‖ UTF-8; an empty session token means none.

export function encodeCredentials(credentials: AwsCredentials): Uint8Array {
  const fields = [credentials.accessKeyId, credentials.secretAccessKey, credentials.sessionToken ?? ''].map((field, i) => u16Utf8(field, `CREDENTIALS ${credentialFields[i]}`))
  if (fields[0]!.length === 0 || fields[1]!.length === 0) throw new FrameError('CREDENTIALS need an access key id and a secret access key')
  const writer = new PayloadWriter(fields.reduce((sum, bytes) => sum + 2 + bytes.length, 0))
  for (const bytes of fields) writer.u16Bytes(bytes)
  return writer.done()
}

export function decodeCredentials(payload: Uint8Array): AwsCredentials {
  const reader = new PayloadReader(payload, 'CREDENTIALS request')
  const [accessKeyId, secretAccessKey, sessionToken] = credentialFields.map((field) => reader.u16Utf8(field))
  reader.end()
  if (accessKeyId === '' || secretAccessKey === '') throw new FrameError('CREDENTIALS request: an access key id and a secret access key are required')
  return sessionToken === '' ? { accessKeyId: accessKeyId!, secretAccessKey: secretAccessKey! } : { accessKeyId: accessKeyId!, secretAccessKey: secretAccessKey!, sessionToken }
}

const credentialFields = ['accessKeyId', 'secretAccessKey', 'sessionToken'] as const

// HEALTH (the request is empty)

export function encodeHealthResponse(health: HealthResponse): Uint8Array {
  return utf8Encoder.encode(JSON.stringify(health))
}

export function decodeHealthResponse(payload: Uint8Array): HealthResponse {
  const reader = new PayloadReader(payload, 'HEALTH response')
  const text = reader.utf8(payload.length, 'body')
  let health: unknown
  try {
    health = JSON.parse(text)
  } catch {
    throw new FrameError('HEALTH response: body is not JSON')
  }
  if (typeof health !== 'object' || health === null || Array.isArray(health)) {
    throw new FrameError('HEALTH response: body is not a JSON object')
  }
  return health as HealthResponse
}

// LOGS: the enclave's log lines after `after`, as the parent last read them from `instance` (0: none yet), which
// acknowledges those up to `after`. The answer's lines are numbered from `first` on; `skipped` counts lines the
// enclave dropped for room before any answer carried them (see enclave/logRing.ts); `more` says another LOGS would
// get more at once.

export type LogsRequest = { instance: number; after: number }
export type LogsResponse = { instance: number; first: number; skipped: number; more: boolean; lines: string[] }

export function encodeLogsRequest(request: LogsRequest): Uint8Array {
  checkUint({ value: request.instance, bits: 32, field: 'LOGS instance' })
  return new PayloadWriter(12).u32(request.instance).u64(request.after, 'LOGS after').done()
}

export function decodeLogsRequest(payload: Uint8Array): LogsRequest {
  const reader = new PayloadReader(payload, 'LOGS request')
  const request = { instance: reader.u32('instance'), after: reader.u64('after') }
  reader.end()
  return request
}

export function encodeLogsResponse(response: LogsResponse): Uint8Array {
  checkUint({ value: response.instance, bits: 32, field: 'LOGS instance' })
  checkUint({ value: response.skipped, bits: 32, field: 'LOGS skipped' })
  checkUint({ value: response.lines.length, bits: 16, field: 'LOGS line count' })
  const lines = response.lines.map((line) => u16Utf8(line, 'LOGS line'))
  const writer = new PayloadWriter(4 + 8 + 4 + 1 + 2 + lines.reduce((sum, bytes) => sum + 2 + bytes.length, 0))
    .u32(response.instance)
    .u64(response.first, 'LOGS first')
    .u32(response.skipped)
    .u8(response.more ? 1 : 0)
    .u16(lines.length)
  for (const bytes of lines) writer.u16Bytes(bytes)
  return writer.done()
}

export function decodeLogsResponse(payload: Uint8Array): LogsResponse {
  const reader = new PayloadReader(payload, 'LOGS response')
  const instance = reader.u32('instance')
  const first = reader.u64('first')
  const skipped = reader.u32('skipped')
  const more = reader.u8('more')
  if (more > 1) throw new FrameError(`LOGS response: more is ${more}, not 0 or 1`)
  const count = reader.u16('line count')
  const lines = Array.from({ length: count }, () => reader.u16Utf8('line'))
  reader.end()
  return { instance, first, skipped, more: more === 1, lines }
}

// Failure answers, for any opcode

/** Payload of a NEEDS_UNLOCK answer: when the parent may retry (the HTTP Retry-After). */
export function encodeNeedsUnlock(response: NeedsUnlockResponse): Uint8Array {
  checkUint({ value: response.retryAfterMs, bits: 32, field: 'NEEDS_UNLOCK retryAfterMs' })
  return new PayloadWriter(4).u32(response.retryAfterMs).done()
}

export function decodeNeedsUnlock(payload: Uint8Array): NeedsUnlockResponse {
  const reader = new PayloadReader(payload, 'NEEDS_UNLOCK response')
  const response = { retryAfterMs: reader.u32('retryAfterMs') }
  reader.end()
  return response
}

/**
 * Payload of NOT_FOUND, NOT_ACTIVE, BAD_REQUEST, INTERNAL, UNAVAILABLE, STALE and
 * NOT_FOUND_PRELOAD_NOT_SERVED answers. Truncated (at a character boundary) rather than refused: an error
 * path must always be able to answer.
 */
export function encodeErrorMessage(message: string): Uint8Array {
  const bytes = utf8Encoder.encode(message)
  if (bytes.length <= maxErrorMessageBytes) return bytes
  let end = maxErrorMessageBytes
  // Back up over continuation bytes (10xxxxxx) to the start of the cut character.
  while (end > 0 && ((bytes[end] ?? 0) & 0xc0) === 0x80) end--
  return bytes.slice(0, end)
}

export function decodeErrorMessage(payload: Uint8Array): string {
  if (payload.length > maxErrorMessageBytes) {
    throw new FrameError(`error message is ${payload.length} bytes, more than ${maxErrorMessageBytes}`)
  }
  return new PayloadReader(payload, 'error response').utf8(payload.length, 'message')
}

// Shared pieces

function encodeKeyIdOnly(keyId: string): Uint8Array {
  const bytes = keyIdBytes(keyId)
  return new PayloadWriter(1 + bytes.length).keyId(bytes).done()
}

function decodeKeyIdOnly(payload: Uint8Array, message: string): { keyId: string } {
  const reader = new PayloadReader(payload, message)
  const keyId = reader.keyId()
  reader.end()
  return { keyId }
}

function keyIdBytes(keyId: string): Uint8Array {
  // byteLength first: a huge string is refused without being encoded.
  const length = Buffer.byteLength(keyId, 'utf8')
  if (length < 1 || length > maxKeyIdBytes) {
    throw new FrameError(`key id is ${length} bytes, expected 1..${maxKeyIdBytes}`)
  }
  return wellFormedUtf8(keyId, 'key id')
}

/** UTF-8 bytes of `text` for a u16 length prefix (`PayloadWriter.u16Bytes`). */
function u16Utf8(text: string, field: string): Uint8Array {
  const bytes = wellFormedUtf8(text, field)
  if (bytes.length > 0xffff) throw new FrameError(`${field} is ${bytes.length} bytes, more than a u16 length allows`)
  return bytes
}

/** UTF-8 bytes of `text`, refusing lone surrogates: they would arrive as U+FFFD, a different id. */
function wellFormedUtf8(text: string, field: string): Uint8Array {
  const bytes = utf8Encoder.encode(text)
  if (strictUtf8.decode(bytes) !== text) throw new FrameError(`${field} is not well-formed Unicode`)
  return bytes
}

function keyStateCode(state: KeyState): number {
  const code = keyStates.indexOf(state)
  if (code < 0) throw new FrameError(`unknown key state ${String(state)}`)
  return code
}

function cacheStateCode(cacheState: CacheState): number {
  const code = cacheStates.indexOf(cacheState)
  if (code < 0) throw new FrameError(`unknown cache state ${String(cacheState)}`)
  return code
}

function checkLength({ bytes, expected, field }: { bytes: Uint8Array; expected: number; field: string }): void {
  if (bytes.length !== expected) throw new FrameError(`${field} is ${bytes.length} bytes, expected ${expected}`)
}

/**
 * Writes into a buffer sized up front by the encoder; `done` checks the size
 * was right. Plain Uint8Array rather than Buffer, so encoded and decoded
 * values are the same type.
 */
class PayloadWriter {
  private readonly buffer: Uint8Array
  private readonly view: DataView
  private offset = 0

  constructor(size: number) {
    this.buffer = smallBytes(size)
    this.view = new DataView(this.buffer.buffer, this.buffer.byteOffset, size)
  }

  u8(value: number): this {
    this.view.setUint8(this.offset, value)
    this.offset += 1
    return this
  }

  u16(value: number): this {
    this.view.setUint16(this.offset, value)
    this.offset += 2
    return this
  }

  u32(value: number): this {
    this.view.setUint32(this.offset, value)
    this.offset += 4
    return this
  }

  bytes(value: Uint8Array): this {
    this.buffer.set(value, this.offset)
    this.offset += value.length
    return this
  }

  u32Bytes(value: Uint8Array): this {
    return this.u32(value.length).bytes(value)
  }

  /** A sequence as u64; one that is not a safe integer is refused, as a number above 2^53 - 1 is not exact. */
  u64(value: number, field: string): this {
    if (!Number.isSafeInteger(value) || value < 0) throw new FrameError(`${field} ${value} is not an integer in [0, 2^53)`)
    return this.u32(Math.floor(value / 2 ** 32)).u32(value >>> 0)
  }

  keyId(utf8: Uint8Array): this {
    return this.u8(utf8.length).bytes(utf8)
  }

  /** u16 length ‖ bytes. */
  u16Bytes(value: Uint8Array): this {
    return this.u16(value.length).bytes(value)
  }

  done(): Uint8Array {
    if (this.offset !== this.buffer.length) throw new Error(`payload writer filled ${this.offset} of ${this.buffer.length} bytes`)
    return this.buffer
  }
}


/**
 * Reads one payload front to back; every failure names the message and field.
 * Byte fields are copies, never views: a payload may sit in a shared slab
 * (smallBytes.ts), and a record the cache or store keeps must not pin one.
 */
class PayloadReader {
  private readonly view: DataView
  private offset = 0

  constructor(
    private readonly payload: Uint8Array,
    private readonly message: string,
  ) {
    this.view = new DataView(payload.buffer, payload.byteOffset, payload.byteLength)
  }

  u8(field: string): number {
    this.need(1, field)
    return this.view.getUint8(this.offset++)
  }

  u16(field: string): number {
    this.need(2, field)
    const value = this.view.getUint16(this.offset)
    this.offset += 2
    return value
  }

  u32(field: string): number {
    this.need(4, field)
    const value = this.view.getUint32(this.offset)
    this.offset += 4
    return value
  }

  /** A u64 that must be a safe integer: above 2^53 - 1 a number would silently round. */
  u64(field: string): number {
    const high = this.u32(field)
    const low = this.u32(field)
    if (high > 0x1fffff) throw this.error(`${field} is above 2^53 - 1`)
    return high * 2 ** 32 + low
  }

  bytes(length: number, field: string): Uint8Array {
    return this.inPlace(length, field).slice()
  }

  /** The next `length` bytes in place, for what is decoded at once and not kept. */
  private inPlace(length: number, field: string): Uint8Array {
    this.need(length, field)
    const bytes = this.payload.subarray(this.offset, this.offset + length)
    this.offset += length
    return bytes
  }

  u32Bytes(field: string): Uint8Array {
    return this.bytes(this.u32(`${field} length`), field)
  }

  utf8(length: number, field: string): string {
    const bytes = this.inPlace(length, field)
    try {
      return strictUtf8.decode(bytes)
    } catch {
      throw this.error(`${field} is not valid UTF-8`)
    }
  }

  /** u16 length ‖ UTF-8. */
  u16Utf8(field: string): string {
    return this.utf8(this.u16(`${field} length`), field)
  }

  keyId(): string {
    const length = this.u8('key id length')
    if (length < 1 || length > maxKeyIdBytes) throw this.error(`key id is ${length} bytes, expected 1..${maxKeyIdBytes}`)
    return this.utf8(length, 'key id')
  }

  keyState(): KeyState {
    const code = this.u8('key state')
    const state = keyStates[code]
    if (state === undefined) throw this.error(`key state ${code} is not one of 0..${keyStates.length - 1}`)
    return state
  }

  cacheState(): CacheState {
    const code = this.u8('cache state')
    const state = cacheStates[code]
    if (state === undefined) throw this.error(`cache state ${code} is not one of 0..${cacheStates.length - 1}`)
    return state
  }

  /** Trailing bytes mean the peer speaks another version of the message: refuse, never ignore. */
  end(): void {
    const left = this.payload.length - this.offset
    if (left > 0) throw this.error(`${left} trailing bytes`)
  }

  private need(length: number, field: string): void {
    const left = this.payload.length - this.offset
    if (left < length) throw this.error(`${field} needs ${length} bytes, ${left} left`)
  }

  private error(detail: string): FrameError {
    return new FrameError(`${this.message}: ${detail}`)
  }
}
