import type { Socket } from 'node:net'
import type { StreamAddress } from '../config.js'
import { FailureBackoff } from '../failureBackoff.js'
import { CoalescingWriter } from '../protocol/coalescingWriter.js'
import { connectStream } from '../protocol/connectStream.js'
import { encodeFrame, FrameDecoder, FrameError, isConnectionClosing, statuses, type Frame, type Opcode } from '../protocol/frames.js'
import { decodeErrorMessage } from '../protocol/messages.js'

/** Where an enclave listens: vsock in production, TCP or a Unix socket elsewhere. */
export type EnclaveAddress = StreamAddress

type RequestOptions = {
  opcode: Opcode
  payload: Uint8Array
  timeoutMs: number
  /**
   * Set only on a request sent again after a refused connection (see `EnclaveConnection`'s `sendElsewhere`): it
   * keeps its first send's deadline (monotonic ms), so the wait on the refused connection counts, and it is not sent
   * again a second time.
   */
  deadline?: number
}
type Pending = { resolve: (frame: Frame) => void; reject: (error: Error) => void; timer: ReturnType<typeof setTimeout>; options: RequestOptions; deadline: number }

/** The enclave did not answer, or the connection to it broke. */
export class EnclaveUnavailableError extends Error {}

/** One long-lived connection carrying many requests at once, matched to answers by request id. */
class EnclaveConnection {
  private readonly pending = new Map<number, Pending>()
  private readonly decoder = new FrameDecoder()
  private readonly writer: CoalescingWriter
  private nextId = 1
  /** Reads so far: a connection that read nothing since a request that timed out is stuck, not busy. A count, not a clock: no time read per read. */
  private reads = 0
  /**
   * What its requests fail with when it closes, when more is known than that it closed: the enclave's reason (a
   * frame of ours it could not read, its connection limit), or this parent's for dropping it (an answer it cannot
   * have been sent).
   */
  private closeMessage: string | undefined

  /** An answer to one of its requests has come. */
  private answered = false
  /** The enclave refused it as it arrived and read nothing on it (see `connectionRequestId`). */
  private unread = false

  /**
   * `onFirstAnswer`: the enclave has answered a request on it. `onClose(refused)`: it closed before the enclave
   * answered anything on it, with a last word or without (as one at its connection limit closes new ones, some
   * silently, some before a request goes on them). `sendElsewhere`: a request it sent on a connection the enclave
   * read nothing on (it refused it), to go on another.
   */
  constructor(
    private readonly socket: Socket,
    { onFirstAnswer, onClose, sendElsewhere }: { onFirstAnswer: () => void; onClose: (refused: boolean) => void; sendElsewhere: (options: RequestOptions) => Promise<Frame> },
  ) {
    socket.setNoDelay(true)
    this.writer = new CoalescingWriter(socket)
    socket.on('data', (chunk: Uint8Array) => {
      this.reads += 1
      let frames: Frame[]
      let framingLost = false
      try {
        frames = this.decoder.push(chunk)
      } catch (error) {
        // The answers before the bad bytes are answers all the same: a sign made there must not be made again elsewhere.
        frames = error instanceof FrameError ? error.framesBefore : []
        framingLost = true
      }
      for (const frame of frames) {
        if (isConnectionClosing(frame)) {
          // The enclave's last word here: nothing more will be answered, so its requests fail now with the reason (or,
          // when it read nothing here, go on another connection).
          this.closeMessage = `the enclave closed the connection: ${readableReason(frame.payload)}`
          this.unread = frame.status === statuses.UNAVAILABLE
          socket.destroy()
          return
        }
        const waiting = this.pending.get(frame.requestId)
        if (!waiting) continue
        // An answer to another opcode under this id: the two sides no longer agree on what is in flight here, so
        // nothing more on this connection is trusted (its requests fail, as for lost framing).
        if (frame.opcode !== waiting.options.opcode) {
          this.closeMessage = `connection to the enclave dropped: it answered request ${frame.requestId} with opcode ${frame.opcode}, not ${waiting.options.opcode}`
          socket.destroy()
          return
        }
        if (!this.answered) {
          this.answered = true
          onFirstAnswer()
        }
        this.pending.delete(frame.requestId)
        clearTimeout(waiting.timer)
        waiting.resolve(frame)
      }
      if (framingLost) socket.destroy()
    })
    socket.on('error', () => {})
    socket.on('close', () => {
      const message = this.closeMessage ?? 'connection to the enclave closed'
      // First, so that a request sent again below finds the refill held back: else each refusal would open one more.
      // Idle ones count too, unless a newer connection has answered since they opened (see the pool's `adopt`).
      onClose(!this.answered)
      for (const waiting of this.pending.values()) {
        clearTimeout(waiting.timer)
        // Never read there: sent again on another connection, once (a request refused twice fails as refused).
        if (this.unread && waiting.options.deadline === undefined) sendElsewhere({ ...waiting.options, deadline: waiting.deadline }).then(waiting.resolve, waiting.reject)
        else waiting.reject(new EnclaveUnavailableError(message))
      }
      this.pending.clear()
    })
  }

  /**
   * From the moment it is destroyed (the enclave's last word, a frame that would not decode, a request timed out on
   * a silent connection), not from its close, which comes later: a request sent in between would only fail then.
   */
  get closed(): boolean {
    return this.socket.destroyed
  }

  get inflight(): number {
    return this.pending.size
  }

  /** A write for this turn is already scheduled: another frame joins it at no extra syscall. */
  get writeQueued(): boolean {
    return this.writer.queued
  }

  close(): void {
    this.socket.destroy()
  }

  request(options: RequestOptions): Promise<Frame> {
    // Ids wrap after 2^32 − 1 (0 is the connection's own); one still waiting is skipped, never replaced.
    let requestId = this.nextId
    while (this.pending.has(requestId)) requestId = requestId === 0xffffffff ? 1 : requestId + 1
    this.nextId = requestId === 0xffffffff ? 1 : requestId + 1
    // Encoded first: a frame that cannot be encoded leaves nothing pending.
    const frame = encodeFrame({ requestId, opcode: options.opcode, status: 0, payload: options.payload })
    const readsAtSend = this.reads
    const now = performance.now()
    const deadline = options.deadline ?? now + options.timeoutMs
    return new Promise<Frame>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(requestId)
        reject(new EnclaveUnavailableError(`the enclave did not answer within ${options.timeoutMs} ms`))
        // Nothing at all came back since: the pool would keep choosing this idle-looking connection, so a new one replaces it.
        // Judged after this turn's input is read: a stalled event loop runs timers before reading answers already here.
        // Not for a request sent again, whose wait here may have been too short to judge by.
        if (options.deadline === undefined)
          setImmediate(() => {
            if (this.reads === readsAtSend) this.socket.destroy()
          })
      }, deadline - now)
      this.pending.set(requestId, { resolve, reject, timer, options, deadline })
      this.writer.write(frame)
    })
  }
}

/** The enclave's reason, or a note that it gave one this parent cannot read. */
function readableReason(payload: Uint8Array): string {
  try {
    return decodeErrorMessage(payload)
  } catch {
    return 'a reason this parent cannot read'
  }
}

/**
 * A small pool (16–32) of long-lived connections to one enclave. The requests
 * of one event-loop turn share a connection, so that they leave in one write
 * and the enclave reads and answers them together; each turn takes the
 * connection with the fewest in flight. A broken connection is replaced, and
 * its in-flight requests fail at once rather than hang. Refilling a slot in
 * the background, while live connections carry the load, backs off after
 * failed connects (0.5 s doubling to 30 s), and after connections that closed
 * before the enclave answered anything on them (with its last word or
 * silently), so an enclave that refuses new connections is not asked again
 * every turn. A new connection's first answer ends the hold; closes of
 * connections opened before it do not count.
 */
export class EnclavePool {
  private readonly connections: Array<EnclaveConnection | undefined>
  private opening: Array<Promise<EnclaveConnection> | undefined>
  /** The connection this turn's requests go on, while its write is still queued. */
  private sending: EnclaveConnection | undefined
  private stopped = false
  private readonly refillBackoff: FailureBackoff
  /** Connections that have answered, so far: a close counts against refills only if none has since it opened. */
  private firstAnswers = 0

  constructor(
    private readonly options: {
      address: EnclaveAddress
      size: number
      /** Times the refill backoff; default monotonic time. */
      clock?: { now: () => number; random: () => number }
      /** Opens one connection; default `connectStream` (tests count the attempts). */
      connect?: (address: EnclaveAddress) => Promise<Socket>
    },
  ) {
    this.connections = Array.from({ length: options.size }, () => undefined)
    this.opening = Array.from({ length: options.size }, () => undefined)
    this.refillBackoff = new FailureBackoff(options.clock ?? { now: () => performance.now(), random: Math.random })
  }

  /** The slot's connection, opened unless it holds a live one already (an earlier request may have opened it). */
  private open(slot: number): Promise<EnclaveConnection> {
    const live = this.connections[slot]
    if (live && !live.closed) return Promise.resolve(live)
    this.opening[slot] ??= (this.options.connect ?? connectStream)(this.options.address)
      .then(
        (socket) => this.adopt(slot, socket),
        (error: Error) => {
          throw new EnclaveUnavailableError(`cannot connect to the enclave: ${error.message}`)
        },
      )
      .finally(() => {
        this.opening[slot] = undefined
      })
    return this.opening[slot]!
  }

  private adopt(slot: number, socket: Socket): EnclaveConnection {
    // Opened after close(): nothing will close it later.
    if (this.stopped) {
      socket.destroy()
      throw new EnclaveUnavailableError('the pool is stopped')
    }
    const answersAtOpen = this.firstAnswers
    const connection = new EnclaveConnection(socket, {
      // A connect is no success until the enclave answers on it: one at its connection limit takes connections and
      // closes them at once, and refilling against that must back off as against a refused connect.
      onFirstAnswer: () => {
        this.firstAnswers += 1
        this.refillBackoff.succeeded()
      },
      onClose: (refused) => {
        if (this.connections[slot] === connection) this.connections[slot] = undefined
        // One opened before the enclave last answered on a new connection says nothing of it now (an idle one from
        // before a restart, say, whose close comes late): it must not hold refills back again.
        if (refused && !this.stopped && answersAtOpen === this.firstAnswers) this.refillBackoff.failed()
      },
      sendElsewhere: (options) => this.request(options),
    })
    this.connections[slot] = connection
    return connection
  }

  /** Opens every connection (call at start, so the first requests do not pay for it). */
  async connect(): Promise<void> {
    await Promise.all(this.connections.map((_, slot) => this.open(slot)))
  }

  async request(options: RequestOptions): Promise<Frame> {
    if (this.stopped) throw new EnclaveUnavailableError('the pool is stopped')
    const sending = this.sending
    if (sending && !sending.closed && sending.writeQueued) return sending.request(options)
    let best: EnclaveConnection | undefined
    let emptySlot = -1
    this.connections.forEach((connection, slot) => {
      if (!connection || connection.closed) emptySlot = slot
      else if (!best || connection.inflight < best.inflight) best = connection
    })
    if (!best) best = await this.open(emptySlot)
    // Every live connection is busy: refill an empty slot for the turns to come, but send on a live one now, so
    // that an enclave refusing new connections for a moment fails no request its open ones can carry.
    else if (best.inflight > 0 && emptySlot >= 0) this.refill(emptySlot)
    this.sending = best
    return best.request(options)
  }

  private refill(slot: number): void {
    if (this.opening[slot] || this.refillBackoff.holding) return
    this.open(slot).catch(() => {
      if (!this.stopped) this.refillBackoff.failed()
    })
  }

  get inflight(): number {
    return this.connections.reduce((sum, c) => sum + (c?.inflight ?? 0), 0)
  }

  close(): void {
    this.stopped = true
    for (const connection of this.connections) connection?.close()
  }
}
