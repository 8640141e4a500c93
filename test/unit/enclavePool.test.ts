import { createServer, type Server, type Socket } from 'node:net'
import { afterEach, beforeEach, describe, expect, it } from 'vitest'
import { EnclavePool, EnclaveUnavailableError, type EnclaveAddress } from '../../enclave-origin/parent/enclavePool.js'
import { connectStream } from '../../enclave-origin/protocol/connectStream.js'
import { connectionRequestId, encodeFrame, FrameDecoder, opcodes, statuses, type Frame } from '../../enclave-origin/protocol/frames.js'
import { emptyPayload, encodeErrorMessage } from '../../enclave-origin/protocol/messages.js'

/**
 * The parent's connection pool against a real TCP server that records which
 * connection each frame arrived on, and answers only when the test says so.
 */

/** The port the server was given (it listens on port 0: any free one). */
let port: number
let server: Server
let sockets: Socket[]
/** Frames received, with the index of the connection and the read (chunk) they came in. */
let received: Array<{ connection: number; chunk: number; frame: Frame; socket: Socket }>
let chunks: number
let pool: EnclavePool | undefined

beforeEach(async () => {
  sockets = []
  received = []
  chunks = 0
  server = createServer((socket) => {
    const connection = sockets.push(socket) - 1
    const decoder = new FrameDecoder()
    socket.on('data', (data: Uint8Array) => {
      const chunk = chunks++
      for (const frame of decoder.push(data)) received.push({ connection, chunk, frame, socket })
    })
    socket.on('error', () => {})
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  port = (server.address() as { port: number }).port
})

afterEach(async () => {
  pool?.close()
  pool = undefined
  for (const socket of sockets) socket.destroy()
  await new Promise((resolve) => server.close(resolve))
})

const answerAll = () => {
  for (const { frame, socket } of received.splice(0)) socket.write(encodeFrame({ requestId: frame.requestId, opcode: frame.opcode, status: 0, payload: emptyPayload }))
}
const until = async (check: () => boolean) => {
  for (let i = 0; i < 200 && !check(); i++) await new Promise((resolve) => setTimeout(resolve, 5))
  expect(check()).toBe(true)
}
const health = (timeoutMs = 5_000) => pool!.request({ opcode: opcodes.HEALTH, payload: emptyPayload, timeoutMs })
/** A pool of one connection with two HEALTH requests out on it, and the first as the server read it. */
const twoOutOnOneConnection = async () => {
  pool = new EnclavePool({ address: { host: '127.0.0.1', port }, size: 1 })
  await pool.connect()
  const requests = [health(), health()] as const
  await until(() => received.length === 2)
  return { requests, first: received.splice(0)[0]! }
}
/** A pool of two at `at` whose refill backoff runs on a clock the test sets, counting its connects. */
const countingPool = (at: number) => {
  let now = 0
  let connects = 0
  const connect = (address: EnclaveAddress) => (connects++, connectStream(address))
  pool = new EnclavePool({ address: { host: '127.0.0.1', port: at }, size: 2, clock: { now: () => now, random: () => 0.5 }, connect })
  return { pool, connects: () => connects, setClock: (ms: number) => void (now = ms) }
}
/**
 * An enclave that serves its first connection (its frames go to `received`) and hands every later one to `refuse`:
 * at once, or as the connection's first bytes arrive. `connections` counts them; setting it to 1 refuses the next.
 */
const servingFirstOnly = async (refuse: (socket: Socket) => void, when: 'at once' | 'on its first bytes') => {
  const counted = { connections: 0 }
  const enclave = createServer((socket) => {
    socket.on('error', () => {})
    const connection = counted.connections++
    if (connection >= 1 && when === 'at once') return refuse(socket)
    const decoder = new FrameDecoder()
    socket.on('data', (data: Uint8Array) => {
      if (connection >= 1) return refuse(socket)
      for (const frame of decoder.push(data)) received.push({ connection, chunk: 0, frame, socket })
    })
  })
  await new Promise<void>((resolve) => enclave.listen(0, '127.0.0.1', resolve))
  return Object.assign(counted, { server: enclave, port: (enclave.address() as { port: number }).port })
}
/** One request a turn, `turns` of them, each waited for at the server (where `received` held `before` already). */
const busyTurns = async (turns: number, before: number) => {
  const answers: Array<Promise<Frame>> = []
  for (let turn = 0; turn < turns; turn++) {
    answers.push(health())
    await until(() => received.length === before + turn + 1)
  }
  return answers
}

describe('EnclavePool', () => {
  it('fails the requests of a connection the enclave gave up on at its last word, with its reason, and sends no more there', async () => {
    pool = new EnclavePool({ address: { host: '127.0.0.1', port }, size: 1 })
    await pool.connect()
    const pending = health()
    await until(() => received.length === 1)
    // The reason alone, the connection still open (its end still to come).
    received[0]!.socket.write(encodeFrame({ requestId: connectionRequestId, opcode: 0, status: statuses.BAD_REQUEST, payload: encodeErrorMessage('frame declares 7 bytes, more than the 6-byte limit') }))
    await expect(pending).rejects.toThrow(new EnclaveUnavailableError('the enclave closed the connection: frame declares 7 bytes, more than the 6-byte limit'))
    // The next request goes on a new connection, and is answered there.
    const next = health()
    await until(() => received.length === 2)
    expect(received[1]!.connection).toBe(1)
    answerAll()
    expect((await next).status).toBe(0)
    // A connection that closes with nothing said fails its requests with the plain reason.
    const last = health()
    await until(() => received.length === 1)
    received[0]!.socket.end()
    await expect(last).rejects.toThrow(new EnclaveUnavailableError('connection to the enclave closed'))
  })

  it('sends nothing more on a connection from the moment the enclave gives it up, before it has closed', async () => {
    pool = new EnclavePool({ address: { host: '127.0.0.1', port }, size: 2 })
    await pool.connect()
    const pending = health()
    await until(() => received.length === 1)
    const { frame, socket } = received.splice(0)[0]!
    // An answer and the enclave's last word in one read: the answer's caller asks again before the connection's close comes.
    socket.write(Buffer.concat([encodeFrame({ requestId: frame.requestId, opcode: frame.opcode, status: 0, payload: emptyPayload }), encodeFrame({ requestId: connectionRequestId, opcode: 0, status: statuses.BAD_REQUEST, payload: encodeErrorMessage('going away') })]))
    const next = pending.then(() => health())
    await until(() => received.length === 1)
    expect(received[0]!.socket).not.toBe(socket)
    answerAll()
    expect((await next).status).toBe(0)
  })

  it('spreads requests from different turns over the connections with the fewest in flight', async () => {
    pool = new EnclavePool({ address: { host: '127.0.0.1', port }, size: 4 })
    await pool.connect()
    const answers: Array<Promise<Frame>> = []
    for (let turn = 0; turn < 4; turn++) {
      answers.push(health())
      await until(() => received.length === turn + 1)
    }
    expect(new Set(received.map((r) => r.connection)).size).toBe(4)
    answerAll()
    await Promise.all(answers)
  })

  it('sends the requests of one turn on one connection, in one write', async () => {
    pool = new EnclavePool({ address: { host: '127.0.0.1', port }, size: 4 })
    await pool.connect()
    const answers = Array.from({ length: 10 }, () => health())
    await until(() => received.length === 10)
    expect(new Set(received.map((r) => r.connection)).size).toBe(1)
    expect(new Set(received.map((r) => r.chunk)).size).toBe(1)
    answerAll()
    await Promise.all(answers)
  })

  it('fails the requests of a connection that breaks at once, and replaces it', async () => {
    pool = new EnclavePool({ address: { host: '127.0.0.1', port }, size: 1 })
    await pool.connect()
    const waiting = health()
    await until(() => received.length === 1)
    received.splice(0)[0]!.socket.destroy()
    await expect(waiting).rejects.toThrow(EnclaveUnavailableError)
    const next = health()
    await until(() => received.length === 1)
    answerAll()
    expect((await next).status).toBe(0)
    expect(sockets).toHaveLength(2)
  })

  it('sends on a busy live connection while a broken one cannot be reopened, backs off its refills, and reopens it when it can', async () => {
    const { connects, setClock } = countingPool(port)
    await pool!.connect()
    // The enclave takes no new connections for now, and one of the two breaks.
    await until(() => sockets.length === 2)
    // (close() stops listening at once; its callback would wait for the open connections.)
    server.close()
    sockets[1]!.destroy()
    await new Promise((resolve) => setTimeout(resolve, 20))
    const first = health()
    await until(() => received.length === 1)
    // Its one live connection is busy and a slot is empty, but the broken one closed before answering anything: the
    // refill is held back, and the request goes on the live one.
    const second = health()
    await until(() => received.length === 2)
    expect(received.map((r) => r.connection)).toEqual([0, 0])
    expect(connects()).toBe(2)
    // Past that hold, a busy turn tries to reopen the slot: the connect fails, the request does not.
    setClock(501)
    const third = health()
    await until(() => received.length === 3)
    expect(connects()).toBe(3)
    // More busy turns within the next, longer hold try no connect.
    const more = await busyTurns(5, 3)
    expect(connects()).toBe(3)
    answerAll()
    for (const answer of [first, second, third, ...more]) expect((await answer).status).toBe(0)
    // Listening again, and the hold over: the next turn that finds every live connection busy refills the slot.
    await new Promise<void>((resolve) => server.listen(port, '127.0.0.1', resolve))
    setClock(1_502)
    const fourth = health()
    await until(() => received.length === 1)
    const fifth = health()
    await until(() => received.length === 2 && sockets.length === 3)
    expect(connects()).toBe(4)
    answerAll()
    expect((await fourth).status).toBe(0)
    expect((await fifth).status).toBe(0)
  })

  it('after an enclave restart closes its connections, opens one at once for the next request, and its first answer ends the hold on refills', async () => {
    const { connects } = countingPool(port)
    await pool!.connect()
    await until(() => sockets.length === 2)
    // Both closed before anything was answered on them: the hold on refills starts (the clock stands still here).
    for (const socket of sockets) socket.destroy()
    await new Promise((resolve) => setTimeout(resolve, 20))
    // No live connection: one is opened at once, hold or not.
    const first = health()
    await until(() => received.length === 1)
    expect(connects()).toBe(3)
    answerAll()
    expect((await first).status).toBe(0)
    // Its first answer ended the hold: the next turn that finds it busy refills the other slot.
    const busy = health()
    await until(() => received.length === 1)
    const next = health()
    await until(() => received.length === 2 && connects() === 4)
    answerAll()
    for (const answer of [busy, next]) expect((await answer).status).toBe(0)
  })

  it('does not hold refills back for the close of an idle connection opened before a newer one answered', async () => {
    let connects = 0
    const connect = (address: EnclaveAddress) => (connects++, connectStream(address))
    pool = new EnclavePool({ address: { host: '127.0.0.1', port }, size: 3, clock: { now: () => 0, random: () => 0.5 }, connect })
    await pool.connect()
    await until(() => sockets.length === 3)
    // The first connection answers; then the third, idle since the start, is closed (its close arriving late, say).
    const answered = health()
    await until(() => received.length === 1)
    answerAll()
    expect((await answered).status).toBe(0)
    sockets[2]!.destroy()
    await new Promise((resolve) => setTimeout(resolve, 20))
    // Both live connections busy, a slot empty: refilled at once, the clock standing still.
    const busy = [health()]
    await until(() => received.length === 1)
    busy.push(health())
    await until(() => received.length === 2)
    busy.push(health())
    await until(() => received.length === 3 && connects === 4)
    answerAll()
    for (const answer of busy) expect((await answer).status).toBe(0)
  })

  it.each([
    { closing: 'saying why', close: (socket: Socket) => socket.end(encodeFrame({ requestId: connectionRequestId, opcode: 0, status: statuses.UNAVAILABLE, payload: encodeErrorMessage('1 connections are open') })) },
    // As one flooded past its lingering refusals closes them: before any request goes on them.
    { closing: 'silently', close: (socket: Socket) => socket.destroy() },
  ])('backs off refilling against an enclave that takes new connections and closes them at once, $closing', async ({ close }) => {
    // The enclave at its connection limit: the first connection is served, every later one is closed at once.
    const full = await servingFirstOnly(close, 'at once')
    const { pool: counted, connects, setClock } = countingPool(full.port)
    try {
      await counted.connect()
      expect(connects()).toBe(2)
      // The second connection is closed at once, with nothing answered on it.
      await new Promise((resolve) => setTimeout(resolve, 50))
      const busy = await busyTurns(5, 0)
      // Every busy turn found a slot to refill, but within the hold none was tried.
      expect(connects()).toBe(2)
      setClock(501)
      busy.push(health())
      await until(() => received.length === 6)
      await new Promise((resolve) => setTimeout(resolve, 50))
      busy.push(health())
      await until(() => received.length === 7)
      // One refill after the hold, closed at once again: the next hold is longer.
      expect(connects()).toBe(3)
      answerAll()
      for (const answer of busy) expect((await answer).status).toBe(0)
    } finally {
      counted.close()
      full.server.close()
    }
  })

  it('backs off refilling against an enclave that closes new connections silently once a request arrives, failing only what went there', async () => {
    // The first connection is served; every later one is closed with no last word as its first bytes arrive (as an
    // enclave flooded past its lingering refusals closes them).
    const silent = await servingFirstOnly((socket) => socket.destroy(), 'on its first bytes')
    const { pool: counted, connects, setClock } = countingPool(silent.port)
    try {
      await counted.connect()
      await until(() => silent.connections === 2)
      const first = health()
      await until(() => received.length === 1)
      // The next turn's request goes on the idle second connection, which closes under it: that one fails.
      await expect(health()).rejects.toThrow(new EnclaveUnavailableError('connection to the enclave closed'))
      const busy = await busyTurns(5, 1)
      // Every busy turn found the slot empty, but within the hold none reopened it; nothing more failed.
      expect(connects()).toBe(2)
      setClock(501)
      busy.push(health())
      await until(() => received.length === 7)
      expect(connects()).toBe(3)
      answerAll()
      for (const answer of [first, ...busy]) expect((await answer).status).toBe(0)
    } finally {
      counted.close()
      silent.server.close()
    }
  })

  it('opens no second connection for a slot that a request opened before connect(), and closes every one it opened', async () => {
    let connects = 0
    const connect = (address: EnclaveAddress) => (connects++, connectStream(address))
    pool = new EnclavePool({ address: { host: '127.0.0.1', port }, size: 2, connect })
    const early = health()
    await until(() => received.length === 1)
    await pool.connect()
    expect(connects).toBe(2)
    answerAll()
    expect((await early).status).toBe(0)
    pool.close()
    await until(() => sockets.length === 2 && sockets.every((socket) => socket.readableEnded || socket.destroyed))
  })

  it('resolves the answers read before bytes that break the framing, and fails only the requests still out', async () => {
    const {
      requests: [answered, unanswered],
      first: { frame, socket },
    } = await twoOutOnOneConnection()
    // One write: the first answer, then a length below the header's.
    socket.write(Buffer.concat([encodeFrame({ requestId: frame.requestId, opcode: frame.opcode, status: 0, payload: emptyPayload }), Buffer.from([0, 0, 0, 2, 0, 0])]))
    expect((await answered).status).toBe(0)
    await expect(unanswered).rejects.toThrow(new EnclaveUnavailableError('connection to the enclave closed'))
  })

  it('drops a connection that answers a request with another opcode than it was sent, failing its requests with why', async () => {
    const {
      requests: [first, second],
      first: { frame, socket },
    } = await twoOutOnOneConnection()
    socket.write(encodeFrame({ requestId: frame.requestId, opcode: opcodes.SIGN, status: 0, payload: emptyPayload }))
    const why = new EnclaveUnavailableError(`connection to the enclave dropped: it answered request ${frame.requestId} with opcode ${opcodes.SIGN}, not ${opcodes.HEALTH}`)
    await expect(first).rejects.toThrow(why)
    await expect(second).rejects.toThrow(why)
  })

  it('numbers a request past one still waiting when its ids come round again, never replacing it', async () => {
    pool = new EnclavePool({ address: { host: '127.0.0.1', port }, size: 1 })
    await pool.connect()
    const waiting = health()
    await until(() => received.length === 1)
    const waitingId = received[0]!.frame.requestId
    // As after 2^32 − 1 requests on this connection: the next id is the one still waiting.
    const [connection] = (pool as unknown as { connections: Array<{ nextId: number }> }).connections
    connection!.nextId = waitingId
    const next = health()
    await until(() => received.length === 2)
    expect(received.map(({ frame }) => frame.requestId)).toEqual([waitingId, waitingId + 1])
    answerAll()
    expect((await waiting).status).toBe(0)
    expect((await next).status).toBe(0)
  })

  it('sends what went out on a connection the enclave refused unread on another, once; a refusal for a bad frame fails its requests', async () => {
    // Every connection but the first is refused as the enclave reads its first bytes: as if its refusal had crossed the requests.
    let refusal: number = statuses.UNAVAILABLE
    const refusing = await servingFirstOnly(
      (socket) => socket.end(encodeFrame({ requestId: connectionRequestId, opcode: 0, status: refusal, payload: encodeErrorMessage('1 connections are open') })),
      'on its first bytes',
    )
    pool = new EnclavePool({ address: { host: '127.0.0.1', port: refusing.port }, size: 2 })
    try {
      await pool.connect()
      await until(() => refusing.connections === 2)
      const first = health()
      await until(() => received.length === 1)
      // The next turn's request goes on the idle second connection, is refused unread there, and goes on the first.
      const second = health()
      await until(() => received.length === 2)
      expect(received.map((r) => r.connection)).toEqual([0, 0])
      answerAll()
      expect((await first).status).toBe(0)
      expect((await second).status).toBe(0)
      // The refusal held refills back before the request went again: sending it opened no connection.
      await new Promise((resolve) => setTimeout(resolve, 50))
      expect(refusing.connections).toBe(2)
      // A last word for a bad frame does not say nothing was read: the requests on that connection fail with it.
      pool.close()
      refusal = statuses.BAD_REQUEST
      refusing.connections = 1
      pool = new EnclavePool({ address: { host: '127.0.0.1', port: refusing.port }, size: 1 })
      await pool.connect()
      await expect(health()).rejects.toThrow(new EnclaveUnavailableError('the enclave closed the connection: 1 connections are open'))
      // Refused unread again where it was sent again: it fails then, not round and round.
      pool.close()
      refusal = statuses.UNAVAILABLE
      pool = new EnclavePool({ address: { host: '127.0.0.1', port: refusing.port }, size: 1 })
      await pool.connect()
      const opened = refusing.connections
      await expect(health()).rejects.toThrow(new EnclaveUnavailableError('the enclave closed the connection: 1 connections are open'))
      expect(refusing.connections).toBe(opened + 1)
    } finally {
      pool.close()
      refusing.server.close()
    }
  })

  it('keeps the first deadline of a request it sends again: the wait on the refused connection counts', async () => {
    pool = new EnclavePool({ address: { host: '127.0.0.1', port }, size: 2 })
    await pool.connect()
    const busy = health()
    await until(() => received.length === 1)
    const answering = received[0]!.socket
    const sentAt = performance.now()
    const refused = health(2_000)
    await until(() => received.length === 2)
    const refusing = received[1]!.socket
    expect(refusing).not.toBe(answering)
    // Refused unread 1,000 ms on (a timer up to 1 s late still leaves it time): it goes on the other connection,
    // which does not answer either.
    await new Promise((resolve) => setTimeout(resolve, 1_000))
    refusing.end(encodeFrame({ requestId: connectionRequestId, opcode: 0, status: statuses.UNAVAILABLE, payload: encodeErrorMessage('2 connections are open') }))
    await until(() => received.length === 3)
    expect(received[2]!.socket).toBe(answering)
    await expect(refused).rejects.toThrow('the enclave did not answer within 2000 ms')
    // About 2,000 ms after it was first sent; a fresh wait on the second connection would end near 3,000.
    expect(performance.now() - sentAt).toBeLessThan(2_700)
    // Its short wait on the other connection is no sign that one is stuck: it stays, and answers what it carries.
    await new Promise((resolve) => setTimeout(resolve, 50))
    answerAll()
    expect((await busy).status).toBe(0)
  })

  it('closes the connections that finish opening after the pool is closed', async () => {
    pool = new EnclavePool({ address: { host: '127.0.0.1', port }, size: 4 })
    const connecting = pool.connect()
    pool.close()
    await expect(connecting).rejects.toThrow('the pool is stopped')
    await until(() => sockets.length === 4 && sockets.every((socket) => socket.destroyed))
  })

  it('fails a request the enclave does not answer in time', async () => {
    pool = new EnclavePool({ address: { host: '127.0.0.1', port }, size: 1 })
    await pool.connect()
    await expect(health(50)).rejects.toThrow('the enclave did not answer within 50 ms')
  })

  it('replaces a connection that has gone silent, but keeps one that answers others while one request times out', async () => {
    pool = new EnclavePool({ address: { host: '127.0.0.1', port }, size: 2 })
    await pool.connect()
    // Silent: nothing comes back on it, so it is dropped and the next request goes out on a new connection.
    await expect(health(50)).rejects.toThrow(EnclaveUnavailableError)
    await until(() => sockets[0]!.destroyed || sockets[1]!.destroyed)
    const silentOnes = sockets.filter((socket) => socket.destroyed).length
    received.splice(0)

    // Busy: one request times out while the same connection answers another; the connection stays.
    // One turn: both go out on one connection.
    const slow = health(100)
    const quick = health()
    await until(() => received.length === 2)
    const [slowFrame, quickFrame] = received.splice(0)
    const { socket } = slowFrame!
    expect(quickFrame!.socket).toBe(socket)
    socket.write(encodeFrame({ requestId: quickFrame!.frame.requestId, opcode: quickFrame!.frame.opcode, status: 0, payload: emptyPayload }))
    expect((await quick).status).toBe(0)
    await expect(slow).rejects.toThrow('the enclave did not answer within 100 ms')
    await keepsUsing(socket)
    expect(sockets.filter((each) => each.destroyed)).toHaveLength(silentOnes)
  })

  it('keeps a connection whose answer came while the event loop stalled past the request\'s timeout', async () => {
    pool = new EnclavePool({ address: { host: '127.0.0.1', port }, size: 1 })
    await pool.connect()
    const late = health(100)
    await until(() => received.length === 1)
    const [{ frame, socket }] = received.splice(0) as [(typeof received)[number]]
    // In a check-phase callback: the next loop turn runs its timers (the timeout, now due) before it reads the answer.
    await new Promise<void>((stalled) =>
      setImmediate(() => {
        socket.write(encodeFrame({ requestId: frame.requestId, opcode: frame.opcode, status: 0, payload: emptyPayload }))
        const stallEnds = performance.now() + 150
        while (performance.now() < stallEnds);
        stalled()
      }),
    )
    await expect(late).rejects.toThrow('the enclave did not answer within 100 ms')
    await keepsUsing(socket)
  })
})

/** The pool's next request goes out on the connection the server knows as `socket`: the pool kept it, a while after. */
async function keepsUsing(socket: Socket) {
  await new Promise((resolve) => setTimeout(resolve, 50))
  const next = health()
  await until(() => received.length === 1)
  expect(received[0]!.socket).toBe(socket)
  answerAll()
  expect((await next).status).toBe(0)
}
