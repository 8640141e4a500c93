import { describe, expect, it } from 'vitest'
import { encodeFrame, FrameDecoder, FrameError, maxFrameBytes, opcodes, statuses, type Frame } from '../../enclave-origin/protocol/frames.js'
import {
  decodeAttestResponse,
  decodeCreateRequest,
  decodeCreateResponse,
  decodeCredentials,
  decodeEmptyPayload,
  decodeErrorMessage,
  decodeGetRequest,
  decodeGetResponse,
  decodeHealthResponse,
  decodeLoadRequest,
  decodeResealRequest,
  decodeNeedsUnlock,
  decodeLogsRequest,
  decodeLogsResponse,
  encodeLogsRequest,
  encodeLogsResponse,
  decodeSetStateRequest,
  decodeSignRequest,
  decodeSignResponse,
  decodeUnlockRequest,
  decodeGeneratedDataKey,
  decodeUnlockResponse,
  emptyPayload,
  encodeAttestResponse,
  encodeCreateRequest,
  encodeCreateResponse,
  encodeCredentials,
  encodeErrorMessage,
  encodeGetRequest,
  encodeGetResponse,
  encodeHealthResponse,
  encodeLoadRequest,
  encodeResealRequest,
  encodeNeedsUnlock,
  encodeSetStateRequest,
  encodeSignRequest,
  encodeSignResponse,
  encodeUnlockRequest,
  encodeGeneratedDataKey,
  encodeUnlockResponse,
  maxErrorMessageBytes,
} from '../../enclave-origin/protocol/messages.js'
import { seededRandom } from '../support/seededRandom.js'

function filled(length: number, byte: number): Uint8Array {
  return new Uint8Array(length).fill(byte)
}

const digest = filled(32, 0xab)
const publicKey = new Uint8Array(65).map((_, i) => (i === 0 ? 4 : i))
const sealed = new Uint8Array(60).map((_, i) => 255 - i)

/** A frame's declared-length header followed by `rest`, for hand-made malformed frames. */
function rawFrame(declaredLength: number, rest: Uint8Array = new Uint8Array(0)): Uint8Array {
  const bytes = Buffer.alloc(4 + rest.length)
  bytes.writeUInt32BE(declaredLength, 0)
  bytes.set(rest, 4)
  return bytes
}

describe('every message survives encode then decode unchanged', () => {
  it('SIGN request and response', () => {
    expect(decodeSignRequest(encodeSignRequest({ keyId: 'paymaster-7', digest }))).toEqual({ keyId: 'paymaster-7', digest })
    for (const recoveryId of [0, 1]) {
      const response = { signature: filled(64, 0x11), recoveryId, enclaveMicros: 73 }
      expect(decodeSignResponse(encodeSignResponse(response))).toEqual(response)
    }
  })

  it('SIGN request with a multi-byte UTF-8 key id of exactly 128 bytes', () => {
    const keyId = 'é'.repeat(64)
    expect(Buffer.byteLength(keyId)).toBe(128)
    expect(decodeSignRequest(encodeSignRequest({ keyId, digest })).keyId).toBe(keyId)
  })

  it('a key id keeps a leading byte-order mark: it is part of the id', () => {
    expect(decodeGetRequest(encodeGetRequest({ keyId: '\ufeffk' })).keyId).toBe('\ufeffk')
  })

  it('SIGN request is the key id and the digest, nothing else', () => {
    expect(encodeSignRequest({ keyId: 'k', digest })).toEqual(new Uint8Array([1, 0x6b, ...digest]))
  })

  it('CREATE request and response', () => {
    expect(decodeCreateRequest(encodeCreateRequest({ keyId: 'new-key' }))).toEqual({ keyId: 'new-key' })
    const response = { publicKey, sealed, version: 0xfffffffe }
    expect(decodeCreateResponse(encodeCreateResponse(response))).toEqual(response)
  })

  it('LOAD request carries the whole sealed record, in every key state, and its sequence up to 2^53 - 1', () => {
    for (const state of ['active', 'frozen', 'archived'] as const) {
      for (const sequence of [0, 1, 2 ** 32 + 5, Number.MAX_SAFE_INTEGER]) {
        const record = { keyId: 'restored', sequence, version: 3, state, publicKey, sealed }
        expect(decodeLoadRequest(encodeLoadRequest(record))).toEqual(record)
      }
    }
  })

  it('decoded byte fields are copies, not views of the payload: a record kept by the cache or store pins no shared slab', () => {
    const payload = encodeLoadRequest({ keyId: 'kept', sequence: 1, version: 1, state: 'active', publicKey, sealed })
    const decoded = decodeLoadRequest(payload)
    expect(decoded.sealed.buffer).not.toBe(payload.buffer)
    expect(decoded.publicKey.buffer).not.toBe(payload.buffer)
    const unlockAnswer = encodeUnlockResponse({ wrappedDek: sealed, sequenceFloor: 2 ** 32 })
    expect(decodeUnlockResponse(unlockAnswer).wrappedDek.buffer).not.toBe(unlockAnswer.buffer)
    const created = decodeCreateResponse(encodeCreateResponse({ publicKey, sealed, version: 2 }))
    expect(created.sealed.byteOffset).toBe(0)
    expect(created.sealed.buffer.byteLength).toBe(sealed.length)
  })

  it('GET request and response, in every cache state', () => {
    expect(decodeGetRequest(encodeGetRequest({ keyId: 'g' }))).toEqual({ keyId: 'g' })
    for (const cacheState of ['WARM', 'COOL', 'INVALID'] as const) {
      const response = { state: 'frozen' as const, cacheState, publicKey }
      expect(decodeGetResponse(encodeGetResponse(response))).toEqual(response)
    }
  })

  it('SET_STATE request: a key id, a sequence and a state', () => {
    for (const state of ['active', 'frozen', 'archived'] as const) {
      const request = { keyId: 'k1', sequence: 2 ** 40 + 3, state }
      expect(decodeSetStateRequest(encodeSetStateRequest(request))).toEqual(request)
    }
  })

  it('UNLOCK response: the sequence floor of the epoch it opened, then the new wrapped DEK, or nothing', () => {
    const wrappedDek = new Uint8Array(184).map((_, i) => 255 - i)
    expect(decodeUnlockResponse(encodeUnlockResponse({ wrappedDek, sequenceFloor: 2 ** 32 }))).toEqual({ wrappedDek, sequenceFloor: 2 ** 32 })
    const none = { wrappedDek: new Uint8Array(), sequenceFloor: 2 ** 33 }
    expect(encodeUnlockResponse(none)).toHaveLength(8)
    expect(decodeUnlockResponse(encodeUnlockResponse(none))).toEqual(none)
  })

  it('GENERATE_DATA_KEY response: the new wrapped DEK as it is', () => {
    const wrappedDek = new Uint8Array(184).map((_, i) => i)
    expect(decodeGeneratedDataKey(encodeGeneratedDataKey(wrappedDek))).toEqual(wrappedDek)
  })

  it('a sequence the wire cannot carry, or a number could not hold exactly, is refused both ways', () => {
    for (const sequence of [-1, 1.5, 2 ** 53, Number.NaN]) {
      expect(() => encodeSetStateRequest({ keyId: 'k', sequence, state: 'frozen' }), String(sequence)).toThrow(FrameError)
      expect(() => encodeLoadRequest({ keyId: 'k', sequence, version: 1, state: 'active', publicKey, sealed }), String(sequence)).toThrow(FrameError)
    }
    // 2^53 on the wire: above what a number holds exactly, so two sequences could compare equal.
    const tooHigh = Buffer.from(encodeSetStateRequest({ keyId: 'k', sequence: 0, state: 'frozen' }))
    tooHigh.writeUInt32BE(0x200000, 2)
    expect(() => decodeSetStateRequest(tooHigh)).toThrow(/sequence is above 2\^53 - 1/)
    expect(() => decodeUnlockResponse(new Uint8Array(7))).toThrow(FrameError)
  })

  it('UNLOCK request with and without a retiring DEK, a sealed preload identity and a sequence floor', () => {
    const wrappedDek = new Uint8Array(184).map((_, i) => i)
    const retiringWrappedDek = new Uint8Array(184).map((_, i) => 255 - i)
    const sealedPreloadIdentity = new Uint8Array(300).map((_, i) => i * 7)
    expect(decodeUnlockRequest(encodeUnlockRequest({ wrappedDek }))).toEqual({ wrappedDek })
    expect(decodeUnlockRequest(encodeUnlockRequest({ wrappedDek, sealedPreloadIdentity }))).toEqual({ wrappedDek, sealedPreloadIdentity })
    const all = { wrappedDek, retiringWrappedDek, sealedPreloadIdentity, sequenceFloorAtLeast: 2 ** 40 + 1 }
    expect(decodeUnlockRequest(encodeUnlockRequest(all))).toEqual(all)
    expect(() => encodeUnlockRequest({ wrappedDek, sequenceFloorAtLeast: 2 ** 53 })).toThrow(FrameError)
  })

  it('an absent retiring DEK or sealed preload identity is a zero length on the wire, an absent sequence floor a zero', () => {
    const wrappedDek = filled(2, 9)
    const bytes = new Uint8Array([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 9, 9, 0, 0, 0, 0, 0, 0, 0, 0])
    expect(encodeUnlockRequest({ wrappedDek })).toEqual(bytes)
    expect(decodeUnlockRequest(bytes)).toEqual({ wrappedDek })
  })

  it('CREDENTIALS: with and without a session token; both keys required', () => {
    const credentials = { accessKeyId: 'AKIAEXAMPLE', secretAccessKey: 's'.repeat(40) }
    expect(decodeCredentials(encodeCredentials(credentials))).toEqual(credentials)
    const temporary = { ...credentials, sessionToken: 't'.repeat(1_200) }
    expect(decodeCredentials(encodeCredentials(temporary))).toEqual(temporary)
    expect(() => encodeCredentials({ ...credentials, accessKeyId: '' })).toThrow('CREDENTIALS need an access key id and a secret access key')
    expect(() => decodeCredentials(new Uint8Array([0, 0, 0, 1, 120, 0, 0]))).toThrow('CREDENTIALS request: an access key id and a secret access key are required')
    expect(() => decodeCredentials(encodeCredentials(credentials).subarray(0, 20))).toThrow("CREDENTIALS request: secretAccessKey needs 40 bytes, 5 left")
  })

  it('RESEAL request: a key id and the wrapped DEK\u2019s SHA-256', () => {
    const request = { keyId: 'k-9', wrappedDekSha256: filled(32, 4) }
    expect(decodeResealRequest(encodeResealRequest(request))).toEqual(request)
    expect(() => encodeResealRequest({ keyId: 'k', wrappedDekSha256: filled(31, 4) })).toThrow(/RESEAL wrappedDekSha256/)
  })

  it('ATTEST response: the delivery recipient and the document, which may be empty', () => {
    const attestationDocument = new Uint8Array(4500).map((_, i) => i % 251)
    const recipient = 'age1' + 'q'.repeat(58)
    expect(decodeAttestResponse(encodeAttestResponse({ recipient, attestationDocument }))).toEqual({ recipient, attestationDocument })
    expect(decodeAttestResponse(encodeAttestResponse({ recipient, attestationDocument: emptyPayload }))).toEqual({ recipient, attestationDocument: new Uint8Array() })
    const encoded = encodeAttestResponse({ recipient, attestationDocument })
    expect(() => decodeAttestResponse(encoded.subarray(0, encoded.length - 1))).toThrow('ATTEST response: attestationDocument needs 4500 bytes, 4499 left')
  })

  it('HEALTH response is a JSON object', () => {
    const health = { ok: true, keys: 12, dek: { cached: true, ttlMs: 1000 } }
    expect(decodeHealthResponse(encodeHealthResponse(health))).toEqual(health)
  })

  it('empty payloads (HEALTH request; LOAD and SET_STATE answers)', () => {
    expect(emptyPayload.length).toBe(0)
    expect(() => decodeEmptyPayload(emptyPayload, 'LOAD response')).not.toThrow()
    expect(() => decodeEmptyPayload(new Uint8Array([0]), 'LOAD response')).toThrow(FrameError)
  })

  it('LOGS request and response: the instance, the lines after, how many were lost and whether there are more', () => {
    expect(decodeLogsRequest(encodeLogsRequest({ instance: 2 ** 32 - 1, after: 2 ** 40 }))).toEqual({ instance: 2 ** 32 - 1, after: 2 ** 40 })
    const response = { instance: 7, first: 12, skipped: 3, more: true, lines: ['{"event":"a"}', '', 'é ✓'] }
    expect(decodeLogsResponse(encodeLogsResponse(response))).toEqual(response)
    expect(decodeLogsResponse(encodeLogsResponse({ ...response, more: false, lines: [] }))).toEqual({ ...response, more: false, lines: [] })
    expect(() => encodeLogsRequest({ instance: 2 ** 32, after: 0 })).toThrow(FrameError)
    expect(() => encodeLogsResponse({ ...response, lines: ['x'.repeat(0x10000)] })).toThrow(FrameError)
  })

  it('NEEDS_UNLOCK carries the retry delay', () => {
    expect(decodeNeedsUnlock(encodeNeedsUnlock({ retryAfterMs: 250 }))).toEqual({ retryAfterMs: 250 })
  })

  it('error statuses carry a UTF-8 message', () => {
    expect(decodeErrorMessage(encodeErrorMessage('key nope not found'))).toBe('key nope not found')
  })

  it('a long error message is truncated to 512 bytes without splitting a character', () => {
    const message = 'x' + '€'.repeat(300) // 1 + 900 bytes; 512 falls inside a 3-byte character
    const encoded = encodeErrorMessage(message)
    expect(encoded.length).toBe(511)
    expect(decodeErrorMessage(encoded)).toBe(message.slice(0, 1 + 170))
    expect(encodeErrorMessage('y'.repeat(600)).length).toBe(maxErrorMessageBytes)
  })

  it('a frame keeps request id, opcode, status and payload', () => {
    const frame = { requestId: 0xffffffff, opcode: opcodes.SIGN, status: statuses.NEEDS_UNLOCK, payload: encodeNeedsUnlock({ retryAfterMs: 5 }) }
    expect(new FrameDecoder().push(encodeFrame(frame))).toEqual([frame])
  })
})

describe('the frame decoder is independent of how the stream is chunked', () => {
  function sampleFrames(count: number, random: () => number): Frame[] {
    const opcodeValues = Object.values(opcodes)
    const statusValues = Object.values(statuses)
    return Array.from({ length: count }, (_, i) => ({
      requestId: (i * 2654435761) >>> 0,
      opcode: opcodeValues[i % opcodeValues.length]!,
      status: statusValues[i % statusValues.length]!,
      // Mostly small, some empty, some larger than a typical chunk.
      payload: new Uint8Array(i % 97 === 0 ? 3000 : Math.floor(random() * 80)).map(() => Math.floor(random() * 256)),
    }))
  }

  it('1,000 frames fed in random chunks of 1 byte up to several frames decode identically', () => {
    const random = seededRandom(0x5eed)
    const frames = sampleFrames(1000, random)
    const stream = Buffer.concat(frames.map((frame) => encodeFrame(frame)))
    const decoder = new FrameDecoder({ maxFrameBytes })
    const decoded: Frame[] = []
    for (let offset = 0; offset < stream.length; ) {
      const size = random() < 0.3 ? 1 + Math.floor(random() * 4) : 1 + Math.floor(random() * 400)
      decoded.push(...decoder.push(stream.subarray(offset, offset + size)))
      offset += size
    }
    expect(decoded).toEqual(frames)
    expect(decoder.bufferedBytes).toBe(0)
  })

  it('the same stream one byte at a time', () => {
    const frames = sampleFrames(50, seededRandom(7))
    const stream = Buffer.concat(frames.map((frame) => encodeFrame(frame)))
    const decoder = new FrameDecoder()
    const decoded = Array.from(stream).flatMap((byte) => decoder.push(new Uint8Array([byte])))
    expect(decoded).toEqual(frames)
  })

  it('decoded payloads are copies: reusing the chunk buffer does not change them', () => {
    const chunk = Buffer.from(encodeFrame({ requestId: 1, opcode: opcodes.GET, status: 0, payload: encodeGetRequest({ keyId: 'a' }) }))
    const [frame] = new FrameDecoder().push(chunk)
    chunk.fill(0)
    expect(decodeGetRequest(frame!.payload)).toEqual({ keyId: 'a' })
  })

  it('a partial frame is held until the rest arrives', () => {
    const bytes = encodeFrame({ requestId: 9, opcode: opcodes.HEALTH, status: 0, payload: emptyPayload })
    const decoder = new FrameDecoder()
    expect(decoder.push(bytes.subarray(0, 7))).toEqual([])
    expect(decoder.bufferedBytes).toBe(7)
    expect(decoder.push(bytes.subarray(7))).toEqual([{ requestId: 9, opcode: opcodes.HEALTH, status: 0, payload: new Uint8Array(0) }])
  })

  it('100k SIGN frames pushed as one buffer all decode', () => {
    const frames = Array.from({ length: 100_000 }, (_, i) =>
      encodeFrame({ requestId: i, opcode: opcodes.SIGN, status: 0, payload: encodeSignRequest({ keyId: `k${i}`, digest }) }),
    )
    const stream = Buffer.concat(frames)
    expect(stream.length).toBeGreaterThan(4 * 1024 * 1024)
    const decoded = new FrameDecoder().push(stream)
    expect(decoded.length).toBe(100_000)
    expect(decodeSignRequest(decoded[99_999]!.payload)).toEqual({ keyId: 'k99999', digest })
  })
})

describe('bad frame lengths throw FrameError and poison the decoder', () => {
  it('a declared length above the limit throws as soon as the length arrives', () => {
    const decoder = new FrameDecoder({ maxFrameBytes: 1024 })
    expect(() => decoder.push(rawFrame(1025))).toThrow(FrameError)
  })

  it('a length split across chunks is checked once complete', () => {
    const decoder = new FrameDecoder()
    const header = rawFrame(maxFrameBytes + 1)
    expect(decoder.push(header.subarray(0, 2))).toEqual([])
    expect(() => decoder.push(header.subarray(2))).toThrow(/more than the 65536-byte limit/)
  })

  it('a frame of exactly the limit is accepted', () => {
    const payload = filled(1024 - 6, 1)
    const [frame] = new FrameDecoder({ maxFrameBytes: 1024 }).push(encodeFrame({ requestId: 1, opcode: 1, status: 0, payload, maxFrameBytes: 1024 }))
    expect(frame!.payload).toEqual(payload)
  })

  it('a declared length shorter than the 6-byte header throws', () => {
    expect(() => new FrameDecoder().push(rawFrame(5, filled(5, 0)))).toThrow(/shorter than the 6-byte header/)
    expect(() => new FrameDecoder().push(rawFrame(0))).toThrow(FrameError)
  })

  it('after a bad frame the decoder refuses further input', () => {
    const decoder = new FrameDecoder()
    expect(() => decoder.push(rawFrame(2))).toThrow(FrameError)
    const good = encodeFrame({ requestId: 1, opcode: opcodes.HEALTH, status: 0, payload: emptyPayload })
    expect(() => decoder.push(good)).toThrow(FrameError)
  })

  it('a bad frame after good ones in the same chunk still throws, carrying the good ones; the next push carries none', () => {
    const good = encodeFrame({ requestId: 1, opcode: opcodes.HEALTH, status: 0, payload: emptyPayload })
    const decoder = new FrameDecoder()
    const pending = encodeFrame({ requestId: 7, opcode: opcodes.HEALTH, status: 0, payload: emptyPayload })
    // One frame completed from an earlier chunk, one whole, then a bad length.
    expect(decoder.push(pending.subarray(0, 5))).toEqual([])
    const error = (() => {
      try {
        decoder.push(Buffer.concat([pending.subarray(5), good, rawFrame(3)]))
      } catch (thrown) {
        return thrown as FrameError
      }
    })()
    expect(error).toBeInstanceOf(FrameError)
    expect(error!.framesBefore.map((frame) => frame.requestId)).toEqual([7, 1])
    expect(() => decoder.push(good)).toThrow(expect.objectContaining({ name: 'FrameError', framesBefore: [] }))
  })

  it('encodeFrame refuses what a decoder would reject', () => {
    expect(() => encodeFrame({ requestId: 1, opcode: 1, status: 0, payload: filled(maxFrameBytes - 5, 0) })).toThrow(FrameError)
    expect(() => encodeFrame({ requestId: 2 ** 32, opcode: 1, status: 0, payload: emptyPayload })).toThrow(FrameError)
    expect(() => encodeFrame({ requestId: 1, opcode: 256, status: 0, payload: emptyPayload })).toThrow(FrameError)
    expect(() => encodeFrame({ requestId: 1, opcode: 1, status: -1, payload: emptyPayload })).toThrow(FrameError)
  })
})

describe('malformed payloads throw FrameError', () => {
  const validSign = encodeSignRequest({ keyId: 'k', digest })

  it('a 31-byte digest', () => {
    expect(() => decodeSignRequest(validSign.subarray(0, validSign.length - 1))).toThrow(/SIGN request: digest needs 32 bytes, 31 left/)
    expect(() => encodeSignRequest({ keyId: 'k', digest: filled(31, 0) })).toThrow(FrameError)
  })

  it('a key id of 0 bytes', () => {
    expect(() => decodeSignRequest(new Uint8Array([0, ...digest]))).toThrow(/key id is 0 bytes/)
    expect(() => encodeSignRequest({ keyId: '', digest })).toThrow(FrameError)
  })

  it('a key id of 129 bytes', () => {
    expect(() => decodeGetRequest(new Uint8Array([129, ...filled(129, 0x61)]))).toThrow(/key id is 129 bytes/)
    expect(() => encodeGetRequest({ keyId: 'a'.repeat(129) })).toThrow(FrameError)
  })

  it('a key id that is not valid UTF-8, or not well-formed Unicode', () => {
    expect(() => decodeGetRequest(new Uint8Array([2, 0xc3, 0x28]))).toThrow(/not valid UTF-8/)
    expect(() => encodeGetRequest({ keyId: 'lone \ud800' })).toThrow(FrameError)
  })

  it('trailing bytes', () => {
    expect(() => decodeSignRequest(new Uint8Array([...validSign, 0]))).toThrow(/1 trailing bytes/)
    expect(() => decodeNeedsUnlock(new Uint8Array(5))).toThrow(FrameError)
    expect(() => decodeSignResponse(new Uint8Array(70))).toThrow(FrameError)
    const create = encodeCreateResponse({ publicKey, sealed, version: 1 })
    expect(() => decodeCreateResponse(new Uint8Array([...create, 1, 2]))).toThrow(FrameError)
  })

  it('a sealed blob of any length but the 60 bytes a sealed key is, both ways', () => {
    const valid = encodeLoadRequest({ keyId: 'r', sequence: 1, version: 1, state: 'active', publicKey, sealed })
    for (const length of [0, 59, 61]) {
      const load = Buffer.concat([valid.subarray(0, valid.length - sealed.length), filled(length, 7)])
      load.writeUInt32BE(length, valid.length - sealed.length - 4)
      expect(() => decodeLoadRequest(load), `${length} bytes`).toThrow(new FrameError(`LOAD request: sealed is ${length} bytes, expected 60`))
      expect(() => encodeLoadRequest({ keyId: 'r', sequence: 1, version: 1, state: 'active', publicKey, sealed: filled(length, 7) })).toThrow(FrameError)
    }
  })

  it('a sealed blob whose length runs past the payload', () => {
    const load = Buffer.from(encodeLoadRequest({ keyId: 'r', sequence: 1, version: 1, state: 'active', publicKey, sealed }))
    load.writeUInt32BE(sealed.length + 1, load.length - sealed.length - 4)
    expect(() => decodeLoadRequest(load)).toThrow(/sealed needs 61 bytes, 60 left/)
  })

  it('a bad enum value', () => {
    expect(() => decodeSetStateRequest(new Uint8Array([1, 0x6b, 0, 0, 0, 0, 0, 0, 0, 1, 3]))).toThrow(/key state 3/)
    const get = encodeGetResponse({ state: 'active', cacheState: 'WARM', publicKey })
    expect(() => decodeGetResponse(new Uint8Array([0, 3, ...get.subarray(2)]))).toThrow(/cache state 3/)
    expect(() => decodeSignResponse(new Uint8Array([...filled(64, 1), 2, 0, 0, 0, 0]))).toThrow(/recoveryId 2/)
    expect(() => encodeSetStateRequest({ keyId: 'k', sequence: 1, state: 'deleted' as never })).toThrow(FrameError)
  })

  it('a health body that is not a JSON object', () => {
    expect(() => decodeHealthResponse(Buffer.from('{"ok":'))).toThrow(/not JSON/)
    expect(() => decodeHealthResponse(Buffer.from('[1]'))).toThrow(/not a JSON object/)
  })

  it('an error message longer than 512 bytes', () => {
    expect(() => decodeErrorMessage(filled(513, 0x61))).toThrow(FrameError)
  })
})

describe('every message decoder, fed each truncation and each single-byte change of a valid payload', () => {
  const bytes = (length: number, from = 1) => Uint8Array.from({ length }, (_, i) => (from + i) & 0xff)
  const valid: Array<[string, (payload: Uint8Array) => unknown, Uint8Array]> = [
    ['SIGN request', decodeSignRequest, encodeSignRequest({ keyId: 'key-é', digest: bytes(32) })],
    ['SIGN response', decodeSignResponse, encodeSignResponse({ signature: bytes(64), recoveryId: 1, enclaveMicros: 123_456 })],
    ['CREATE request', decodeCreateRequest, encodeCreateRequest({ keyId: 'k1' })],
    ['CREATE response', decodeCreateResponse, encodeCreateResponse({ publicKey: bytes(65), sealed: bytes(60), version: 3 })],
    ['RESEAL request', decodeResealRequest, encodeResealRequest({ keyId: 'k1', wrappedDekSha256: bytes(32) })],
    ['LOAD request', decodeLoadRequest, encodeLoadRequest({ keyId: 'k1', version: 2, state: 'frozen', publicKey: bytes(65), sealed: bytes(60), sequence: 2 ** 40 })],
    ['GET request', decodeGetRequest, encodeGetRequest({ keyId: 'k1' })],
    ['GET response', decodeGetResponse, encodeGetResponse({ state: 'active', cacheState: 'COOL', publicKey: bytes(65) })],
    ['SET_STATE request', decodeSetStateRequest, encodeSetStateRequest({ keyId: 'k1', state: 'archived', sequence: 7 })],
    ['UNLOCK request', decodeUnlockRequest, encodeUnlockRequest({ wrappedDek: bytes(40), retiringWrappedDek: bytes(12), sealedPreloadIdentity: bytes(9), sequenceFloorAtLeast: 5 })],
    ['UNLOCK response', decodeUnlockResponse, encodeUnlockResponse({ wrappedDek: bytes(40), sequenceFloor: 2 ** 32 })],
    ['GENERATE_DATA_KEY response', decodeGeneratedDataKey, encodeGeneratedDataKey(bytes(40))],
    ['ATTEST response', decodeAttestResponse, encodeAttestResponse({ recipient: 'age1recipient', attestationDocument: bytes(30) })],
    ['CREDENTIALS request', decodeCredentials, encodeCredentials({ accessKeyId: 'AKID', secretAccessKey: 'secret', sessionToken: 'token' })],
    ['HEALTH response', decodeHealthResponse, encodeHealthResponse({ cacheStates: { WARM: 1 }, engine: { threads: 2 } })],
    ['NEEDS_UNLOCK answer', decodeNeedsUnlock, encodeNeedsUnlock({ retryAfterMs: 150 })],
    ['LOGS request', decodeLogsRequest, encodeLogsRequest({ instance: 9, after: 2 ** 33 })],
    ['LOGS response', decodeLogsResponse, encodeLogsResponse({ instance: 9, first: 5, skipped: 1, more: true, lines: ['{"event":"é"}', 'two'] })],
    ['error answer', decodeErrorMessage, encodeErrorMessage('no key k1 ✓')],
  ]
  it.each(valid)('%s: decodes, or throws a FrameError, and nothing else', (_, decode, payload) => {
    expect(() => decode(payload)).not.toThrow()
    const variants: Uint8Array[] = []
    for (let length = 0; length < payload.length; length++) variants.push(payload.slice(0, length))
    for (let at = 0; at < payload.length; at++) {
      for (const change of [0x01, 0x80, 0xff]) {
        const changed = payload.slice()
        changed[at]! ^= change
        variants.push(changed)
      }
    }
    variants.push(Uint8Array.from([...payload, 0]), Uint8Array.from([...payload, ...payload]))
    for (const variant of variants) {
      try {
        decode(variant)
      } catch (error) {
        expect(error, `${Buffer.from(variant).toString('hex')}: ${String(error)}`).toBeInstanceOf(FrameError)
      }
    }
  })
})

