/**
 * Framing for the parent ↔ enclave stream (vsock in production, TCP or a Unix
 * socket in dev). Many requests are in flight per connection and answered in
 * any order, so every frame carries the request id it belongs to. This layer
 * knows nothing about what payloads mean; messages.ts does.
 *
 *   u32 BE length (of everything after these 4 bytes)
 *   u32 BE requestId
 *   u8     opcode
 *   u8     status (0 in requests)
 *   ...    payload
 */

import { smallBytes } from './smallBytes.js'

export const opcodes = {
  CREATE: 1,
  SIGN: 2,
  GET: 3,
  SET_STATE: 4,
  UNLOCK: 5,
  HEALTH: 6,
  LOAD: 7,
  ATTEST: 8,
  CREDENTIALS: 9,
  GENERATE_DATA_KEY: 10,
  RESEAL: 11,
  LOGS: 12,
} as const
export type Opcode = (typeof opcodes)[keyof typeof opcodes]

export const statuses = {
  OK: 0,
  NEEDS_UNLOCK: 1,
  NOT_FOUND: 2,
  NOT_ACTIVE: 3,
  BAD_REQUEST: 4,
  INTERNAL: 5,
  UNAVAILABLE: 6,
  /** A LOAD or SET_STATE not above the last one applied to its key: not applied (see messages.ts, LoadRequest). */
  STALE: 7,
  /**
   * A SIGN or GET for a key id the enclave does not hold while its preloaded accounts are not served (their file not
   * loaded yet, or refused): it may be a stored key the enclave lost (a restart), or one of those accounts.
   */
  NOT_FOUND_PRELOAD_NOT_SERVED: 8,
} as const
export type Status = (typeof statuses)[keyof typeof statuses]

/**
 * Opcode and status stay plain numbers here: the framing layer cannot reject
 * an unknown opcode without losing the request id the answer must carry, so
 * the dispatcher answers it (EnclaveService.handle's default branch).
 */
export type Frame = { requestId: number; opcode: number; status: number; payload: Uint8Array }

/**
 * The request id no request may carry (the parent numbers from 1; the enclave
 * closes a connection whose peer uses it): a frame with it speaks for the
 * connection. The enclave sends one, opcode 0, with an error message, as its
 * last word on a connection it closes: status BAD_REQUEST for a bad frame, and
 * UNAVAILABLE for a connection it refused as it arrived (over its connection
 * limit), on which it read nothing: what was sent there may go elsewhere.
 */
export const connectionRequestId = 0

/** The enclave's last word on a connection it closes (see `connectionRequestId`), around an encoded error message. */
export function encodeConnectionClosing(payload: Uint8Array, status: typeof statuses.BAD_REQUEST | typeof statuses.UNAVAILABLE = statuses.BAD_REQUEST): Uint8Array {
  return encodeFrame({ requestId: connectionRequestId, opcode: 0, status, payload })
}

/** Whether `frame` is the enclave's last word on its connection. */
export function isConnectionClosing(frame: Frame): boolean {
  return frame.requestId === connectionRequestId && frame.opcode === 0 && (frame.status === statuses.BAD_REQUEST || frame.status === statuses.UNAVAILABLE)
}

/** Default bound on a frame's declared length; a sealed key record is a few hundred bytes. */
export const maxFrameBytes = 64 * 1024

export const lengthPrefixBytes = 4
/** requestId (4) + opcode (1) + status (1): the smallest length a frame can declare. */
const headerBytes = 6

/**
 * The bytes on the wire cannot be (or were not) a valid frame or payload. On
 * decode the caller closes only the connection that sent them.
 */
export class FrameError extends Error {
  override name = 'FrameError'
  /**
   * From a decoder: the whole frames the same chunk held before the bad one, in stream order. A peer's answers
   * that came before its stream went wrong are still its answers.
   */
  framesBefore: Frame[] = []
}

/**
 * One frame's bytes. Refuses what the peer's decoder would reject (a frame
 * longer than `maxFrameBytes`, out-of-range header fields), so a bad frame
 * fails at the sender instead of closing a shared connection.
 */
export function encodeFrame(frame: Frame & { maxFrameBytes?: number }): Uint8Array {
  const { requestId, opcode, status, payload } = frame
  const limit = frame.maxFrameBytes ?? maxFrameBytes
  checkUint({ value: requestId, bits: 32, field: 'requestId' })
  checkUint({ value: opcode, bits: 8, field: 'opcode' })
  checkUint({ value: status, bits: 8, field: 'status' })
  const declaredLength = headerBytes + payload.byteLength
  if (declaredLength > limit) {
    throw new FrameError(`frame of ${declaredLength} bytes exceeds the ${limit}-byte limit`)
  }
  // A plain Uint8Array, not a Buffer, so callers compare and type it like every other payload.
  const bytes = smallBytes(lengthPrefixBytes + declaredLength)
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength)
  view.setUint32(0, declaredLength)
  view.setUint32(4, requestId)
  view.setUint8(8, opcode)
  view.setUint8(9, status)
  bytes.set(payload, lengthPrefixBytes + headerBytes)
  return bytes
}

/** Throws `FrameError` unless `value` fits the wire's u8 / u32; messages.ts checks its fields with it too. */
export function checkUint({ value, bits, field }: { value: number; bits: 8 | 16 | 32; field: string }): void {
  if (!Number.isInteger(value) || value < 0 || value >= 2 ** bits) {
    throw new FrameError(`${field} ${value} is not a u${bits}`)
  }
}

/**
 * Turns a byte stream into frames, whatever the chunking. Whole frames inside
 * a chunk are read in place; only the one frame that straddles chunks is
 * copied into `pending`, so a large stream costs linear time. Each decoded
 * payload is its own copy: it does not pin the chunk it came from.
 *
 * After a `FrameError` the stream has lost its framing, so the decoder keeps
 * throwing: the connection cannot be resynchronised and must be closed.
 */
export class FrameDecoder {
  readonly maxFrameBytes: number
  /** The start of one incomplete frame; `pendingBytes` of it are valid. */
  private pending = Buffer.alloc(0)
  private pendingBytes = 0
  private failure: FrameError | undefined

  constructor(options: { maxFrameBytes?: number } = {}) {
    this.maxFrameBytes = options.maxFrameBytes ?? maxFrameBytes
  }

  /** Bytes held for a frame not yet complete; non-zero at end of stream means a truncated frame. */
  get bufferedBytes(): number {
    return this.pendingBytes
  }

  /**
   * The frames `chunk` completes, in stream order. Throws `FrameError` on a bad length, carrying the frames before
   * it (`framesBefore`); after that, on every push.
   */
  push(chunk: Uint8Array): Frame[] {
    if (this.failure) throw new FrameError(this.failure.message)
    const frames: Frame[] = []
    try {
      this.read(Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength), frames)
      return frames
    } catch (error) {
      if (error instanceof FrameError) {
        error.framesBefore = frames
        this.failure = error
      }
      throw error
    }
  }

  private read(input: Buffer, frames: Frame[]): void {
    let offset = 0
    if (this.pendingBytes > 0) {
      offset = this.completePending(input, frames)
      if (this.pendingBytes > 0) return
    }
    while (input.length - offset >= lengthPrefixBytes) {
      const declaredLength = this.checkedLength(input.readUInt32BE(offset))
      const frameEnd = offset + lengthPrefixBytes + declaredLength
      if (frameEnd > input.length) break
      frames.push(frameAt(input, offset, frameEnd))
      offset = frameEnd
    }
    if (offset < input.length) this.appendPending(input.subarray(offset))
  }

  /** Feeds `input` into the pending frame; returns how many bytes of `input` it took. */
  private completePending(input: Buffer, frames: Frame[]): number {
    let taken = 0
    if (this.pendingBytes < lengthPrefixBytes) {
      taken = Math.min(lengthPrefixBytes - this.pendingBytes, input.length)
      this.appendPending(input.subarray(0, taken))
      if (this.pendingBytes < lengthPrefixBytes) return taken
    }
    const frameEnd = lengthPrefixBytes + this.checkedLength(this.pending.readUInt32BE(0))
    const wanted = Math.min(frameEnd - this.pendingBytes, input.length - taken)
    this.appendPending(input.subarray(taken, taken + wanted))
    taken += wanted
    if (this.pendingBytes === frameEnd) {
      frames.push(frameAt(this.pending, 0, frameEnd))
      this.pendingBytes = 0
    }
    return taken
  }

  private appendPending(bytes: Buffer): void {
    const needed = this.pendingBytes + bytes.length
    if (needed > this.pending.length) {
      // Never more than one frame: bounded by lengthPrefixBytes + maxFrameBytes.
      const grown = Buffer.allocUnsafe(Math.min(Math.max(needed, this.pending.length * 2, 64), lengthPrefixBytes + this.maxFrameBytes))
      this.pending.copy(grown, 0, 0, this.pendingBytes)
      this.pending = grown
    }
    bytes.copy(this.pending, this.pendingBytes)
    this.pendingBytes = needed
  }

  /** Checked as soon as the 4 length bytes arrive, so a hostile length is never buffered. */
  private checkedLength(declaredLength: number): number {
    if (declaredLength < headerBytes) {
      throw new FrameError(`frame declares ${declaredLength} bytes, shorter than the ${headerBytes}-byte header`)
    }
    if (declaredLength > this.maxFrameBytes) {
      throw new FrameError(`frame declares ${declaredLength} bytes, more than the ${this.maxFrameBytes}-byte limit`)
    }
    return declaredLength
  }
}

function frameAt(bytes: Buffer, start: number, end: number): Frame {
  // A copy, not a view: the chunk (or the reused pending buffer) stays free.
  const payload = smallBytes(end - start - lengthPrefixBytes - headerBytes)
  payload.set(bytes.subarray(start + lengthPrefixBytes + headerBytes, end))
  return {
    requestId: bytes.readUInt32BE(start + 4),
    opcode: bytes.readUInt8(start + 8),
    status: bytes.readUInt8(start + 9),
    payload,
  }
}
