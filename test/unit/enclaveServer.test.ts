import { createHash, randomBytes } from 'node:crypto'
import { once } from 'node:events'
import { connect, createServer, type AddressInfo, type Socket } from 'node:net'
import { Encrypter } from 'age-encryption'
import { afterAll, beforeAll, expect, it } from 'vitest'
import { keccak256, toHex } from 'viem'
import { developmentAttestation, type AttestationProvider, type KmsDataKeys } from '../../enclave-origin/enclave/dataKey.js'
import { DeliveredCredentials } from '../../enclave-origin/enclave/deliveredCredentials.js'
import { SignEngine } from '../../enclave-origin/enclave/engine.js'
import { KeyCache, type KeyCacheAuditEvent } from '../../enclave-origin/enclave/keyCache.js'
import { LogRing } from '../../enclave-origin/enclave/logRing.js'
import { secp256k1 } from '../../enclave-origin/enclave/nativeSecp256k1.js'
import { sealPrivateKey } from '../../enclave-origin/enclave/sealing.js'
import { EnclaveService, serveEnclave } from '../../enclave-origin/enclave/server.js'
import type { BlobStore } from '../../enclave-origin/parent/blobStore.js'
import { OriginParent } from '../../enclave-origin/parent/origin.js'
import { connectionRequestId, encodeFrame, FrameDecoder, maxFrameBytes, opcodes, statuses, type Frame } from '../../enclave-origin/protocol/frames.js'
import {
  decodeAttestResponse,
  decodeCreateResponse,
  decodeErrorMessage,
  decodeGetResponse,
  decodeLogsResponse,
  decodeNeedsUnlock,
  decodeSignResponse,
  decodeUnlockResponse,
  encodeCreateRequest,
  encodeGetRequest,
  encodeLoadRequest,
  encodeLogsRequest,
  encodeResealRequest,
  encodeSetStateRequest,
  encodeSignRequest,
  encodeUnlockRequest,
  encodeUnlockResponse,
} from '../../enclave-origin/protocol/messages.js'
import { generatePreloadIdentity } from '../../enclave-origin/preloadFiles.js'
import { freePort } from '../support/localHttp.js'
import { seededRandom } from '../support/seededRandom.js'
import type { SealedKeyRecord } from '../../enclave-origin/types.js'

/** The enclave's server over TCP: one bad connection is closed and harms no other. */

const dek = crypto.getRandomValues(new Uint8Array(32))
// Data keys come from KMS in production; this service has its DEK set directly, so KMS is never asked.
const noKms = { generate: () => Promise.reject(new Error('no KMS here')), unwrap: () => Promise.reject(new Error('no KMS here')) } as unknown as KmsDataKeys

let engine: SignEngine
let close: () => Promise<void>
/** The sequence epoch the shared enclave opened. */
let sharedFloor: number
const port = 18671

/** A key cache that never unlocks on its own, and an enclave service over it with these data keys (and options). */
function enclaveWith(
  dataKeys: KmsDataKeys,
  { preloadFile, attestation = developmentAttestation, retryAfterMs }: { preloadFile?: string; attestation?: AttestationProvider; retryAfterMs?: { min: number; max: number } } = {},
) {
  const cache = new KeyCache({ now: Date.now, unlock: () => Promise.reject(new Error('no unlock in this test')), retryAfterMs })
  const service = new EnclaveService({ cache, engine, dataKeys, kmsKeyId: 'test', credentials: new DeliveredCredentials(), attestation, preloadFile })
  return { cache, service }
}

beforeAll(async () => {
  engine = new SignEngine({ threads: 1 })
  await engine.start()
  const { cache, service } = enclaveWith(noKms)
  cache.setDek(new Uint8Array(dek))
  // As an UNLOCK would: this enclave's DEK is set directly, and KMS never asked.
  sharedFloor = cache.openSequenceEpoch()
  ;({ close } = await serveEnclave({ service, address: { host: '127.0.0.1', port }, log: () => {} }))
})

afterAll(async () => {
  await close()
  await engine.stop()
})

/** An enclave service with its data key set and an epoch of sequences open (as after an UNLOCK), and a way to send it requests. */
function unlockedEnclave() {
  const { cache, service } = enclaveWith(noKms)
  cache.setDek(new Uint8Array(dek))
  const floor = cache.openSequenceEpoch()
  let requestId = 0
  const call = (opcode: number, payload: Uint8Array) => service.handle({ requestId: ++requestId, opcode, status: 0, payload })
  return { cache, floor, call }
}

/** Loads a record as the parent does after an UNLOCK: in the epoch of sequences that opened (the UNLOCK itself is not the subject). */
function loadInNewEpoch(cache: KeyCache, record: SealedKeyRecord): void {
  expect(cache.load(record, cache.openSequenceEpoch())).toEqual({ kind: 'applied' })
}

function client(at = port) {
  const socket = connect(at, '127.0.0.1')
  const decoder = new FrameDecoder()
  const frames: Frame[] = []
  socket.on('data', (chunk: Uint8Array) => frames.push(...decoder.push(chunk)))
  const closed = new Promise<void>((resolve) => socket.once('close', () => resolve()))
  const request = async (frame: Omit<Frame, 'status'> & { status?: number }, waitMs = 1_000) => {
    socket.write(encodeFrame({ status: 0, ...frame }))
    const until = performance.now() + waitMs
    while (performance.now() < until && !frames.some((f) => f.requestId === frame.requestId)) await new Promise((r) => setTimeout(r, 5))
    return frames.find((f) => f.requestId === frame.requestId)
  }
  return { socket: socket as Socket, closed, request, frames }
}

it('an oversized frame, or a request numbered 0, closes that connection only, after a last frame that says why; others keep being served', async () => {
  const good = client()
  const bad = client()
  const created = await good.request({ requestId: 1, opcode: opcodes.CREATE, payload: encodeCreateRequest({ keyId: 'k1' }) })
  expect(created?.status).toBe(statuses.OK)
  expect(decodeCreateResponse(created!.payload).publicKey).toHaveLength(65)

  const oversized = new Uint8Array(8)
  new DataView(oversized.buffer).setUint32(0, 10 * 1024 * 1024)
  bad.socket.write(oversized)
  await bad.closed
  expect(bad.frames).toHaveLength(1)
  expect(bad.frames[0]).toMatchObject({ requestId: connectionRequestId, opcode: 0, status: statuses.BAD_REQUEST })
  expect(decodeErrorMessage(bad.frames[0]!.payload)).toBe(`frame declares ${10 * 1024 * 1024} bytes, more than the ${maxFrameBytes}-byte limit`)

  // A request numbered 0, the connection's own id, is refused the same way, unanswered.
  const reserved = client()
  reserved.socket.write(encodeFrame({ requestId: connectionRequestId, opcode: opcodes.HEALTH, status: 0, payload: new Uint8Array() }))
  await reserved.closed
  expect(reserved.frames.map((frame) => [frame.requestId, frame.opcode, frame.status, decodeErrorMessage(frame.payload)])).toEqual([
    [connectionRequestId, 0, statuses.BAD_REQUEST, `request id ${connectionRequestId} is reserved for the connection`],
  ])

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
  loadInNewEpoch(cache, { keyId: 'k', version: 1, state: 'active', publicKey: new Uint8Array(65), sealed: new Uint8Array(60) })
  expect(cache.get('k')?.cacheState).toBe('INVALID')
})

it('a LOAD or SET_STATE applies only in the epoch of sequences the last UNLOCK opened (else NEEDS_UNLOCK) and above the last its key took (else STALE), changing nothing otherwise', async () => {
  const fakeKms = { unwrap: async () => new Uint8Array(dek) } as unknown as KmsDataKeys
  const { cache, service } = enclaveWith(fakeKms)
  cache.setDek(new Uint8Array(dek))
  let requestId = 0
  const call = (opcode: number, payload: Uint8Array) => service.handle({ requestId: ++requestId, opcode, status: 0, payload })
  const setState = (state: 'active' | 'frozen', sequence: number) => call(opcodes.SET_STATE, encodeSetStateRequest({ keyId: 'sq', state, sequence }))
  const unlock = async () => decodeUnlockResponse((await call(opcodes.UNLOCK, encodeUnlockRequest({ wrappedDek: Uint8Array.of(1) }))).payload)
  const sign = async () => (await call(opcodes.SIGN, encodeSignRequest({ keyId: 'sq', digest: new Uint8Array(32) }))).status
  const expectStale = (answer: { status: number; payload: Uint8Array }, reason: string) => {
    expect(answer.status).toBe(statuses.STALE)
    expect(decodeErrorMessage(answer.payload)).toBe(reason)
  }
  const created = decodeCreateResponse((await call(opcodes.CREATE, encodeCreateRequest({ keyId: 'sq' }))).payload)
  const load = (sequence: number) => call(opcodes.LOAD, encodeLoadRequest({ keyId: 'sq', sequence, state: 'active', ...created }))
  // None before the first UNLOCK, which the parent must send: a restarted enclave has opened no epoch.
  expect((await setState('frozen', 1)).status).toBe(statuses.NEEDS_UNLOCK)

  const first = await unlock()
  expect(first).toEqual({ sequenceFloor: 2 ** 32, wrappedDek: new Uint8Array() })
  const floor = first.sequenceFloor
  expect((await setState('frozen', floor + 10)).status).toBe(statuses.OK)
  // The unfreeze and a reload sent before the freeze, landing after it.
  expectStale(await setState('active', floor + 9), `key sq has taken sequence ${floor + 10} already`)
  expectStale(await load(floor + 10), `key sq has taken sequence ${floor + 10} already`)
  expect(await sign()).toBe(statuses.NOT_ACTIVE)

  // A later UNLOCK closes that epoch: its requests still on their way, however numbered, change nothing.
  const next = (await unlock()).sequenceFloor
  expect(next).toBe(floor + 2 ** 32)
  expect((await setState('active', floor + 11)).status).toBe(statuses.NEEDS_UNLOCK)
  expect((await load(next + 2 ** 32)).status).toBe(statuses.NEEDS_UNLOCK)
  expect(await sign()).toBe(statuses.NOT_ACTIVE)
  expect((await setState('active', next)).status).toBe(statuses.OK)
  expect(await sign()).toBe(statuses.OK)
})

it('once a freeze is answered, no signature of that key leaves, though some were waiting to be signed when it came', async () => {
  const { floor, call } = unlockedEnclave()
  expect((await call(opcodes.CREATE, encodeCreateRequest({ keyId: 'fr' }))).status).toBe(statuses.OK)
  const answered: string[] = []
  // One turn: the signs wait in the engine's batch or its thread when the freeze is applied.
  const signs = Array.from({ length: 40 }, (_, i) =>
    call(opcodes.SIGN, encodeSignRequest({ keyId: 'fr', digest: new Uint8Array(32).fill(i) })).then((answer) => answered.push(answer.status === statuses.OK ? 'signed' : 'refused')),
  )
  const freeze = call(opcodes.SET_STATE, encodeSetStateRequest({ keyId: 'fr', state: 'frozen', sequence: floor + 1 })).then((answer) => answered.push(`freeze ${answer.status}`))
  await Promise.all([...signs, freeze])
  const frozenAt = answered.indexOf(`freeze ${statuses.OK}`)
  expect(frozenAt).toBeGreaterThanOrEqual(0)
  expect(answered.slice(frozenAt + 1)).not.toContain('signed')
  expect(answered.filter((answer) => answer === 'refused').length).toBeGreaterThan(0)
})

it('a signature made while its key was frozen does not leave, though an unfreeze came before it did', async () => {
  const { floor, call } = unlockedEnclave()
  expect((await call(opcodes.CREATE, encodeCreateRequest({ keyId: 'fu' }))).status).toBe(statuses.OK)
  // One turn: the sign waits in the engine while the key is frozen and made active again.
  const sign = call(opcodes.SIGN, encodeSignRequest({ keyId: 'fu', digest: new Uint8Array(32).fill(9) }))
  const changes = [
    call(opcodes.SET_STATE, encodeSetStateRequest({ keyId: 'fu', state: 'frozen', sequence: floor + 1 })),
    call(opcodes.SET_STATE, encodeSetStateRequest({ keyId: 'fu', state: 'active', sequence: floor + 2 })),
  ]
  expect((await Promise.all(changes)).map((answer) => answer.status)).toEqual([statuses.OK, statuses.OK])
  const answer = await sign
  expect({ status: answer.status, error: decodeErrorMessage(answer.payload) }).toEqual({ status: statuses.NOT_ACTIVE, error: 'key fu was frozen or archived while this signature was made' })
  // Signed after the unfreeze, it leaves.
  expect((await call(opcodes.SIGN, encodeSignRequest({ keyId: 'fu', digest: new Uint8Array(32).fill(9) }))).status).toBe(statuses.OK)
})

it('counts a grace signature once it leaves, and gives back the place of one a freeze stopped', async () => {
  let now = Date.now()
  const audits: KeyCacheAuditEvent[] = []
  const minute = 60_000
  const cache = new KeyCache({ now: () => now, unlock: () => Promise.reject(new Error('KMS is down')), graceSignatures: 2, dekSoftTtlMs: 16 * minute, dekHardTtlMs: 16 * minute, audit: (event) => audits.push(event) })
  const service = new EnclaveService({ cache, engine, dataKeys: noKms, kmsKeyId: 'test', credentials: new DeliveredCredentials(), attestation: developmentAttestation })
  cache.setDek(new Uint8Array(dek))
  const floor = cache.openSequenceEpoch()
  let requestId = 0
  const call = (opcode: number, payload: Uint8Array) => service.handle({ requestId: ++requestId, opcode, status: 0, payload })
  const sign = () => call(opcodes.SIGN, encodeSignRequest({ keyId: 'g', digest: new Uint8Array(32).fill(7) }))
  expect((await call(opcodes.CREATE, encodeCreateRequest({ keyId: 'g' }))).status).toBe(statuses.OK)
  now += 14 * minute
  expect((await sign()).status).toBe(statuses.OK)
  // Past the key's hard TTL and the DEK's, with KMS down: a hot key signs on grace.
  now += 3 * minute
  expect((await sign()).status).toBe(statuses.OK)
  expect(cache.stats().graceSignatures).toBe(1)
  // One turn: the freeze lands while the grace signature is being made.
  const stopped = sign()
  expect((await call(opcodes.SET_STATE, encodeSetStateRequest({ keyId: 'g', state: 'frozen', sequence: floor + 1 }))).status).toBe(statuses.OK)
  expect((await stopped).status).toBe(statuses.NOT_ACTIVE)
  expect(cache.stats().graceSignatures).toBe(1)
  expect(audits.map((event) => event.type)).toEqual(['grace-signature', 'grace-signature', 'grace-signature-withdrawn'])
})

it('an archived key stays archived: a SET_STATE or LOAD that would make it active again is refused NOT_ACTIVE', async () => {
  const { cache, floor, call } = unlockedEnclave()
  const created = decodeCreateResponse((await call(opcodes.CREATE, encodeCreateRequest({ keyId: 'ar' }))).payload)
  expect((await call(opcodes.SET_STATE, encodeSetStateRequest({ keyId: 'ar', state: 'archived', sequence: floor + 1 }))).status).toBe(statuses.OK)
  for (const revive of [
    call(opcodes.SET_STATE, encodeSetStateRequest({ keyId: 'ar', state: 'active', sequence: floor + 2 })),
    call(opcodes.SET_STATE, encodeSetStateRequest({ keyId: 'ar', state: 'frozen', sequence: floor + 3 })),
    call(opcodes.LOAD, encodeLoadRequest({ keyId: 'ar', sequence: floor + 4, state: 'active', ...created })),
  ]) {
    const answer = await revive
    expect(answer.status).toBe(statuses.NOT_ACTIVE)
    expect(decodeErrorMessage(answer.payload)).toBe('the key is archived, which is final')
  }
  expect(cache.get('ar')?.record.state).toBe('archived')
  expect((await call(opcodes.SIGN, encodeSignRequest({ keyId: 'ar', digest: new Uint8Array(32) }))).status).toBe(statuses.NOT_ACTIVE)
})

it('an UNLOCK with no epoch of sequences left is refused before it installs or asks for anything', async () => {
  let unwraps = 0
  const countingKms = { unwrap: async () => (unwraps++, new Uint8Array(dek)) } as unknown as KmsDataKeys
  const { cache, service } = enclaveWith(countingKms)
  while (cache.hasSequenceEpochLeft()) cache.openSequenceEpoch()
  const answer = await service.handle({ requestId: 1, opcode: opcodes.UNLOCK, status: 0, payload: encodeUnlockRequest({ wrappedDek: Uint8Array.of(1) }) })
  expect(answer.status).toBe(statuses.UNAVAILABLE)
  expect(decodeErrorMessage(answer.payload)).toBe('no sequence epoch is left for another UNLOCK: restart the enclave')
  expect(unwraps).toBe(0)
})

it('an UNLOCK that would replace the data key is refused when keys under the held one came while KMS answered it', async () => {
  let release: () => void = () => {}
  const gate = new Promise<void>((resolve) => (release = resolve))
  const deks = new Map([1, 2].map((id) => [id, new Uint8Array(randomBytes(32))]))
  const unwrapped: Uint8Array[] = []
  const kms = {
    unwrap: async ({ ciphertext }: { ciphertext: Uint8Array }) => {
      if (ciphertext[0] === 2) await gate
      const dek = new Uint8Array(deks.get(ciphertext[0]!)!)
      unwrapped.push(dek)
      return dek
    },
  } as unknown as KmsDataKeys
  const { cache, service } = enclaveWith(kms)
  const unlock = (id: number) => service.handle({ requestId: id, opcode: opcodes.UNLOCK, status: 0, payload: encodeUnlockRequest({ wrappedDek: Uint8Array.of(id) }) })
  expect((await unlock(1)).status).toBe(statuses.OK)
  // Another store's data key, asked of KMS while this enclave holds no key yet.
  const replacing = unlock(2)
  await new Promise((resolve) => setTimeout(resolve, 10))
  const created = await service.handle({ requestId: 3, opcode: opcodes.CREATE, status: 0, payload: encodeCreateRequest({ keyId: 'held' }) })
  expect(created.status).toBe(statuses.OK)
  release()
  const answer = await replacing
  expect(answer.status).toBe(statuses.BAD_REQUEST)
  expect(decodeErrorMessage(answer.payload)).toContain('this enclave holds 1 keys under another data key')
  // The DEK it unwrapped is zeroed, and only the held one was ever installed.
  expect(unwrapped[1]).toEqual(new Uint8Array(32))
  const signed = await service.handle({ requestId: 4, opcode: opcodes.SIGN, status: 0, payload: encodeSignRequest({ keyId: 'held', digest: new Uint8Array(32).fill(3) }) })
  expect(signed.status).toBe(statuses.OK)
  expect(cache.stats().unlocks).toBe(1)
})

it('an UNLOCK that would make a first data key is refused when keys under the held one came while KMS made it', async () => {
  let release: () => void = () => {}
  const gate = new Promise<void>((resolve) => (release = resolve))
  const generated = new Uint8Array(randomBytes(32))
  const kms = {
    unwrap: async () => new Uint8Array(dek),
    generate: async () => (await gate, { dek: generated, wrapped: { keyId: 'test', ciphertext: Uint8Array.of(8) } }),
  } as unknown as KmsDataKeys
  const { cache, service } = enclaveWith(kms)
  expect((await service.handle({ requestId: 1, opcode: opcodes.UNLOCK, status: 0, payload: encodeUnlockRequest({ wrappedDek: Uint8Array.of(1) }) })).status).toBe(statuses.OK)
  const bootstrap = service.handle({ requestId: 2, opcode: opcodes.UNLOCK, status: 0, payload: encodeUnlockRequest({ wrappedDek: new Uint8Array() }) })
  await new Promise((resolve) => setTimeout(resolve, 10))
  expect((await service.handle({ requestId: 3, opcode: opcodes.CREATE, status: 0, payload: encodeCreateRequest({ keyId: 'held' }) })).status).toBe(statuses.OK)
  release()
  const answer = await bootstrap
  expect(answer.status).toBe(statuses.BAD_REQUEST)
  expect(decodeErrorMessage(answer.payload)).toContain('this enclave holds 1 keys under its data key: it makes no first one')
  expect(generated).toEqual(new Uint8Array(32))
  expect(cache.stats().unlocks).toBe(1)
})

it('RESEAL seals only under the DEK the rotation names: under any other it answers NEEDS_UNLOCK, counted, with the cache\u2019s retry-after', async () => {
  const kmsDek = new Uint8Array(randomBytes(32))
  const fakeKms = { unwrap: async () => new Uint8Array(kmsDek) } as unknown as KmsDataKeys
  const { cache, service } = enclaveWith(fakeKms, { retryAfterMs: { min: 120, max: 120 } })
  const wrappedDek = Uint8Array.of(5, 6, 7)
  expect((await service.handle({ requestId: 1, opcode: opcodes.UNLOCK, status: 0, payload: encodeUnlockRequest({ wrappedDek }) })).status).toBe(statuses.OK)
  await service.handle({ requestId: 2, opcode: opcodes.CREATE, status: 0, payload: encodeCreateRequest({ keyId: 'r' }) })
  const reseal = (wrappedDekSha256: Uint8Array) => service.handle({ requestId: 3, opcode: opcodes.RESEAL, status: 0, payload: encodeResealRequest({ keyId: 'r', wrappedDekSha256 }) })
  const refused = await reseal(createHash('sha256').update(Uint8Array.of(9)).digest())
  expect(refused.status).toBe(statuses.NEEDS_UNLOCK)
  expect(decodeNeedsUnlock(refused.payload).retryAfterMs).toBe(120)
  expect(cache.stats().needsUnlock).toBe(1)
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
  loadInNewEpoch(cache, { keyId: 'k', version: 1, state: 'active', publicKey: new Uint8Array(65), sealed: new Uint8Array(60) })
  expect(cache.get('k')?.cacheState).toBe('COOL')
})

it('answers LOGS from the lines it keeps, and says so when it keeps none', async () => {
  const logs = new LogRing({ maxBytes: 10_000 })
  logs.write('{"event":"one"}')
  const service = new EnclaveService({ cache: new KeyCache({ now: Date.now, unlock: () => Promise.reject(new Error('no unlock here')) }), engine, dataKeys: noKms, kmsKeyId: 'test', credentials: new DeliveredCredentials(), attestation: developmentAttestation, logs })
  const answer = await service.handle({ requestId: 1, opcode: opcodes.LOGS, status: 0, payload: encodeLogsRequest({ instance: 0, after: 0 }) })
  expect({ status: answer.status, logs: decodeLogsResponse(answer.payload) }).toEqual({ status: statuses.OK, logs: { instance: logs.instance, first: 1, skipped: 0, more: false, lines: ['{"event":"one"}'] } })
  const none = await enclaveWith(noKms).service.handle({ requestId: 2, opcode: opcodes.LOGS, status: 0, payload: encodeLogsRequest({ instance: 0, after: 0 }) })
  expect([none.status, decodeErrorMessage(none.payload)]).toEqual([statuses.BAD_REQUEST, 'this enclave keeps no log lines for LOGS'])
})

it('an enclave that holds keys keeps their data key: a bootstrap, or an UNLOCK with another DEK that is no rotation of it, is refused', async () => {
  let made = 0
  const fakeKms = {
    generate: async () => {
      made += 1
      return { dek: new Uint8Array(32).fill(made), wrapped: { keyId: 'test', ciphertext: Uint8Array.of(made) } }
    },
    unwrap: async ({ ciphertext }: { ciphertext: Uint8Array }) => new Uint8Array(32).fill(ciphertext[0]!),
  } as unknown as KmsDataKeys
  const { service } = enclaveWith(fakeKms)
  let requestId = 0
  const call = (opcode: number, payload: Uint8Array) => service.handle({ requestId: ++requestId, opcode, status: 0, payload })
  const bootstrap = () => call(opcodes.UNLOCK, encodeUnlockRequest({ wrappedDek: new Uint8Array() }))
  // A new enclave, or one holding no keys: it makes one (again).
  expect(decodeUnlockResponse((await bootstrap()).payload).wrappedDek).toEqual(Uint8Array.of(1))
  expect(decodeUnlockResponse((await bootstrap()).payload).wrappedDek).toEqual(Uint8Array.of(2))
  expect((await call(opcodes.CREATE, encodeCreateRequest({ keyId: 'held' }))).status).toBe(statuses.OK)
  const refused = await bootstrap()
  expect([refused.status, decodeErrorMessage(refused.payload)]).toEqual([
    statuses.BAD_REQUEST,
    "this enclave holds 1 keys under its data key: it makes no first one (is the parent's store the one they came from?)",
  ])
  expect(made).toBe(2)
  // The first data key another parent made on another enclave, handed over as an UNLOCK: refused too.
  const unlock = (wrappedDek: number, retiringWrappedDek?: number) =>
    call(opcodes.UNLOCK, encodeUnlockRequest({ wrappedDek: Uint8Array.of(wrappedDek), retiringWrappedDek: retiringWrappedDek === undefined ? undefined : Uint8Array.of(retiringWrappedDek) }))
  const replaced = await unlock(9)
  expect([replaced.status, decodeErrorMessage(replaced.payload)]).toEqual([
    statuses.BAD_REQUEST,
    "this enclave holds 1 keys under another data key, which an UNLOCK replaces only in a rotation (as its retiring one): is the parent's store the one they came from? If this enclave missed a rotation (left out of ENCLAVES while it ran, or the store restored from before one), restart it",
  ])
  expect((await call(opcodes.SIGN, encodeSignRequest({ keyId: 'held', digest: new Uint8Array(32) }))).status).toBe(statuses.OK)
  // The same DEK again, and a rotation (the held one retiring, then the new one alone) go through.
  expect((await unlock(2)).status).toBe(statuses.OK)
  expect((await unlock(9, 2)).status).toBe(statuses.OK)
  expect((await unlock(9)).status).toBe(statuses.OK)
})

it('a parent refuses to store an empty wrapped DEK from a bootstrap UNLOCK', async () => {
  // An enclave stand-in that answers every request OK with nothing: an UNLOCK with no wrapped DEK.
  const port = 18673
  const sockets = new Set<Socket>()
  const blank = createServer((socket) => {
    sockets.add(socket)
    const decoder = new FrameDecoder()
    socket.on('data', (chunk: Uint8Array) => {
      for (const frame of decoder.push(chunk)) {
        const payload = frame.opcode === opcodes.UNLOCK ? encodeUnlockResponse({ wrappedDek: new Uint8Array(), sequenceFloor: 2 ** 32 }) : new Uint8Array()
        socket.write(encodeFrame({ ...frame, status: statuses.OK, payload }))
      }
    })
  })
  await new Promise<void>((resolve) => blank.listen(port, '127.0.0.1', resolve))
  let stored = false
  // An empty store: with records and no wrapped DEK, the parent would refuse a bootstrap before asking.
  const store = { getWrappedDek: async () => undefined, putWrappedDek: async () => void (stored = true), list: async function* () {} } as unknown as BlobStore
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

/** A LOAD payload carrying `sealed` as it is, which the encoder would refuse unless it is 60 bytes. */
function loadPayload(record: { keyId: string; version: number; publicKey: Uint8Array }, sealed: Uint8Array): Uint8Array {
  const valid = encodeLoadRequest({ ...record, sequence: sharedFloor, state: 'active', sealed: new Uint8Array(60) })
  const payload = Buffer.concat([valid.subarray(0, valid.length - 64), Buffer.alloc(4), sealed])
  payload.writeUInt32BE(sealed.length, valid.length - 64)
  return payload
}

/** A key record sealed under the test DEK, and the public key it must sign as. */
function sealedKey(keyId: string, version: number) {
  const privateKey = new Uint8Array(randomBytes(32))
  const publicKey = secp256k1.publicKeyCreate(privateKey, false)
  return { keyId, version, publicKey, sealed: sealPrivateKey({ privateKey, dek, keyId, version }) }
}

it('a LOAD whose sealed blob is not 60 bytes is answered BAD_REQUEST and leaves every key signing as itself', async () => {
  const { socket, request } = client()
  let requestId = 300
  const call = async (opcode: number, payload: Uint8Array) => (await request({ requestId: ++requestId, opcode, payload }))!
  const publicKeyOf = async (keyId: string) => decodeGetResponse((await call(opcodes.GET, encodeGetRequest({ keyId }))).payload).publicKey
  const signsAs = async (keyId: string, publicKey: Uint8Array) => {
    const digest = new Uint8Array(randomBytes(32))
    const { signature } = decodeSignResponse((await call(opcodes.SIGN, encodeSignRequest({ keyId, digest }))).payload)
    return secp256k1.ecdsaVerify(signature, digest, publicKey)
  }

  expect((await call(opcodes.CREATE, encodeCreateRequest({ keyId: 'lk' }))).status).toBe(statuses.OK)
  const v2 = sealedKey('lk', 2)
  for (const length of [0, 59, 61, 4096]) {
    expect((await call(opcodes.LOAD, loadPayload(v2, new Uint8Array(length)))).status, `${length} bytes`).toBe(statuses.BAD_REQUEST)
  }
  expect((await call(opcodes.LOAD, encodeLoadRequest({ ...v2, sequence: sharedFloor + 2, state: 'active' }))).status).toBe(statuses.OK)
  const created = await call(opcodes.CREATE, encodeCreateRequest({ keyId: 'lj' }))
  const lj = decodeCreateResponse(created.payload).publicKey
  expect(await publicKeyOf('lk')).toEqual(v2.publicKey)
  expect(await publicKeyOf('lj')).toEqual(lj)

  const v3 = sealedKey('lk', 3)
  expect((await call(opcodes.LOAD, encodeLoadRequest({ ...v3, sequence: sharedFloor + 3, state: 'active' }))).status).toBe(statuses.OK)
  expect(await publicKeyOf('lj')).toEqual(lj)
  expect(await signsAs('lj', lj)).toBe(true)
  expect(await publicKeyOf('lk')).toEqual(v3.publicKey)
  expect(await signsAs('lk', v3.publicKey)).toBe(true)
  socket.destroy()
})

it('HEALTH with a payload is answered BAD_REQUEST, as every request that carries nothing', async () => {
  const { socket, request } = client()
  expect((await request({ requestId: 400, opcode: opcodes.HEALTH, payload: new Uint8Array() }))?.status).toBe(statuses.OK)
  expect((await request({ requestId: 401, opcode: opcodes.HEALTH, payload: Uint8Array.of(1) }))?.status).toBe(statuses.BAD_REQUEST)
  socket.destroy()
})

it('answers a request that carries a status BAD_REQUEST, that request only: the connection serves on', async () => {
  const peer = client()
  const refused = await peer.request({ requestId: 1, opcode: opcodes.HEALTH, status: 7, payload: new Uint8Array() })
  expect(refused?.status).toBe(statuses.BAD_REQUEST)
  expect(decodeErrorMessage(refused!.payload)).toBe("a request's status byte must be 0, got 7")
  expect((await peer.request({ requestId: 2, opcode: opcodes.HEALTH, payload: new Uint8Array() }))?.status).toBe(statuses.OK)
  peer.socket.destroy()
})

/** Serves `service` on `at` for the length of `use`. */
async function serving({ service, at, use }: { service: EnclaveService; at: number; use: () => Promise<void> }) {
  const served = await serveEnclave({ service, address: { host: '127.0.0.1', port: at }, log: () => {} })
  try {
    await use()
  } finally {
    await served.close()
  }
}

it('closes connections past its limit as they arrive, logged once however many, and serves the ones it holds', async () => {
  const { service } = enclaveWith(noKms)
  const logged: Array<Record<string, unknown>> = []
  const at = await freePort()
  const served = await serveEnclave({ service, address: { host: '127.0.0.1', port: at }, log: (fields) => logged.push(fields), maxConnections: 2 })
  const peers = [client(at), client(at)]
  try {
    for (const [i, peer] of peers.entries()) expect((await peer.request({ requestId: i + 1, opcode: opcodes.HEALTH, payload: new Uint8Array() }))?.status).toBe(statuses.OK)
    const refused = [client(at), client(at)]
    await Promise.all(refused.map((peer) => peer.closed))
    // Each told why in the connection's last word, as the parent's pool reads it.
    for (const peer of refused) {
      expect(peer.frames).toHaveLength(1)
      expect(peer.frames[0]).toMatchObject({ requestId: connectionRequestId, opcode: 0, status: statuses.UNAVAILABLE })
      expect(decodeErrorMessage(peer.frames[0]!.payload)).toBe('2 connections are open')
    }
    expect(logged).toEqual([{ level: 'warn', event: 'connection_refused', reason: '2 connections are open', maxConnections: 2, count: 1 }])
    expect((await peers[0]!.request({ requestId: 3, opcode: opcodes.HEALTH, payload: new Uint8Array() }))?.status).toBe(statuses.OK)
    // A flood of peers that never close their side: at most 64 refusals linger with their last word at once; the rest just close.
    const flood = Array.from({ length: 70 }, () => {
      const socket = connect({ port: at, host: '127.0.0.1', allowHalfOpen: true })
      const frames: Frame[] = []
      const decoder = new FrameDecoder()
      socket.on('data', (chunk: Uint8Array) => frames.push(...decoder.push(chunk)))
      socket.on('error', () => {})
      // Half-open: each reads the server's end of the connection, and keeps its own side open.
      return { socket, frames, ended: new Promise((resolve) => (socket.once('end', resolve), socket.once('close', resolve))) }
    })
    await Promise.all(flood.map((peer) => peer.ended))
    expect(flood.filter((peer) => peer.frames.length === 1).length).toBe(64)
    expect(flood.filter((peer) => peer.frames.length === 0).length).toBe(6)
    for (const peer of flood) peer.socket.destroy()
    // A place that frees up takes the next connection.
    peers[1]!.socket.destroy()
    await peers[1]!.closed
    await expect.poll(async () => {
      const next = client(at)
      peers.push(next)
      return (await next.request({ requestId: 4, opcode: opcodes.HEALTH, payload: new Uint8Array() }))?.status
    }).toBe(statuses.OK)
  } finally {
    for (const peer of peers) peer.socket.destroy()
    await served.close()
  }
})

it('rejects, rather than ending the process, when it cannot listen (a port in use)', async () => {
  const taken = createServer()
  await new Promise<void>((listening) => taken.listen(0, '127.0.0.1', listening))
  try {
    const { service } = enclaveWith(noKms)
    await expect(serveEnclave({ service, address: { host: '127.0.0.1', port: (taken.address() as AddressInfo).port }, log: () => {} })).rejects.toMatchObject({ code: 'EADDRINUSE' })
  } finally {
    taken.close()
  }
})

it('an answer the enclave cannot encode is INTERNAL, its own mistake, not BAD_REQUEST', async () => {
  // A retry-after past a u32 cannot go on the wire: NEEDS_UNLOCK's encoder refuses it.
  const { cache, service } = enclaveWith(noKms, { retryAfterMs: { min: 2 ** 32, max: 2 ** 32 } })
  loadInNewEpoch(cache, { keyId: 'k', version: 1, state: 'active', publicKey: new Uint8Array(65), sealed: new Uint8Array(60) })
  await serving({ service, at: 18674, use: async () => {
    const { socket, request } = client(18674)
    const answer = await request({ requestId: 1, opcode: opcodes.SIGN, payload: encodeSignRequest({ keyId: 'k', digest: new Uint8Array(32) }) })
    expect(answer?.status).toBe(statuses.INTERNAL)
    expect(decodeErrorMessage(answer!.payload)).toBe('NEEDS_UNLOCK retryAfterMs 4294967296 is not a u32')
    socket.destroy()
  } })
})

it('answers INTERNAL for an answer too large for a frame, and goes on serving that connection', async () => {
  const oversized: AttestationProvider = { kind: 'nitro', attestationDocument: async () => new Uint8Array(maxFrameBytes) }
  const { service } = enclaveWith(noKms, { attestation: oversized })
  await serving({ service, at: 18675, use: async () => {
    const peer = client(18675)
    const answer = await peer.request({ requestId: 1, opcode: opcodes.ATTEST, payload: new Uint8Array() })
    expect(answer?.status).toBe(statuses.INTERNAL)
    expect(decodeErrorMessage(answer!.payload)).toMatch(/^the answer could not be framed: /)
    expect((await peer.request({ requestId: 2, opcode: opcodes.HEALTH, payload: new Uint8Array() }))?.status).toBe(statuses.OK)
    peer.socket.destroy()
  } })
})

/** Resumes a peer that stopped reading and resolves, once `count` answers have come, with how many of them were OK. */
function answeredOnceRead(socket: Socket, count: number): Promise<number> {
  const decoder = new FrameDecoder()
  let answered = 0
  let ok = 0
  return new Promise((resolve) => {
    socket.on('data', (chunk: Uint8Array) => {
      for (const frame of decoder.push(chunk)) {
        answered += 1
        if (frame.status === statuses.OK) ok += 1
      }
      if (answered === count) resolve(ok)
    })
    socket.resume()
  })
}

it('hands a peer that asks for large answers (LOGS, up to a frame each) and never reads only as many as its unsent-bytes bound holds, answers others meanwhile, and every one once the peer reads', async () => {
  const logs = new LogRing({ maxBytes: 4 * 1024 * 1024 })
  for (let i = 0; i < 4_000; i++) logs.write(JSON.stringify({ event: 'filler', n: i, text: 'x'.repeat(1_000) }))
  let logsHandled = 0
  class CountingService extends EnclaveService {
    override handle(frame: Frame) {
      if (frame.opcode === opcodes.LOGS) logsHandled += 1
      return super.handle(frame)
    }
  }
  const service = new CountingService({ cache: new KeyCache({ now: Date.now, unlock: () => Promise.reject(new Error('no unlock here')) }), engine, dataKeys: noKms, kmsKeyId: 'test', credentials: new DeliveredCredentials(), attestation: developmentAttestation, logs })
  await serving({ service, at: 18677, use: async () => {
    // One write of 3,000 LOGS requests that acknowledge nothing: each answer is a full frame, about 64 KB, some 190 MB in all.
    const request = encodeLogsRequest({ instance: 0, after: 0 })
    const sent = 3_000
    const flood = connect(18677, '127.0.0.1')
    flood.pause() // never reads
    await once(flood, 'connect')
    flood.write(Buffer.concat(Array.from({ length: sent }, (_, i) => encodeFrame({ requestId: i + 1, opcode: opcodes.LOGS, status: 0, payload: request }))))
    const good = client(18677)
    try {
      // Answered while the flood waits: built on demand, a few at a time, not all in one turn.
      expect((await good.request({ requestId: 1, opcode: opcodes.HEALTH, payload: new Uint8Array() }))?.status).toBe(statuses.OK)
      let settled = -1
      while (settled !== logsHandled) {
        settled = logsHandled
        await new Promise((resolve) => setTimeout(resolve, 200))
      }
      // What the kernel's socket buffers on both sides took, and the bound's 1 MiB: far from all of them.
      expect(logsHandled).toBeLessThan(sent / 4)
      expect(await answeredOnceRead(flood, sent)).toBe(sent)
      expect(logsHandled).toBe(sent)
    } finally {
      flood.destroy()
      good.socket.destroy()
    }
  } })
}, 60_000)

it('stops reading a connection whose peer sends SIGNs and never reads the answers, keeps answering others, and answers every one once the peer reads', async () => {
  const good = client()
  expect((await good.request({ requestId: 500, opcode: opcodes.CREATE, payload: encodeCreateRequest({ keyId: 'flooded' }) }))?.status).toBe(statuses.OK)
  const sign = encodeSignRequest({ keyId: 'flooded', digest: new Uint8Array(32).fill(9) })
  const batch = Buffer.concat(Array.from({ length: 1_000 }, (_, i) => encodeFrame({ requestId: i + 1, opcode: opcodes.SIGN, status: 0, payload: sign })))
  const flood = connect(port, '127.0.0.1')
  flood.pause() // never reads
  await once(flood, 'connect')
  try {
    // 16 MB of SIGNs, more than the enclave's bound and the kernel's buffers on both sides hold.
    let sent = 0
    for (let written = 0; written < 16 * 1024 * 1024; written += batch.length) flood.write(batch), (sent += 1_000)
    // Without backpressure the enclave reads it all. With it, it stops once its unsent answers pass the bound,
    // answers what it read, and goes idle with the rest still waiting at the client.
    let idleChecks = 0
    while (flood.writableLength > 0 && idleChecks < 5) {
      await new Promise((resolve) => setTimeout(resolve, 100))
      idleChecks = engine.stats().inflight === 0 ? idleChecks + 1 : 0
    }
    expect(flood.writableLength).toBeGreaterThan(0)
    expect((await good.request({ requestId: 501, opcode: opcodes.SIGN, payload: sign }))?.status).toBe(statuses.OK)

    // The peer reads again: the enclave resumes, and every request is answered, signed.
    expect(await answeredOnceRead(flood, sent)).toBe(sent)
  } finally {
    flood.destroy()
    good.socket.destroy()
  }
}, 60_000)

it('answers every mutated request frame (seeded) with a status other than INTERNAL, on a connection that stays open, and harms no key', { timeout: 60_000 }, async () => {
  const { cache, service } = enclaveWith(noKms)
  cache.setDek(new Uint8Array(dek))
  const floor = cache.openSequenceEpoch()
  const at = await freePort()
  await serving({
    service,
    at,
    use: async () => {
      const canary = client(at)
      const created = await canary.request({ requestId: 1, opcode: opcodes.CREATE, payload: encodeCreateRequest({ keyId: 'canary' }) })
      const { publicKey } = decodeCreateResponse(created!.payload)
      const fuzzRecord = decodeCreateResponse((await canary.request({ requestId: 2, opcode: opcodes.CREATE, payload: encodeCreateRequest({ keyId: 'fuzz-target-key' }) }))!.payload)
      // A valid payload for each opcode, on keys other than the canary, and some opcodes no enclave knows.
      const bases: Array<[number, Uint8Array]> = [
        [opcodes.SIGN, encodeSignRequest({ keyId: 'fuzz-target-key', digest: new Uint8Array(32).fill(7) })],
        [opcodes.CREATE, encodeCreateRequest({ keyId: 'fuzz-new-key' })],
        [opcodes.GET, encodeGetRequest({ keyId: 'fuzz-target-key' })],
        [opcodes.SET_STATE, encodeSetStateRequest({ keyId: 'fuzz-target-key', state: 'frozen', sequence: floor + 1 })],
        [opcodes.LOAD, encodeLoadRequest({ keyId: 'fuzz-loaded-key', sequence: floor + 1, state: 'active', ...fuzzRecord })],
        [opcodes.UNLOCK, encodeUnlockRequest({ wrappedDek: Uint8Array.of(1, 2, 3) })],
        [opcodes.RESEAL, encodeResealRequest({ keyId: 'fuzz-target-key', wrappedDekSha256: new Uint8Array(32) })],
        [opcodes.LOGS, encodeLogsRequest({ instance: 0, after: 0 })],
        [opcodes.HEALTH, new Uint8Array()],
        [opcodes.ATTEST, new Uint8Array()],
        [0, new Uint8Array(4)],
        [13, new Uint8Array(4)],
        [255, new Uint8Array()],
      ]
      const random = seededRandom(0xf4a3)
      const byte = () => Math.floor(random() * 256)
      const mutate = (payload: Uint8Array): Uint8Array => {
        const kind = Math.floor(random() * 4)
        if (kind === 0) return payload.map((b) => (random() < 0.1 ? byte() : b)) // flip some bytes
        if (kind === 1) return payload.slice(0, Math.floor(random() * payload.length)) // cut short
        if (kind === 2) return Uint8Array.from([...payload, ...Array.from({ length: 1 + Math.floor(random() * 40) }, byte)]) // trailing bytes
        return Uint8Array.from({ length: Math.floor(random() * 120) }, byte) // noise
      }
      const fuzz = client(at)
      for (let n = 0; n < 300; n++) {
        const [opcode, base] = bases[n % bases.length]!
        const payload = mutate(base)
        // Whole: a LOAD carries a record made in this run, so its case cannot be replayed from the seed alone.
        const where = `case ${n}: opcode ${opcode}, payload ${Buffer.from(payload).toString('hex')}`
        // A busy machine may hold an answer up: waited for far longer than one takes.
        const answer = await fuzz.request({ requestId: 1_000 + n, opcode, payload }, 10_000)
        expect(answer, where).toBeDefined()
        expect(Object.values(statuses), where).toContain(answer!.status)
        // INTERNAL only for what KMS said: an UNLOCK whose wrapped data key (any bytes are one) this enclave's KMS refused.
        if (answer!.status === statuses.INTERNAL) expect([opcode, decodeErrorMessage(answer!.payload)], where).toEqual([opcodes.UNLOCK, 'no KMS here'])
        if (answer!.status === statuses.NEEDS_UNLOCK) expect(decodeNeedsUnlock(answer!.payload).retryAfterMs, where).toBeGreaterThan(0)
        else if (answer!.status !== statuses.OK) expect(decodeErrorMessage(answer!.payload).length, where).toBeGreaterThan(0)
      }
      // The connection is still served.
      expect((await fuzz.request({ requestId: 2_000, opcode: opcodes.HEALTH, payload: new Uint8Array() }, 10_000))?.status).toBe(statuses.OK)
      // The canary key still signs as itself.
      const digest = keccak256(toHex('after the frame sweep'))
      const signed = await canary.request({ requestId: 3, opcode: opcodes.SIGN, payload: encodeSignRequest({ keyId: 'canary', digest: Buffer.from(digest.slice(2), 'hex') }) })
      expect(signed?.status).toBe(statuses.OK)
      const { signature, recoveryId } = decodeSignResponse(signed!.payload)
      expect(Buffer.from(secp256k1.ecdsaRecover(signature, recoveryId, Buffer.from(digest.slice(2), 'hex'), false))).toEqual(Buffer.from(publicKey))
      fuzz.socket.destroy()
      canary.socket.destroy()
    },
  })
})

it('hands nothing more to the service for a connection found reset, however many of its requests were waiting', async () => {
  let handled = 0
  const held: Array<() => void> = []
  class HeldService extends EnclaveService {
    override handle(frame: Frame) {
      if (frame.opcode !== opcodes.SIGN) return super.handle(frame)
      handled += 1
      return new Promise<void>((release) => held.push(release)).then(() => super.handle(frame))
    }
  }
  const service = new HeldService({ cache: new KeyCache({ now: Date.now, unlock: () => Promise.reject(new Error('no unlock here')) }), engine, dataKeys: noKms, kmsKeyId: 'test', credentials: new DeliveredCredentials(), attestation: developmentAttestation })
  const at = await freePort()
  // One connection at a time: a second one served means the server has let the first go.
  const served = await serveEnclave({ service, address: { host: '127.0.0.1', port: at }, log: () => {}, maxConnections: 1 })
  try {
    const peer = connect(at, '127.0.0.1')
    peer.on('error', () => {})
    await once(peer, 'connect')
    // More than the 1,024 a connection may have in flight (and the unsent-bytes bound, at 1,024 signs' answers, meets
    // it there): the rest wait in the server, read but not handed on.
    const sign = encodeSignRequest({ keyId: 'k', digest: new Uint8Array(32) })
    peer.write(Buffer.concat(Array.from({ length: 1_500 }, (_, i) => encodeFrame({ requestId: i + 1, opcode: opcodes.SIGN, status: 0, payload: sign }))))
    await expect.poll(() => handled).toBe(1_024)
    peer.resetAndDestroy()
    await once(peer, 'close')
    await expect
      .poll(async () => {
        const next = client(at)
        const health = await next.request({ requestId: 1, opcode: opcodes.HEALTH, payload: new Uint8Array() }, 200)
        next.socket.destroy()
        return health?.status
      }, { timeout: 10_000 })
      .toBe(statuses.OK)
    // Every answer frees a place, on a connection now gone: none is filled (without the check, each would take a waiting request).
    for (let round = 0; round < 3; round++) {
      for (const release of held.splice(0)) release()
      await new Promise((resolve) => setTimeout(resolve, 50))
    }
    expect(held).toHaveLength(0)
    expect(handled).toBe(1_024)
  } finally {
    await served.close()
  }
})
