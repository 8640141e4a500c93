import { createHash, randomFillSync, timingSafeEqual } from 'node:crypto'
import { createServer, type Server, type Socket } from 'node:net'
import { Decrypter, generateIdentity, identityToRecipient } from 'age-encryption'
import type { StreamAddress } from '../config.js'
import { messageOf } from '../errors.js'
import { CoalescingWriter } from '../protocol/coalescingWriter.js'
import { listenVsock } from '../protocol/vsock.js'
import { ThrottledLog } from '../throttledLog.js'
import { endLingering } from '../protocol/endLingering.js'
import { connectionRequestId, encodeConnectionClosing, encodeFrame, FrameDecoder, FrameError, lengthPrefixBytes, maxFrameBytes, opcodes, statuses, type Frame, type Status } from '../protocol/frames.js'
import {
  decodeCreateRequest,
  decodeCredentials,
  decodeEmptyPayload,
  decodeGetRequest,
  decodeLoadRequest,
  decodeLogsRequest,
  decodeResealRequest,
  decodeSetStateRequest,
  decodeSignRequest,
  decodeUnlockRequest,
  emptyPayload,
  encodeAttestResponse,
  encodeCreateResponse,
  encodeErrorMessage,
  encodeGeneratedDataKey,
  encodeGetResponse,
  encodeHealthResponse,
  encodeLogsResponse,
  encodeNeedsUnlock,
  encodeSignResponse,
  encodeUnlockResponse,
  type UnlockRequest,
} from '../protocol/messages.js'
import type { RawSignature, WrappedDek } from '../types.js'
import type { AttestationProvider, KmsDataKeys } from './dataKey.js'
import type { DeliveredCredentials } from './deliveredCredentials.js'
import type { SignEngine } from './engine.js'
import type { DataKeys, KeyCache, SequencedResult } from './keyCache.js'
import { memoryFigures } from './memory.js'
import { secp256k1 } from './nativeSecp256k1.js'
import type { LogRing } from './logRing.js'
import { loadPreloadFile, PreloadedKeys, PreloadError } from './preload.js'
import { secretBytes, zero } from './sealing.js'

function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && timingSafeEqual(a, b)
}

/** Log lines per LOGS answer: a frame's worth, less room for its header and the answer's own fields. */
const logsAnswerBytes = maxFrameBytes - 64

type Answer = { status: Status; payload: Uint8Array }

const fail = (status: Status, message: string): Answer => ({ status, payload: encodeErrorMessage(message) })
const utf8 = new TextEncoder()

/** A LOAD or SET_STATE's answer: OK, STALE and why, or NEEDS_UNLOCK before any UNLOCK opened an epoch of sequences. */
function sequenced(result: SequencedResult): Answer {
  if (result.kind === 'applied') return { status: statuses.OK, payload: emptyPayload }
  if (result.kind === 'needs-unlock') return { status: statuses.NEEDS_UNLOCK, payload: encodeNeedsUnlock(result) }
  if (result.kind === 'archived') return fail(statuses.NOT_ACTIVE, 'the key is archived, which is final')
  return fail(statuses.STALE, result.reason)
}

/**
 * A request payload that does not decode: the client's mistake, answered
 * BAD_REQUEST. Any other error, a FrameError from encoding an answer among
 * them, is the enclave's own: INTERNAL.
 */
class BadRequestError extends Error {}

function decodeRequest<T>(decode: (payload: Uint8Array) => T, payload: Uint8Array): T {
  try {
    return decode(payload)
  } catch (error) {
    throw error instanceof FrameError ? new BadRequestError(error.message) : error
  }
}

/** For requests that carry nothing: a payload is the client's mistake too. */
function decodeEmptyRequest(frame: Frame, name: string): void {
  decodeRequest((payload) => decodeEmptyPayload(payload, `${name} request`), frame.payload)
}

function answerToFailure(error: unknown): Answer {
  return error instanceof BadRequestError ? fail(statuses.BAD_REQUEST, error.message) : fail(statuses.INTERNAL, messageOf(error))
}

/**
 * Per connection, requests are handed to the service, in order, only while
 * fewer than this many await their answers and while the answer bytes not
 * yet sent, with the most the answers in flight may add (see
 * `largestAnswerBytes`), stay within `maxUnsentBytes`; reading pauses while
 * decoded requests wait. So a peer that sends and never reads holds a
 * bounded share of memory, however large the answers it asks for (a LOGS
 * answer is up to a frame for a 16-byte request). As many as the parent
 * keeps in flight to an enclave over all its connections; the two bounds
 * meet at 1,024 small answers. The byte bound is above any socket's
 * high-water mark, so a socket over it has a 'drain' to come.
 */
const maxRequestsInFlight = 1_024
/** How long a connection closed for a broken frame is read (and dropped) for before it is destroyed, if its peer keeps it open. */
const closingLingerMs = 1_000
/** Refused connections (see `serveEnclave`) that may linger with their last word at once. */
const maxRefusalsLingering = 64
const maxUnsentBytes = 1024 * 1024

/** The most bytes an answer to `opcode` takes: up to a frame for LOGS, ATTEST and HEALTH; for the rest under 1 KiB, an error (its message at most 512 bytes) included. */
function largestAnswerBytes(opcode: number): number {
  return opcode === opcodes.LOGS || opcode === opcodes.ATTEST || opcode === opcodes.HEALTH ? lengthPrefixBytes + maxFrameBytes : 1_024
}

/**
 * The enclave's request handling: one opcode each, answering from the key
 * cache and the signing engine. The hot path (SIGN) never waits on KMS: a
 * key that cannot be used now gets NEEDS_UNLOCK with a retry-after at once.
 */
export class EnclaveService {
  /** The wrapped DEK (and a rotation's retiring one) from the last UNLOCK: what a background unlock unwraps again. */
  private wrappedDek: WrappedDek | undefined
  /** Preload mode: account keys from the age-encrypted file, once an UNLOCK delivers its identity. */
  private preloaded: PreloadedKeys | undefined
  /** Why preloaded accounts cannot be served yet (preload mode only). */
  private preloadRefusal: string | undefined
  /**
   * An X25519 age identity made at the first ATTEST, which never leaves this
   * process: secrets for the enclave (the preload identity) come sealed to its
   * recipient, so the parent that carries them cannot read them. A new one at
   * every start.
   */
  private deliveryKey: Promise<{ identity: string; recipient: string }> | undefined
  /** UNLOCKs run one at a time, in the order they came: a later one never loses to an earlier one still at KMS. */
  private unlockRunning = false
  /**
   * At most one UNLOCK waits behind the running one. A later one joins it and
   * takes its place (it was built from a newer store), keeping a preload
   * identity the earlier one carried; both get its answer. However long KMS
   * stalls, the queue stays this short.
   */
  private unlockWaiting: { request: UnlockRequest; answers: Array<(answer: Promise<Answer>) => void> } | undefined

  constructor(
    private readonly options: {
      cache: KeyCache
      engine: SignEngine
      dataKeys: KmsDataKeys
      kmsKeyId: string
      /** Where CREDENTIALS requests put the AWS credentials that `dataKeys` signs its KMS calls with. */
      credentials: DeliveredCredentials
      /** Binds the delivery recipient in ATTEST answers (the same provider as the data keys'). */
      attestation: AttestationProvider
      /** Preload mode: the age-encrypted share file to load when UNLOCK delivers the identity. */
      preloadFile?: string
      log?: (fields: Record<string, unknown>) => void
      /** The lines `log` wrote, for LOGS: the parent collects them, as no one reads an enclave's console. */
      logs?: LogRing
    },
  ) {
    if (options.preloadFile) this.preloadRefusal = 'the preload file is not loaded yet: UNLOCK with its age identity'
  }

  /** A key id neither held nor preloaded: not found, unless the preloaded accounts are not served, when it may be one of them. */
  private notHeld(keyId: string): Answer {
    return this.preloadRefusal ? fail(statuses.NOT_FOUND_PRELOAD_NOT_SERVED, this.preloadRefusal) : fail(statuses.NOT_FOUND, `no key ${keyId}`)
  }

  /** Loads the preload file; on any failure nothing preloaded is served, and `preloadRefusal` says why. */
  private async preload(identity: string): Promise<void> {
    try {
      const loaded = await loadPreloadFile({ path: this.options.preloadFile!, identity, log: this.options.log ?? (() => {}) })
      this.preloaded?.clear()
      this.preloaded = new PreloadedKeys(loaded.keys)
      this.preloadRefusal = undefined
    } catch (error) {
      this.preloaded?.clear()
      this.preloaded = undefined
      this.preloadRefusal = `preload failed: ${error instanceof PreloadError ? error.message : 'unexpected error'}`
      // The operator's record of why. An unexpected error (a bug) is named by its class alone: its message could quote anything.
      this.options.log?.({ level: 'error', event: 'preload_failed', reason: this.preloadRefusal, ...(error instanceof PreloadError ? {} : { errorClass: error instanceof Error ? error.constructor.name : typeof error }) })
    }
  }

  private delivery(): Promise<{ identity: string; recipient: string }> {
    this.deliveryKey ??= generateIdentity().then(async (identity) => ({ identity, recipient: await identityToRecipient(identity) }))
    return this.deliveryKey
  }

  /** The plaintext of a secret sealed to the delivery recipient, or undefined when it does not open with this process's key. */
  private async openDelivered(sealed: Uint8Array): Promise<string | undefined> {
    const decrypter = new Decrypter()
    decrypter.addIdentity((await this.delivery()).identity)
    return decrypter.decrypt(sealed, 'text').catch(() => undefined)
  }

  /** Zeroes the preloaded account keys and forgets the wrapped DEK (at shutdown); the key cache is cleared by its owner. */
  clear(): void {
    this.preloaded?.clear()
    this.preloaded = undefined
    this.wrappedDek = undefined
  }

  /** For the key cache's `unlock` option: unwrap the DEK (and retiring DEK) the parent last handed over. */
  unwrapLastDataKeys = async (): Promise<DataKeys> => {
    if (!this.wrappedDek) throw new Error('no data key handed over yet; the parent must send UNLOCK')
    return this.unwrapDataKeys(this.wrappedDek)
  }

  /** Both or neither: a DEK unwrapped while the other failed is zeroed, not left behind. */
  private async unwrapDataKeys(wrapped: WrappedDek): Promise<DataKeys> {
    const { dataKeys } = this.options
    const [dek, retiring] = await Promise.allSettled([dataKeys.unwrap(wrapped), wrapped.retiring && dataKeys.unwrap(wrapped.retiring)])
    if (dek.status === 'rejected' || retiring.status === 'rejected') {
      for (const result of [dek, retiring]) if (result.status === 'fulfilled' && result.value) zero(result.value)
      throw dek.status === 'rejected' ? dek.reason : (retiring as PromiseRejectedResult).reason
    }
    return retiring.value ? { dek: dek.value, retiring: retiring.value } : { dek: dek.value }
  }

  private queueUnlock(request: UnlockRequest): Promise<Answer> {
    return new Promise<Answer>((resolve) => {
      const waiting = this.unlockWaiting
      if (waiting && (waiting.request.wrappedDek.length === 0 || request.wrappedDek.length === 0)) {
        // A bootstrap (no wrapped DEK: KMS makes one, and its answer carries it) is never merged. One
        // parent never sends one while another UNLOCK waits; should it happen, the later one is refused.
        return resolve(fail(statuses.UNAVAILABLE, 'another UNLOCK is waiting, and one that makes a data key cannot be merged with it; retry'))
      }
      if (waiting) {
        waiting.request = {
          ...request,
          sealedPreloadIdentity: request.sealedPreloadIdentity ?? waiting.request.sealedPreloadIdentity,
          sequenceFloorAtLeast: Math.max(request.sequenceFloorAtLeast ?? 0, waiting.request.sequenceFloorAtLeast ?? 0),
        }
        waiting.answers.push(resolve)
      } else {
        this.unlockWaiting = { request, answers: [resolve] }
      }
      this.runNextUnlock()
    })
  }

  private runNextUnlock(): void {
    const next = this.unlockWaiting
    if (this.unlockRunning || !next) return
    this.unlockWaiting = undefined
    this.unlockRunning = true
    const answer = this.unlock(next.request)
    for (const resolve of next.answers) resolve(answer)
    void answer
      .catch(() => {})
      .finally(() => {
        this.unlockRunning = false
        this.runNextUnlock()
      })
  }

  /**
   * The data key first: installed from the wrapped DEK(s), or, with none and
   * no preload identity, made by KMS (bootstrap; the answer carries its
   * wrapped form for the parent to store). Then the preload, whose failure
   * is the answer but leaves the data key installed.
   */
  private async unlock({ wrappedDek, retiringWrappedDek, sealedPreloadIdentity, sequenceFloorAtLeast = 0 }: UnlockRequest): Promise<Answer> {
    const { cache } = this.options
    if (sealedPreloadIdentity && !this.options.preloadFile) return fail(statuses.BAD_REQUEST, 'this enclave has no preload file')
    // Refused before it changes anything: its answer could open no epoch of sequences for the parent.
    if (!cache.hasSequenceEpochLeft(sequenceFloorAtLeast)) return fail(statuses.UNAVAILABLE, 'no sequence epoch is left for another UNLOCK: restart the enclave')
    let made: Uint8Array = emptyPayload
    // Keys sealed under the DEK held are another parent's, or this one's before its store was lost, unless the new
    // DEK is a rotation's (the held one retiring) or the same: a parent on the wrong store must not replace it, as
    // it could by making the first data key on another enclave and handing it to this one.
    // Each is checked before KMS is asked and again once it has answered: keys under the held DEK may have landed
    // meanwhile (LOADs and CREATEs of a parent that unlocked before, in its epoch).
    const replacingHeld = (): Answer | undefined => {
      const held = this.wrappedDek?.ciphertext
      if (!held || cache.keyCount === 0 || sameBytes(wrappedDek, held) || (retiringWrappedDek && sameBytes(retiringWrappedDek, held))) return undefined
      return fail(statuses.BAD_REQUEST, `this enclave holds ${cache.keyCount} keys under another data key, which an UNLOCK replaces only in a rotation (as its retiring one): is the parent's store the one they came from? If this enclave missed a rotation (left out of ENCLAVES while it ran, or the store restored from before one), restart it`)
    }
    // The first data key, for a parent whose store holds none. An enclave holding keys sealed under one is serving
    // another store (or this one before it was lost): replacing its DEK would seal new keys where no store keeps it.
    const makingFirstOverKeys = (): Answer | undefined =>
      cache.keyCount > 0 ? fail(statuses.BAD_REQUEST, `this enclave holds ${cache.keyCount} keys under its data key: it makes no first one (is the parent's store the one they came from?)`) : undefined
    if (wrappedDek.length > 0) {
      const refused = replacingHeld()
      if (refused) return refused
      // Both under this enclave's KMS key: a rotation makes the new DEK there too.
      const wrapped: WrappedDek = { keyId: this.options.kmsKeyId, ciphertext: wrappedDek }
      if (retiringWrappedDek) wrapped.retiring = { keyId: this.options.kmsKeyId, ciphertext: retiringWrappedDek }
      const { dek, retiring } = await this.unwrapDataKeys(wrapped)
      const refusedSince = replacingHeld()
      if (refusedSince) {
        zero(dek)
        if (retiring) zero(retiring)
        return refusedSince
      }
      this.wrappedDek = wrapped
      cache.setDek(dek, retiring)
    } else if (!sealedPreloadIdentity) {
      const refused = makingFirstOverKeys()
      if (refused) return refused
      const { dek, wrapped } = await this.options.dataKeys.generate()
      const refusedSince = makingFirstOverKeys()
      if (refusedSince) {
        zero(dek)
        return refusedSince
      }
      this.wrappedDek = wrapped
      cache.setDek(dek)
      made = wrapped.ciphertext
    }
    if (sealedPreloadIdentity) {
      const preloadIdentity = await this.openDelivered(sealedPreloadIdentity)
      if (preloadIdentity === undefined) {
        return fail(statuses.BAD_REQUEST, 'the preload identity is not sealed to this enclave\'s delivery recipient (ATTEST gives it; it changes at every enclave start)')
      }
      await this.preload(preloadIdentity)
      if (this.preloadRefusal) return fail(statuses.BAD_REQUEST, this.preloadRefusal)
    }
    // Opened only by an UNLOCK that succeeded: its parent is the one that numbers requests from now on.
    return { status: statuses.OK, payload: encodeUnlockResponse({ wrappedDek: made, sequenceFloor: cache.openSequenceEpoch(sequenceFloorAtLeast) }) }
  }

  async handle(frame: Frame): Promise<Answer> {
    const { cache, engine } = this.options
    // A status is an answer's: a request carrying one is from a peer that reads the protocol otherwise (its framing holds, so only it fails).
    if (frame.status !== 0) return fail(statuses.BAD_REQUEST, `a request's status byte must be 0, got ${frame.status}`)
    switch (frame.opcode) {
      case opcodes.SIGN: {
        const started = performance.now()
        const { keyId, digest } = decodeRequest(decodeSignRequest, frame.payload)
        // Fields named, not spread: V8 adds a property to a spread copy slowly (about 1 µs each).
        const signed = (signature: RawSignature) =>
          ({ status: statuses.OK, payload: encodeSignResponse({ signature: signature.signature, recoveryId: signature.recoveryId, enclaveMicros: Math.round((performance.now() - started) * 1_000) }) }) as Answer
        const key = cache.acquire(keyId)
        if (key.kind === 'needs-unlock') return { status: statuses.NEEDS_UNLOCK, payload: encodeNeedsUnlock(key) }
        if (key.kind === 'not-found') {
          const account = this.preloaded?.get(keyId)
          if (account) return signed(await engine.sign({ privateKey: account, digest }))
          return this.notHeld(keyId)
        }
        if (key.kind === 'not-active') return fail(statuses.NOT_ACTIVE, `key ${keyId} is ${key.state}`)
        const mark = cache.deactivations
        let given = false
        try {
          // The engine copies the key synchronously, as the cache requires.
          const signature = await engine.sign({ privateKey: key.privateKey, digest })
          // Frozen or archived while it waited in a batch or a thread's queue: once SET_STATE has answered, no signature leaves,
          // even if an unfreeze came before it did.
          if (!cache.activeThroughout(keyId, mark)) {
            const state = cache.get(keyId)?.record.state ?? 'gone'
            return fail(statuses.NOT_ACTIVE, state === 'active' ? `key ${keyId} was frozen or archived while this signature was made` : `key ${keyId} is ${state}`)
          }
          given = true
          return signed(signature)
        } finally {
          if (key.grace) cache.settleGrace(keyId, given)
        }
      }
      case opcodes.CREATE: {
        const { keyId } = decodeRequest(decodeCreateRequest, frame.payload)
        if (cache.get(keyId)) return fail(statuses.BAD_REQUEST, `key ${keyId} exists`)
        const privateKey = generatePrivateKey()
        const publicKey = secp256k1.publicKeyCreate(privateKey, false)
        const created = cache.createKey({ keyId, publicKey, privateKey })
        if (created.kind === 'needs-unlock') return { status: statuses.NEEDS_UNLOCK, payload: encodeNeedsUnlock(created) }
        const { record } = created
        return { status: statuses.OK, payload: encodeCreateResponse({ publicKey: record.publicKey, sealed: record.sealed, version: record.version }) }
      }
      case opcodes.LOAD: {
        const { sequence, ...record } = decodeRequest(decodeLoadRequest, frame.payload)
        return sequenced(cache.load(record, sequence))
      }
      case opcodes.GET: {
        const { keyId } = decodeRequest(decodeGetRequest, frame.payload)
        const key = cache.get(keyId)
        if (!key) {
          // A preloaded account has no record and no states: it is active, its key always in memory.
          const account = this.preloaded?.get(keyId)
          if (account) return { status: statuses.OK, payload: encodeGetResponse({ state: 'active', cacheState: 'WARM', publicKey: secp256k1.publicKeyCreate(account, false) }) }
          return this.notHeld(keyId)
        }
        return { status: statuses.OK, payload: encodeGetResponse({ state: key.record.state, cacheState: key.cacheState, publicKey: key.record.publicKey }) }
      }
      case opcodes.SET_STATE: {
        const request = decodeRequest(decodeSetStateRequest, frame.payload)
        const result = cache.setState(request)
        return result.kind === 'not-found' ? fail(statuses.NOT_FOUND, `no key ${request.keyId}`) : sequenced(result)
      }
      case opcodes.UNLOCK:
        return this.queueUnlock(decodeRequest(decodeUnlockRequest, frame.payload))
      case opcodes.GENERATE_DATA_KEY: {
        // A DEK for a rotation: only its wrapped form leaves, and the parent makes it durable before any UNLOCK installs it.
        decodeEmptyRequest(frame, 'GENERATE_DATA_KEY')
        const { dek, wrapped } = await this.options.dataKeys.generate()
        zero(dek)
        return { status: statuses.OK, payload: encodeGeneratedDataKey(wrapped.ciphertext) }
      }
      case opcodes.RESEAL: {
        const { keyId, wrappedDekSha256 } = decodeRequest(decodeResealRequest, frame.payload)
        // Sealing under any DEK but the rotation's would leave a record the store cannot open once the old one goes.
        const sealingWith = this.wrappedDek && createHash('sha256').update(this.wrappedDek.ciphertext).digest()
        if (!sealingWith || !timingSafeEqual(sealingWith, wrappedDekSha256)) return { status: statuses.NEEDS_UNLOCK, payload: encodeNeedsUnlock(cache.retryAfterUnlock()) }
        const resealed = cache.reseal(keyId)
        if (resealed.kind === 'not-found') return fail(statuses.NOT_FOUND, `no key ${keyId}`)
        if (resealed.kind === 'needs-unlock') return { status: statuses.NEEDS_UNLOCK, payload: encodeNeedsUnlock(resealed) }
        const { record } = resealed
        return { status: statuses.OK, payload: encodeCreateResponse({ publicKey: record.publicKey, sealed: record.sealed, version: record.version }) }
      }
      case opcodes.CREDENTIALS:
        this.options.credentials.set(decodeRequest(decodeCredentials, frame.payload))
        return { status: statuses.OK, payload: emptyPayload }
      case opcodes.ATTEST: {
        decodeEmptyRequest(frame, 'ATTEST')
        const { recipient } = await this.delivery()
        const document = await this.options.attestation.attestationDocument({ publicKey: utf8.encode(recipient) })
        return { status: statuses.OK, payload: encodeAttestResponse({ recipient, attestationDocument: document ?? emptyPayload }) }
      }
      case opcodes.LOGS: {
        const request = decodeRequest(decodeLogsRequest, frame.payload)
        if (!this.options.logs) return fail(statuses.BAD_REQUEST, 'this enclave keeps no log lines for LOGS')
        return { status: statuses.OK, payload: encodeLogsResponse(this.options.logs.read({ ...request, maxBytes: logsAnswerBytes })) }
      }
      case opcodes.HEALTH: {
        decodeEmptyRequest(frame, 'HEALTH')
        const stats = cache.stats()
        return {
          status: statuses.OK,
          payload: encodeHealthResponse({
            cacheStates: stats.keys,
            cache: { ...stats, keys: undefined },
            engine: engine.stats(),
            memory: memoryFigures(),
            ...(this.options.preloadFile ? { preload: { accounts: this.preloaded?.size ?? 0, refusal: this.preloadRefusal ?? null } } : {}),
          }),
        }
      }
      default:
        return fail(statuses.BAD_REQUEST, `unknown opcode ${frame.opcode}`)
    }
  }
}

/** 32 random bytes that are a valid secp256k1 key (from the kernel RNG, checked at start-up in production). */
function generatePrivateKey(): Uint8Array {
  for (;;) {
    // Filled in place: a Buffer from randomBytes() may sit in Node's shared pool, where it could not be zeroed alone.
    const candidate = randomFillSync(secretBytes(32))
    if (secp256k1.privateKeyVerify(candidate)) return candidate
    zero(candidate)
  }
}

/**
 * Serves the protocol on a stream listener (TCP or a Unix socket here; vsock in
 * an enclave). Requests on one connection run concurrently and answer in any
 * order; a malformed frame closes that connection only, after a last frame
 * (request id `connectionRequestId`) that says why. Connections past
 * `maxConnections` (default 256: a parent's pool is 16–32) are closed as they
 * arrive: whatever else on the parent host reaches the port must not take every
 * file descriptor, after which accept() would fail (and the vsock addon retry it)
 * without end. Rejects when it cannot listen.
 */
export async function serveEnclave(options: {
  service: EnclaveService
  address: StreamAddress
  log: (fields: Record<string, unknown>) => void
  maxConnections?: number
}): Promise<{ close(): Promise<void> }> {
  const sockets = new Set<Socket>()
  const maxConnections = options.maxConnections ?? 256
  /** Refused connections still closing with their last word. */
  let refusalsLingering = 0
  // A flood of connections or of accept() failures must not flood the log either.
  const throttled = new ThrottledLog({ log: options.log })
  const onListenerError = (error: Error) => throttled.write('listener_error', { level: 'error', event: 'enclave_listener_error', error: messageOf(error) })
  const onConnection = (socket: Socket) => {
    if (sockets.size >= maxConnections) {
      const reason = `${maxConnections} connections are open`
      throttled.write('connection_refused', { level: 'warn', event: 'connection_refused', reason, maxConnections })
      socket.on('error', () => {})
      // A flood must not hold a descriptor per refusal for a second: past a few lingering at once, no last word.
      if (refusalsLingering >= maxRefusalsLingering) return void socket.destroy()
      // Its last word says why, as for a malformed frame, and lingers as that one does (a reset could overtake it).
      refusalsLingering += 1
      socket.once('close', () => (refusalsLingering -= 1))
      // UNAVAILABLE: nothing on it is read, so the parent may send what it sent here on another connection.
      socket.write(encodeConnectionClosing(encodeErrorMessage(reason), statuses.UNAVAILABLE))
      endLingering(socket, { lingerMs: closingLingerMs, capMs: closingLingerMs })
      return
    }
    sockets.add(socket)
    socket.setNoDelay(true)
    const decoder = new FrameDecoder()
    let inFlight = 0
    /** The most the answers in flight may add to the unsent bytes. */
    let promisedBytes = 0
    /** Decoded requests not yet handed to the service: `waiting[next]` on. */
    let waiting: Frame[] = []
    let next = 0
    let paused = false
    /** Its framing broke: nothing more is read or answered on it. */
    let closing = false
    const unsentBytes = () => socket.writableLength + writer.bufferedBytes
    // With nothing in flight one request always goes, however large its answer may be, unless unsent bytes wait.
    const roomFor = (frame: Frame) =>
      inFlight === 0 ? unsentBytes() < maxUnsentBytes : inFlight < maxRequestsInFlight && unsentBytes() + promisedBytes + largestAnswerBytes(frame.opcode) <= maxUnsentBytes
    /**
     * Hands waiting requests to the service while there is room, then pauses reading while any wait or the bounds
     * are reached. Resumes with half of each bound free, so a connection at a bound does not pause and resume on
     * every answer. Called on every change: a request read, an answer written, a write flushed, a drain.
     */
    const dispatch = () => {
      // Nothing more is handed on for a connection that is gone or closing (its reading is endLingering's now).
      if (closing || socket.destroyed) {
        waiting = []
        next = 0
        return
      }
      while (next < waiting.length && roomFor(waiting[next]!)) {
        const frame = waiting[next++]!
        inFlight += 1
        promisedBytes += largestAnswerBytes(frame.opcode)
        // handle() answers an unknown opcode itself (BAD_REQUEST), so every frame goes through it.
        void options.service.handle(frame).then(
          (answer) => send(frame, answer),
          (error: unknown) => send(frame, answerToFailure(error)),
        )
      }
      if (next === waiting.length && next > 0) {
        waiting = []
        next = 0
      }
      if (next < waiting.length || inFlight >= maxRequestsInFlight || unsentBytes() + promisedBytes >= maxUnsentBytes) {
        if (!paused) {
          paused = true
          socket.pause()
        }
      } else if (paused && inFlight <= maxRequestsInFlight / 2 && unsentBytes() + promisedBytes <= maxUnsentBytes / 2) {
        paused = false
        socket.resume()
      }
    }
    const writer = new CoalescingWriter(socket, dispatch)
    /**
     * Never throws. An answer that cannot be framed (too large, say) is answered INTERNAL instead, and the other
     * requests on the connection go on; one that cannot be written at all closes its own connection.
     */
    const send = (frame: Frame, { status, payload }: Answer) => {
      inFlight -= 1
      promisedBytes -= largestAnswerBytes(frame.opcode)
      if (closing) return
      try {
        let encoded: Uint8Array
        try {
          encoded = encodeFrame({ requestId: frame.requestId, opcode: frame.opcode, status, payload })
        } catch (error) {
          encoded = encodeFrame({ requestId: frame.requestId, opcode: frame.opcode, status: statuses.INTERNAL, payload: encodeErrorMessage(`the answer could not be framed: ${messageOf(error)}`) })
        }
        writer.write(encoded)
      } catch (error) {
        socket.destroy()
        throttled.write('answer_not_written', { level: 'error', event: 'connection_closed', reason: `answer not written: ${messageOf(error)}` })
        return
      }
      dispatch()
    }
    /** No request id can be answered once the framing is lost: one frame for the connection says why, then it ends. */
    const closeSaying = (reason: string) => {
      closing = true
      // Throttled: a peer that opens, sends a bad frame and closes, again and again, must not push real lines out of the log ring.
      throttled.write('connection_closed', { level: 'warn', event: 'connection_closed', reason })
      writer.write(encodeConnectionClosing(encodeErrorMessage(reason)))
      // After this turn's write; what the peer still sends meanwhile is dropped above.
      setImmediate(() => endLingering(socket, { lingerMs: closingLingerMs, capMs: closingLingerMs }))
    }
    socket.on('data', (chunk: Uint8Array) => {
      if (closing) return
      let frames: Frame[]
      try {
        frames = decoder.push(chunk)
      } catch (error) {
        closeSaying(error instanceof FrameError ? error.message : 'bad frame')
        return
      }
      // Its answer would read as the connection's last word: a peer numbering a request so does not speak this protocol.
      if (frames.some((frame) => frame.requestId === connectionRequestId)) {
        closeSaying(`request id ${connectionRequestId} is reserved for the connection`)
        return
      }
      if (frames.length === 0) return
      if (waiting.length === 0) waiting = frames
      else waiting.push(...frames)
      dispatch()
    })
    socket.on('drain', dispatch)
    socket.on('error', () => {})
    socket.on('close', () => sockets.delete(socket))
  }
  const destroyAll = () => {
    for (const socket of sockets) socket.destroy()
  }
  if ('vsock' in options.address) {
    const listener = await listenVsock({ port: options.address.vsock.port, cid: options.address.vsock.cid, onConnection, onError: onListenerError })
    return { close: () => Promise.all([listener.close(), destroyAll()]).then(() => undefined) }
  }
  const server: Server = createServer(onConnection)
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject)
    server.listen(options.address as never, () => {
      server.off('error', reject)
      // Later failures (accept() out of memory, say) are logged: one must not end the process and every connection.
      server.on('error', onListenerError)
      resolve()
    })
  })
  return {
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve())
        destroyAll()
      }),
  }
}
