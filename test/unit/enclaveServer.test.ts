import { createHash, randomBytes } from 'node:crypto'
import { connect, createServer, type Socket } from 'node:net'
import { Encrypter } from 'age-encryption'
import { afterAll, beforeAll, expect, it } from 'vitest'
import { keccak256, toHex } from 'viem'
import { developmentAttestation, type KmsDataKeys } from '../../enclave-origin/enclave/dataKey.js'
import { DeliveredCredentials } from '../../enclave-origin/enclave/deliveredCredentials.js'
import { SignEngine } from '../../enclave-origin/enclave/engine.js'
import { KeyCache } from '../../enclave-origin/enclave/keyCache.js'
import { EnclaveService, serveEnclave } from '../../enclave-origin/enclave/server.js'
import type { BlobStore } from '../../enclave-origin/parent/blobStore.js'
import { OriginParent } from '../../enclave-origin/parent/origin.js'
import { encodeFrame, FrameDecoder, opcodes, statuses, type Frame } from '../../enclave-origin/protocol/frames.js'
import {
  decodeAttestResponse,
  decodeCreateResponse,
  decodeErrorMessage,
  encodeCreateRequest,
  encodeResealRequest,
  encodeSignRequest,
  encodeUnlockRequest,
} from '../../enclave-origin/protocol/messages.js'
import { generatePreloadIdentity } from '../../enclave-origin/preloadFiles.js'

/** The enclave's server over TCP: one bad connection is closed and harms no other. */

const dek = crypto.getRandomValues(new Uint8Array(32))
// Data keys come from KMS in production; this service has its DEK set directly, so KMS is never asked.
const noKms = { generate: () => Promise.reject(new Error('no KMS here')), unwrap: () => Promise.reject(new Error('no KMS here')) } as unknown as KmsDataKeys

let engine: SignEngine
let close: () => Promise<void>
const port = 18671

/** A key cache that never unlocks on its own, and an enclave service over it with these data keys (and options). */
function enclaveWith(dataKeys: KmsDataKeys, options: { preloadFile?: string } = {}) {
  const cache = new KeyCache({ now: Date.now, unlock: () => Promise.reject(new Error('no unlock in this test')) })
  const service = new EnclaveService({ cache, engine, dataKeys, kmsKeyId: 'test', credentials: new DeliveredCredentials(), attestation: developmentAttestation, ...options })
  return { cache, service }
}

beforeAll(async () => {
  engine = new SignEngine({ threads: 1 })
  await engine.start()
  const { cache, service } = enclaveWith(noKms)
  cache.setDek(new Uint8Array(dek))
  ;({ close } = await serveEnclave({ service, address: { host: '127.0.0.1', port }, log: () => {} }))
})

afterAll(async () => {
  await close()
  await engine.stop()
})

function client() {
  const socket = connect(port, '127.0.0.1')
  const decoder = new FrameDecoder()
  const frames: Frame[] = []
  socket.on('data', (chunk: Uint8Array) => frames.push(...decoder.push(chunk)))
  const closed = new Promise<void>((resolve) => socket.once('close', () => resolve()))
  const request = async (frame: Omit<Frame, 'status'>) => {
    socket.write(encodeFrame({ ...frame, status: 0 }))
    for (let i = 0; i < 200 && !frames.some((f) => f.requestId === frame.requestId); i++) await new Promise((r) => setTimeout(r, 5))
    return frames.find((f) => f.requestId === frame.requestId)
  }
  return { socket: socket as Socket, closed, request }
}

it('an oversized frame closes that connection only; others keep being served', async () => {
  const good = client()
  const bad = client()
  const created = await good.request({ requestId: 1, opcode: opcodes.CREATE, payload: encodeCreateRequest({ keyId: 'k1' }) })
  expect(created?.status).toBe(statuses.OK)
  expect(decodeCreateResponse(created!.payload).publicKey).toHaveLength(65)

  const oversized = new Uint8Array(8)
  new DataView(oversized.buffer).setUint32(0, 10 * 1024 * 1024)
  bad.socket.write(oversized)
  await bad.closed

  const signed = await good.request({ requestId: 2, opcode: opcodes.SIGN, payload: encodeSignRequest({ keyId: 'k1', digest: new Uint8Array(32).fill(7) }) })
  expect(signed?.status).toBe(statuses.OK)
  good.socket.destroy()
})

it('a malformed payload is answered BAD_REQUEST on a connection that stays open; an unknown key NOT_FOUND', async () => {
  const { socket, request } = client()
  const malformed = await request({ requestId: 10, opcode: opcodes.SIGN, payload: new Uint8Array([3, 1, 2]) })
  expect(malformed?.status).toBe(statuses.BAD_REQUEST)
  const unknown = await request({ requestId: 11, opcode: opcodes.SIGN, payload: encodeSignRequest({ keyId: 'nobody', digest: new Uint8Array(32) }) })
  expect(unknown?.status).toBe(statuses.NOT_FOUND)
  const unknownOpcode = await request({ requestId: 12, opcode: 99, payload: new Uint8Array() })
  expect(unknownOpcode?.status).toBe(statuses.BAD_REQUEST)
  socket.destroy()
})

it('pipelines many requests on one connection and answers each by its request id', async () => {
  const { socket, request } = client()
  await request({ requestId: 20, opcode: opcodes.CREATE, payload: encodeCreateRequest({ keyId: 'k2' }) })
  const digests = Array.from({ length: 200 }, (_, i) => keccak256(toHex(`pipelined ${i}`)))
  const answers = await Promise.all(
    digests.map((digest, i) => request({ requestId: 100 + i, opcode: opcodes.SIGN, payload: encodeSignRequest({ keyId: 'k2', digest: Uint8Array.from(Buffer.from(digest.slice(2), 'hex')) }) })),
  )
  expect(answers.every((answer) => answer?.status === statuses.OK)).toBe(true)
  socket.destroy()
})

it('an UNLOCK whose retiring DEK does not unwrap installs neither, and zeroes the one that did', async () => {
  const unwrapped = new Uint8Array(32).fill(7)
  const halfKms = {
    unwrap: ({ ciphertext }: { ciphertext: Uint8Array }) => (ciphertext[0] === 1 ? Promise.resolve(unwrapped) : Promise.reject(new Error('KMS refused the retiring DEK'))),
  } as unknown as KmsDataKeys
  const { cache, service } = enclaveWith(halfKms)
  const unlock = { requestId: 1, opcode: opcodes.UNLOCK, status: 0, payload: encodeUnlockRequest({ wrappedDek: Uint8Array.of(1), retiringWrappedDek: Uint8Array.of(2) }) }
  await expect(service.handle(unlock)).rejects.toThrow('KMS refused the retiring DEK')
  expect(unwrapped).toEqual(new Uint8Array(32))
  cache.load({ keyId: 'k', version: 1, state: 'active', publicKey: new Uint8Array(65), sealed: new Uint8Array(60) })
  expect(cache.get('k')?.cacheState).toBe('INVALID')
})

it('RESEAL seals only under the DEK the rotation names: under any other it answers NEEDS_UNLOCK', async () => {
  const kmsDek = new Uint8Array(randomBytes(32))
  const fakeKms = { unwrap: async () => new Uint8Array(kmsDek) } as unknown as KmsDataKeys
  const { service } = enclaveWith(fakeKms)
  const wrappedDek = Uint8Array.of(5, 6, 7)
  expect((await service.handle({ requestId: 1, opcode: opcodes.UNLOCK, status: 0, payload: encodeUnlockRequest({ wrappedDek }) })).status).toBe(statuses.OK)
  await service.handle({ requestId: 2, opcode: opcodes.CREATE, status: 0, payload: encodeCreateRequest({ keyId: 'r' }) })
  const reseal = (wrappedDekSha256: Uint8Array) => service.handle({ requestId: 3, opcode: opcodes.RESEAL, status: 0, payload: encodeResealRequest({ keyId: 'r', wrappedDekSha256 }) })
  expect((await reseal(createHash('sha256').update(Uint8Array.of(9)).digest())).status).toBe(statuses.NEEDS_UNLOCK)
  const answer = await reseal(createHash('sha256').update(wrappedDek).digest())
  expect(answer.status).toBe(statuses.OK)
  expect(decodeCreateResponse(answer.payload).version).toBe(2)
})

it('UNLOCKs run one at a time, and at most one waits: a later one takes its place, keeping its preload identity', async () => {
  const seen: number[] = []
  let release: () => void = () => {}
  const gate = new Promise<void>((resolve) => (release = resolve))
  const slowKms = {
    unwrap: async ({ ciphertext }: { ciphertext: Uint8Array }) => {
      seen.push(ciphertext[0]!)
      await gate
      return new Uint8Array(32).fill(ciphertext[0]!)
    },
  } as unknown as KmsDataKeys
  const { service } = enclaveWith(slowKms)
  const unlock = (first: number, sealedPreloadIdentity?: Uint8Array) =>
    service.handle({ requestId: first, opcode: opcodes.UNLOCK, status: 0, payload: encodeUnlockRequest({ wrappedDek: Uint8Array.of(first), sealedPreloadIdentity }) })
  const unlockEmpty = () => service.handle({ requestId: 99, opcode: opcodes.UNLOCK, status: 0, payload: encodeUnlockRequest({ wrappedDek: new Uint8Array() }) })
  const running = unlock(1)
  // Waits behind the first; the next replaces its DEK but keeps its preload identity (this enclave has no preload file: BAD_REQUEST tells).
  const waiting = unlock(2, Uint8Array.of(9))
  const later = unlock(3)
  await new Promise((resolve) => setTimeout(resolve, 20))
  expect(seen).toEqual([1])
  // One that makes a data key is not merged with the one waiting: refused.
  const bootstrap = await unlockEmpty()
  expect([bootstrap.status, decodeErrorMessage(bootstrap.payload)]).toEqual([statuses.UNAVAILABLE, 'another UNLOCK is waiting, and one that makes a data key cannot be merged with it; retry'])
  release()
  expect((await running).status).toBe(statuses.OK)
  const answers = await Promise.all([waiting, later])
  expect(answers.map((answer) => answer.status)).toEqual([statuses.BAD_REQUEST, statuses.BAD_REQUEST])
  expect(seen).toEqual([1])
  // And the DEK of a plain UNLOCK that replaced a waiting one is the later one's.
  const plainRunning = unlock(4)
  const plainWaiting = unlock(5)
  const plainLater = unlock(6)
  await Promise.all([plainRunning, plainWaiting, plainLater])
  expect(seen).toEqual([1, 4, 6])
})

it('the parent waits longer for an UNLOCK, which waits on KMS, than for other requests', async () => {
  const slowKms = { unwrap: () => new Promise((resolve) => setTimeout(() => resolve(new Uint8Array(32).fill(3)), 400)) } as unknown as KmsDataKeys
  const { service } = enclaveWith(slowKms)
  const slowPort = 18672
  const served = await serveEnclave({ service, address: { host: '127.0.0.1', port: slowPort }, log: () => {} })
  const store = { getWrappedDek: async () => ({ keyId: 'k', ciphertext: Uint8Array.of(1) }) } as unknown as BlobStore
  const parentWith = (kmsRequestTimeoutMs: number) =>
    new OriginParent({
      enclaves: [{ id: 'slow', address: { host: '127.0.0.1', port: slowPort } }],
      poolSize: 1,
      store,
      requestTimeoutMs: 200,
      kmsRequestTimeoutMs,
      credentials: async () => ({ accessKeyId: 'AKIDTEST', secretAccessKey: 'test-secret' }),
    })
  const patient = parentWith(2_000)
  const hasty = parentWith(200)
  try {
    await patient.unlock()
    await expect(hasty.unlock()).rejects.toThrow('the enclave did not answer within 200 ms')
  } finally {
    patient.close()
    hasty.close()
    await served.close()
  }
})

it('a preload that fails is the answer, but leaves the data key of the same UNLOCK installed', async () => {
  const fakeKms = { unwrap: async () => new Uint8Array(32).fill(4) } as unknown as KmsDataKeys
  const { cache, service } = enclaveWith(fakeKms, { preloadFile: '/nonexistent/shares.age' })
  const attested = await service.handle({ requestId: 1, opcode: opcodes.ATTEST, status: 0, payload: new Uint8Array() })
  const encrypter = new Encrypter()
  encrypter.addRecipient(decodeAttestResponse(attested.payload).recipient)
  const sealedPreloadIdentity = await encrypter.encrypt((await generatePreloadIdentity()).identity)
  const answer = await service.handle({ requestId: 2, opcode: opcodes.UNLOCK, status: 0, payload: encodeUnlockRequest({ wrappedDek: Uint8Array.of(1), sealedPreloadIdentity }) })
  expect(answer.status).toBe(statuses.BAD_REQUEST)
  expect(decodeErrorMessage(answer.payload)).toBe('preload failed: cannot read the preload file /nonexistent/shares.age: ENOENT')
  cache.load({ keyId: 'k', version: 1, state: 'active', publicKey: new Uint8Array(65), sealed: new Uint8Array(60) })
  expect(cache.get('k')?.cacheState).toBe('COOL')
})

it('a parent refuses to store an empty wrapped DEK from a bootstrap UNLOCK', async () => {
  // An enclave stand-in that answers every request OK with nothing.
  const port = 18673
  const sockets = new Set<Socket>()
  const blank = createServer((socket) => {
    sockets.add(socket)
    const decoder = new FrameDecoder()
    socket.on('data', (chunk: Uint8Array) => {
      for (const frame of decoder.push(chunk)) socket.write(encodeFrame({ ...frame, status: statuses.OK, payload: new Uint8Array() }))
    })
  })
  await new Promise<void>((resolve) => blank.listen(port, '127.0.0.1', resolve))
  let stored = false
  const store = { getWrappedDek: async () => undefined, putWrappedDek: async () => void (stored = true) } as unknown as BlobStore
  const parent = new OriginParent({
    enclaves: [{ id: 'blank', address: { host: '127.0.0.1', port } }],
    poolSize: 1,
    store,
    requestTimeoutMs: 1_000,
    credentials: async () => ({ accessKeyId: 'AKIDTEST', secretAccessKey: 'test-secret' }),
  })
  try {
    await expect(parent.start()).rejects.toThrow('the enclave made no data key: its answer carries no wrapped DEK')
    expect(stored).toBe(false)
  } finally {
    parent.close()
    for (const socket of sockets) socket.destroy()
    await new Promise((resolve) => blank.close(resolve))
  }
})
