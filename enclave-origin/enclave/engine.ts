/**
 * SignEngine: secp256k1 signing on a pool of worker threads that each keep
 * one libsecp256k1 context (the native binding holds one per thread).
 * Requests are micro-batched so that under load one postMessage carries up to
 * `maxBatch` signs, while a pool with an idle thread signs at once: a request
 * only waits for company when every thread already has work.
 *
 * When the whole engine is idle, the first few requests of an event-loop turn
 * are signed on the calling thread instead (`inlinePerTurn`). One native sign
 * costs less than the two thread hand-offs it saves, and on a busy host each
 * hand-off is a thread wake-up that can wait for a CPU. A turn that brings
 * more requests than that is load, and the next turn then signs nothing
 * inline: under load the calling thread has frames to read and answers to
 * write, and signing there delays them while the threads sit idle. (In four
 * benchmark runs directly on the enclave at 60% of capacity, p99 was 12–24 ms
 * with inline signing off and 16–65 ms with it on.) Light turns bring it back.
 */
import { availableParallelism } from 'node:os'
import type { Readable } from 'node:stream'
import { Worker } from 'node:worker_threads'
import { FailureBackoff } from '../failureBackoff.js'
import { waitAtMost } from '../waitAtMost.js'
import { batchSizeBuckets, countInto, emptyCounts } from '../protocol/histograms.js'
import type { RawSignature } from '../types.js'
import { secp256k1 } from './nativeSecp256k1.js'

export type SignEngineOptions = {
  /** Worker threads; default `os.availableParallelism()`. */
  threads?: number
  /** Most requests per worker message; default 32. */
  maxBatch?: number
  /** How long a batch waits for company after its first request; default 1 ms. */
  maxWaitMs?: number
  /** `false` sends every request on its own (the benchmark's A/B switch); default true. */
  batching?: boolean
  /**
   * Most requests signed on the calling thread per event-loop turn while no
   * thread has work, and only after a turn that brought no more requests than
   * this; 0 never; default 4.
   */
  inlinePerTurn?: number
  /**
   * Where the threads' output through `process.stdout` and `process.stderr` goes (console, Node's warnings), a line
   * at a time: plain text on stderr would break a log pipeline that reads JSON lines. Unset, it goes to this
   * process's as it is. Writes to the file descriptors themselves (a native library's) still go out as they are.
   */
  log?: (fields: Record<string, unknown>) => void
}

export type SignRequest = {
  /** 32 bytes, read before sign() returns (copied into a batch, or signed with in place) and never written: the key cache owns it. */
  privateKey: Uint8Array
  digest: Uint8Array
}

export type SignEngineStats = {
  threads: number
  /** Requests a worker holds and has not answered. */
  inflight: number
  /** Requests waiting in the open batch. */
  queued: number
  /** Worker messages sent so far. */
  batches: number
  /** Signs those messages carried (the batch-size histogram's sum). */
  batchedSigns: number
  meanBatchSize: number
  /** Messages per batch size: counts for each upper bound of `batchSizeBuckets`, the last counting everything above. */
  batchSizes: number[]
  /** Requests signed on the calling thread so far. */
  inline: number
}

/**
 * One slot per request in a batch's buffer. In: key ‖ digest. Out: the worker
 * zeroes both and writes signature(64) ‖ recid ‖ status over them. The worker
 * receives this object as workerData, so this is the layout's one definition.
 */
const slotLayout = {
  slotBytes: 66,
  keyAt: 0,
  digestAt: 32,
  recidAt: 64,
  statusAt: 65,
  statusSigned: 1,
  statusRefused: 2,
} as const

type Pending = { resolve: (signature: RawSignature) => void; reject: (error: Error) => void }

/**
 * Requests packed into one buffer shared with the thread that signs them: the thread zeroes each key as it signs it,
 * and should it die first, this thread zeroes what it left (a transferred buffer would go with it, keys and all,
 * into freed memory).
 */
type Batch = { buffer: SharedArrayBuffer; bytes: Uint8Array; requests: Pending[]; timer?: NodeJS.Timeout }

type WorkerSlot = {
  worker: Worker
  /** Batches sent and not yet answered, by batchId. */
  inflight: Map<number, Batch>
  inflightRequests: number
  ready: boolean
  /** Set when the engine asks it to close, so its exit is not taken for a crash. */
  retiring: boolean
  exited: Promise<number>
  /** Once all it wrote has been logged (the last of it arrives after its exit). */
  outputLogged: Promise<void>
  lastError?: Error
}

type State = 'new' | 'starting' | 'running' | 'stopping' | 'stopped'

export class SignEngine {
  private readonly threads: number
  private readonly maxBatch: number
  private readonly maxWaitMs: number
  private readonly batching: boolean
  private readonly inlinePerTurn: number
  private readonly log: SignEngineOptions['log']
  /** Inline signs left in this event-loop turn; set for the next one when the turn ends. */
  private inlineLeft: number
  /** sign() calls in this event-loop turn so far; a setImmediate ends the turn. */
  private turnRequests = 0
  private inlineSigned = 0
  private state: State = 'new'
  private slots: WorkerSlot[] = []
  private open: Batch | undefined
  private nextBatchId = 0
  private nextSlot = 0
  private batchesSent = 0
  private requestsSent = 0
  private readonly batchSizes = emptyCounts(batchSizeBuckets)
  private starting: Promise<void> | undefined
  private stopping: Promise<void> | undefined
  private onDrained: (() => void) | undefined
  /** What each thread runs (a test swaps in one that fails to start). */
  private workerScript = new URL('./signWorker.mjs', import.meta.url)
  /** Replacing a dead thread again after the replacement failed to start: 0.5 s doubling to 30 s. */
  private readonly respawnBackoff = new FailureBackoff({ now: () => performance.now(), random: Math.random })
  private respawnTimer: ReturnType<typeof setTimeout> | undefined

  constructor(options: SignEngineOptions = {}) {
    this.threads = positiveInteger('threads', options.threads ?? availableParallelism())
    this.maxBatch = positiveInteger('maxBatch', options.maxBatch ?? 32)
    this.maxWaitMs = options.maxWaitMs ?? 1
    if (!(this.maxWaitMs >= 0)) throw new RangeError(`maxWaitMs must be >= 0, got ${this.maxWaitMs}`)
    this.batching = options.batching ?? true
    this.inlinePerTurn = options.inlinePerTurn ?? 4
    if (!Number.isInteger(this.inlinePerTurn) || this.inlinePerTurn < 0) throw new RangeError(`inlinePerTurn must be a non-negative integer, got ${this.inlinePerTurn}`)
    this.inlineLeft = this.inlinePerTurn
    this.log = options.log
  }

  /** Spawns the threads and resolves once each has loaded the native binding (so a missing build fails here). */
  start(): Promise<void> {
    if (this.state === 'stopping' || this.state === 'stopped') {
      return Promise.reject(new Error('SignEngine was stopped; create a new one'))
    }
    this.starting ??= this.spawnAll()
    return this.starting
  }

  /** Lets in-flight and queued requests finish, then ends the threads. New sign() calls reject from the moment it is called. */
  stop(): Promise<void> {
    this.stopping ??= this.drainAndClose()
    return this.stopping
  }

  sign(request: SignRequest): Promise<RawSignature> {
    if (this.state !== 'running') {
      return Promise.reject(new Error(`SignEngine is ${this.state === 'new' || this.state === 'starting' ? 'not started' : 'stopped'}; sign() refused`))
    }
    const { privateKey, digest } = request
    if (!(privateKey instanceof Uint8Array) || privateKey.length !== 32) {
      return Promise.reject(new TypeError('privateKey must be a 32-byte Uint8Array'))
    }
    if (!(digest instanceof Uint8Array) || digest.length !== 32) {
      return Promise.reject(new TypeError('digest must be a 32-byte Uint8Array'))
    }
    if (this.inlinePerTurn > 0 && this.turnRequests++ === 0) setImmediate(this.endTurn)
    if (this.inlineLeft > 0 && this.idle()) return this.signInline(privateKey, digest)
    return new Promise((resolve, reject) => this.enqueue({ privateKey, digest, pending: { resolve, reject } }))
  }

  /** No thread holds a request and none waits in a batch. */
  private idle(): boolean {
    return this.open === undefined && this.slots.every((slot) => slot.inflightRequests === 0)
  }

  /** Signs on this thread, with its own blinded libsecp256k1 context; the key is read in place, never copied. */
  private signInline(privateKey: Uint8Array, digest: Uint8Array): Promise<RawSignature> {
    this.inlineLeft -= 1
    const signature = new Uint8Array(64)
    try {
      const { recid } = secp256k1.ecdsaSign(digest, privateKey, {}, signature)
      this.inlineSigned++
      return Promise.resolve({ signature, recoveryId: recid })
    } catch {
      return Promise.reject(new Error(refusedKeyMessage))
    }
  }

  /** A turn with more requests than the inline allowance is load: the next turn leaves all signing to the threads. */
  private readonly endTurn = (): void => {
    this.inlineLeft = this.turnRequests > this.inlinePerTurn ? 0 : this.inlinePerTurn
    this.turnRequests = 0
  }

  stats(): SignEngineStats {
    let inflight = 0
    for (const slot of this.slots) inflight += slot.inflightRequests
    return {
      threads: this.slots.length,
      inflight,
      queued: this.open?.requests.length ?? 0,
      batches: this.batchesSent,
      batchedSigns: this.requestsSent,
      meanBatchSize: this.batchesSent === 0 ? 0 : this.requestsSent / this.batchesSent,
      batchSizes: [...this.batchSizes],
      inline: this.inlineSigned,
    }
  }

  private enqueue(request: { privateKey: Uint8Array; digest: Uint8Array; pending: Pending }): void {
    const idle = this.open === undefined ? this.slots.find((slot) => slot.ready && slot.inflightRequests === 0) : undefined
    if (!this.batching || idle !== undefined) {
      const alone = newBatch(1)
      pack({ batch: alone, ...request })
      this.send(alone, idle)
      return
    }
    this.open ??= newBatch(this.maxBatch)
    const batch = this.open
    pack({ batch, ...request })
    if (batch.requests.length === this.maxBatch) this.flushOpen()
    else if (batch.requests.length === 1) batch.timer = setTimeout(() => this.flushOpen(), this.maxWaitMs)
  }

  private flushOpen(): void {
    const batch = this.open
    if (batch === undefined) return
    this.open = undefined
    clearTimeout(batch.timer)
    this.send(batch)
  }

  /** Hands the batch to a thread; the buffer is shared, not copied. */
  private send(batch: Batch, to: WorkerSlot | undefined = this.leastLoaded()): void {
    if (to === undefined) {
      batch.bytes.fill(0)
      for (const pending of batch.requests) pending.reject(new Error('SignEngine has no live signing thread'))
      return
    }
    const batchId = this.nextBatchId++
    to.inflight.set(batchId, batch)
    to.inflightRequests += batch.requests.length
    this.batchesSent += 1
    this.requestsSent += batch.requests.length
    countInto(this.batchSizes, batchSizeBuckets, batch.requests.length)
    to.worker.postMessage({ batchId, count: batch.requests.length, buffer: batch.buffer })
  }

  /**
   * The thread with the fewest in flight (ties go round-robin, so equal threads share the work), a ready one
   * before one still starting: a replacement that is starting may yet fail, and take what it was sent with it.
   * With none ready, work waits for the one starting.
   */
  private leastLoaded(): WorkerSlot | undefined {
    let best: WorkerSlot | undefined
    for (let i = 0; i < this.slots.length; i++) {
      const slot = this.slots[(this.nextSlot + i) % this.slots.length]!
      const better = best === undefined || (slot.ready && !best.ready) || (slot.ready === best.ready && slot.inflightRequests < best.inflightRequests)
      if (better) best = slot
    }
    this.nextSlot = (this.nextSlot + 1) % Math.max(this.slots.length, 1)
    return best
  }

  private answer(slot: WorkerSlot, reply: { batchId: number }): void {
    const batch = slot.inflight.get(reply.batchId)
    if (batch === undefined) return
    slot.inflight.delete(reply.batchId)
    slot.inflightRequests -= batch.requests.length
    batch.requests.forEach((pending, i) => settle(pending, batch.bytes, i * slotLayout.slotBytes))
    // A thread that just went idle takes the open batch now rather than after maxWaitMs.
    if (slot.inflightRequests === 0 && this.open !== undefined) this.flushOpen()
    this.checkDrained()
  }

  private async spawnAll(): Promise<void> {
    this.state = 'starting'
    const readies: Promise<void>[] = []
    try {
      // Inside the try: a thread the OS cannot create throws here, and the ones started before it are retired.
      for (let i = 0; i < this.threads; i++) readies.push(this.spawn())
      await Promise.all(readies)
    } catch (error) {
      this.state = 'stopped'
      await Promise.all(this.slots.map((slot) => retire(slot)))
      this.slots = []
      throw error
    }
    this.state = 'running'
    // A thread that became ready and then died while the others started was not replaced then (replace() waits for
    // 'running'): the pool would stay one short for good.
    for (let missing = this.threads - this.slots.length; missing > 0; missing--) this.replace()
  }

  /** Starts one thread; resolves when it has loaded the binding, rejects if it exits first. */
  private spawn(): Promise<void> {
    const log = this.log
    const worker = new Worker(this.workerScript, { workerData: slotLayout, stdout: log !== undefined, stderr: log !== undefined })
    const outputLogged = log
      ? Promise.all(([[worker.stdout, 'stdout'], [worker.stderr, 'stderr']] as const).map(([stream, from]) => logLinesOf({ stream, from, log }))).then(() => {})
      : Promise.resolve()
    const exited = new Promise<number>((resolve) => worker.once('exit', resolve))
    const slot: WorkerSlot = { worker, inflight: new Map(), inflightRequests: 0, ready: false, retiring: false, exited, outputLogged }
    this.slots.push(slot)
    return new Promise((resolve, reject) => {
      worker.on('message', (message: { ready: true } | { batchId: number }) => {
        if ('ready' in message) {
          slot.ready = true
          resolve()
        } else this.answer(slot, message)
      })
      worker.on('error', (error) => {
        slot.lastError = error
      })
      // A reply that cannot be read would leave its batch unanswered for good, and which batch it was is not
      // said: the thread is given up on, its requests fail, and another takes its place. It is closed, not
      // terminated (see retire), once it has finished what it holds; its late replies are dropped.
      worker.on('messageerror', (error) => {
        slot.lastError = error
        if (slot.retiring) return
        void retire(slot)
        this.lose(slot, `a reply from the signing thread could not be read: ${error.message}`, { runs: true })
      })
      worker.on('exit', (code) => {
        if (!slot.ready) reject(new Error(`signing thread failed to start (exit ${code})`, { cause: slot.lastError }))
        // A thread that exits on its own takes its in-flight requests with it.
        if (!slot.retiring) this.lose(slot, `signing thread exited (code ${code})${slot.lastError ? `: ${slot.lastError.message}` : ''}`)
      })
    })
  }

  /**
   * A thread gone, or given up on while it still `runs`: the keys of its in-flight batches are zeroed (it did not
   * get to them, or died first), and their requests fail with `reason`; one that had ever worked is replaced.
   */
  private lose(slot: WorkerSlot, reason: string, { runs = false } = {}): void {
    this.slots = this.slots.filter((live) => live !== slot)
    const batches = [...slot.inflight.values()]
    const zero = () => {
      for (const batch of batches) batch.bytes.fill(0)
    }
    // One still running may be signing them: a key zeroed between libsecp256k1's reads of it would make the nonce
    // from zeros, and the signature, left in memory, would give the key away. Zeroed once it has stopped, then.
    if (runs) void slot.exited.then(zero)
    else zero()
    for (const batch of batches) {
      for (const pending of batch.requests) pending.reject(new Error(reason, { cause: slot.lastError }))
    }
    slot.inflight.clear()
    slot.inflightRequests = 0
    // A replacement that never became ready is retried by replace(), after a backoff: at once, it would fail the same way.
    if (slot.ready) this.replace()
    this.checkDrained()
  }

  /** Starts a thread in place of a dead one, trying again with a backoff until one starts: else the pool would shrink for good. */
  private replace(): void {
    if (this.state !== 'running') return
    // Through a promise: a thread the OS cannot create throws from new Worker(), and that is a failure to retry too.
    Promise.resolve()
      .then(() => this.spawn())
      .then(
        () => this.respawnBackoff.succeeded(),
        () => {
          if (this.state !== 'running') return
          this.respawnTimer = setTimeout(() => this.replace(), this.respawnBackoff.failed())
          this.respawnTimer.unref()
        },
      )
  }

  private async drainAndClose(): Promise<void> {
    if (this.state === 'new') {
      this.state = 'stopped'
      return
    }
    await this.starting?.catch(() => undefined)
    this.state = 'stopping'
    clearTimeout(this.respawnTimer)
    this.flushOpen()
    if (this.stats().inflight > 0) await new Promise<void>((resolve) => (this.onDrained = resolve))
    await Promise.all(this.slots.map((slot) => retire(slot)))
    this.slots = []
    this.state = 'stopped'
  }

  private checkDrained(): void {
    if (this.onDrained !== undefined && this.stats().inflight === 0) {
      this.onDrained()
      this.onDrained = undefined
    }
  }
}

const refusedKeyMessage = 'libsecp256k1 refused to sign: invalid private key (zero or not below the curve order)'

function newBatch(capacity: number): Batch {
  const buffer = new SharedArrayBuffer(capacity * slotLayout.slotBytes)
  return { buffer, bytes: new Uint8Array(buffer), requests: [] }
}

/** Copies the key and digest into the batch's next slot. */
function pack(args: { batch: Batch; privateKey: Uint8Array; digest: Uint8Array; pending: Pending }): void {
  const { batch, privateKey, digest, pending } = args
  const at = batch.requests.length * slotLayout.slotBytes
  batch.bytes.set(privateKey, at + slotLayout.keyAt)
  batch.bytes.set(digest, at + slotLayout.digestAt)
  batch.requests.push(pending)
}

function settle(pending: Pending, bytes: Uint8Array, at: number): void {
  const status = bytes[at + slotLayout.statusAt]
  if (status === slotLayout.statusSigned) {
    // slice, not subarray: each caller gets its own bytes, not a window onto the batch.
    pending.resolve({ signature: bytes.slice(at, at + 64), recoveryId: bytes[at + slotLayout.recidAt]! })
  } else if (status === slotLayout.statusRefused) {
    pending.reject(new Error(refusedKeyMessage))
  } else {
    pending.reject(new Error(`signing thread returned unknown slot status ${status}`))
  }
}

/**
 * Asks the thread to close after what it already holds, and waits for it.
 * Never `worker.terminate()`: interrupting a thread inside the native binding
 * aborts the whole process (node-addon-api throws a C++ exception nobody catches).
 */
async function retire(slot: WorkerSlot): Promise<void> {
  slot.retiring = true
  slot.worker.postMessage({ close: true })
  await slot.exited
  // Its last lines, but not for ever: a stream that never ends must not hold a stop up.
  await waitAtMost(slot.outputLogged, { ms: 1_000 })
}

function positiveInteger(name: string, value: number): number {
  if (!Number.isInteger(value) || value < 1) throw new RangeError(`${name} must be a positive integer, got ${value}`)
  return value
}

/**
 * Each line a thread writes to `from` as a log line, cut to its first 500 characters: a thread that never ends a line
 * costs no more memory than that. Resolves once the stream has ended, its last line (ended or not) logged.
 */
function logLinesOf(options: { stream: Readable; from: 'stdout' | 'stderr'; log: NonNullable<SignEngineOptions['log']> }): Promise<void> {
  const { stream, from, log } = options
  const maxChars = 500
  let pending = ''
  const write = (line: string) => {
    const text = line.endsWith('\r') ? line.slice(0, -1) : line
    if (text.trim() !== '') log({ level: 'warn', event: 'signing_thread_output', stream: from, text })
  }
  stream.setEncoding('utf8')
  stream.on('data', (chunk: string) => {
    const lines = chunk.split('\n')
    const last = lines.pop()!
    for (const line of lines) {
      write((pending + line).slice(0, maxChars))
      pending = ''
    }
    pending = (pending + last).slice(0, maxChars)
  })
  return new Promise((resolve) => {
    stream.once('close', () => {
      write(pending)
      resolve()
    })
  })
}
