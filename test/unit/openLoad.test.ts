import { spawn, spawnSync, type ChildProcess } from 'node:child_process'
import { mkdtempSync, rmSync } from 'node:fs'
import { createServer as createHttpServer, type IncomingMessage, type ServerResponse } from 'node:http'
import { createServer as createTcpServer, type AddressInfo, type Server } from 'node:net'
import os from 'node:os'
import path from 'node:path'
import { afterAll, beforeAll, describe, expect, it, onTestFinished } from 'vitest'
import { encodeFrame, FrameDecoder, opcodes } from '../../enclave-origin/protocol/frames.js'
import { decodeSignRequest, encodeSignResponse } from '../../enclave-origin/protocol/messages.js'
import { nodeHashing } from '../../enclave-origin/protocol/nodeHashing.js'
import { RequestVerifier } from '../../enclave-origin/protocol/requestSigning.js'

/**
 * The benchmark's native load generator (test/bench/openLoad.c), compiled
 * here with the benchmark's flags and run against small servers: its HTTP
 * requests must pass the parent's own request verification, and what it
 * reports must be what the servers answered.
 */

const haveCc = spawnSync('cc', ['--version']).status === 0
const directory = mkdtempSync(path.join(os.tmpdir(), 'open-load-'))
const binary = path.join(directory, 'openLoad')
const keyIds = ['0f8e6c1a-5c1e-4b53-9a57-2f3c8e0f4d11', 'key-2']
const hmac = { keyId: 'worker', secret: 'hmac-secret-made-for-tests' }
const servers: Server[] = []

beforeAll(() => {
  if (!haveCc) return
  const compiled = spawnSync('cc', ['-O2', '-Wall', '-Wextra', '-Werror', '-o', binary, 'test/bench/openLoad.c'], { encoding: 'utf8' })
  if (compiled.status !== 0) throw new Error(`openLoad.c did not compile:\n${compiled.stderr}`)
})
afterAll(async () => {
  await Promise.all(servers.map((server) => new Promise((resolve) => server.close(resolve))))
  rmSync(directory, { recursive: true, force: true })
})

type Quantiles = { p50: number; p90: number; p99: number; p999: number }
type Run = {
  offered: number
  ok: number
  failed: number
  needsUnlock: number
  skipped: number
  slow: { overMs: number; requests: number; bursts: number; medianBurstGapMs: number }
  latencyMs: Record<'client' | 'rpc' | 'parent' | 'enclave', Quantiles>
}

async function listening(server: Server): Promise<number> {
  servers.push(server)
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  return (server.address() as AddressInfo).port
}

/**
 * 400 requests a second for one recorded second, after half a second
 * unrecorded. With 8 connections (the default) a server stalled for 20 ms
 * leaves none idle and the next request is skipped, which a busy CI machine
 * does now and then; tests that are not about connections use 64.
 */
function runOpenLoad({
  mode,
  port,
  env = {},
  connections = 8,
  warmupSeconds = 0.5,
  started,
}: {
  mode: 'frames' | 'http'
  port: number
  env?: Record<string, string>
  connections?: number
  warmupSeconds?: number
  /** Called with the generator's process once it is spawned. */
  started?: (generator: ChildProcess) => void
}): Promise<Run & { stderr: string }> {
  const child = spawn(binary, [mode, port, 400, 1, warmupSeconds, connections, 500].map(String), { env: { ...process.env, ...env }, stdio: ['pipe', 'pipe', 'pipe'] })
  started?.(child)
  let output = ''
  let errors = ''
  child.stdout.on('data', (chunk) => (output += chunk))
  child.stderr.on('data', (chunk) => (errors += chunk))
  child.stdin.end(keyIds.join('\n'))
  return new Promise((resolve, reject) =>
    child.once('exit', (code) => (code === 0 ? resolve({ ...(JSON.parse(output) as Run), stderr: errors }) : reject(new Error(`openLoad exited ${code}: ${errors}`)))),
  )
}

/** A parent-shaped HTTP server: verifies each request as the parent does, and answers a sign or a 401. */
async function verifyingServer() {
  const verifier = new RequestVerifier({ secrets: { [hmac.keyId]: hmac.secret }, maxFutureSkewMs: 0, hashing: nodeHashing })
  const seen = { verified: 0, refused: [] as string[], bodies: new Set<string>() }
  const server = createHttpServer((request: IncomingMessage, response) => {
    const chunks: Buffer[] = []
    request.on('data', (chunk: Buffer) => chunks.push(chunk))
    request.on('end', () => {
      const body = Buffer.concat(chunks)
      const requestPath = request.url ?? ''
      const failure = verifier.verify({ method: request.method ?? '', path: requestPath, headers: (name) => request.headers[name] as string | undefined, body })
      const keyId = /^\/v1\/keys\/([^/]+)\/sign$/.exec(requestPath)?.[1]
      const digestOk = /^\{"digest":"0x[0-9a-f]{64}"\}$/.test(body.toString())
      if (failure || !keyId || !keyIds.includes(keyId) || !digestOk || request.headers['content-type'] !== 'application/json') {
        seen.refused.push(failure ?? `${requestPath} ${body}`)
        response.writeHead(401, { 'content-length': '2' }).end('{}')
        return
      }
      seen.verified++
      seen.bodies.add(body.toString())
      response.writeHead(200, { 'Content-Length': '2', 'Server-Timing': 'enclave;dur=0.500, queue;dur=0.100, rpc;dur=2.000, total;dur=3.250' }).end('{}')
    })
  })
  return { port: await listening(server), seen }
}

/** An HTTP server that hands each request to `answer` with its number on its connection (1, 2, …), and records which connection each came on. */
async function perConnectionServer(answer: (count: number, request: IncomingMessage, response: ServerResponse) => void) {
  const answered = new Map<unknown, number>()
  const order: unknown[] = []
  const server = createHttpServer((request, response) => {
    request.resume()
    request.once('end', () => {
      const count = (answered.get(request.socket) ?? 0) + 1
      answered.set(request.socket, count)
      order.push(request.socket)
      answer(count, request, response)
    })
  })
  return { port: await listening(server), answered, order }
}

describe.skipIf(!haveCc)('openLoad, the native load generator', () => {
  it('http: signs requests the parent verifies, and reports the phases from Server-Timing', async () => {
    const { port, seen } = await verifyingServer()

    const run = await runOpenLoad({ mode: 'http', port, env: { ORIGIN_HMAC_KEY_ID: hmac.keyId, ORIGIN_HMAC_SECRET: hmac.secret }, connections: 64 })

    expect(seen.refused).toEqual([])
    // Every request due in the recorded second is sent, also one a stall held back past its end (399: rounding).
    expect(run.offered).toBeGreaterThanOrEqual(399)
    expect(run.offered).toBeLessThanOrEqual(400)
    expect(run).toMatchObject({ failed: 0, needsUnlock: 0, skipped: 0 })
    expect(run.ok).toBe(run.offered)
    // Warm-up requests are answered but not recorded; every digest was new.
    expect(seen.verified).toBeGreaterThanOrEqual(run.ok + 150)
    expect(seen.bodies.size).toBe(seen.verified)
    expect(run.latencyMs.rpc.p50).toBe(2)
    expect(run.latencyMs.parent.p50).toBe(1.25)
    expect(run.latencyMs.enclave.p50).toBe(0.5)
    expect(run.latencyMs.client.p50).toBeGreaterThan(0)
  })

  it('http: counts a 503 as NEEDS_UNLOCK only when its body says needs_unlock, not an overloaded parent\u2019s', async () => {
    let answers = 0
    const { port } = await perConnectionServer((_count, _request, response) => {
      const body = ++answers % 2 === 1 ? '{"error":"needs_unlock","retryAfterMs":100}' : '{"error":"overloaded","retryAfterMs":100}'
      response.writeHead(503, { 'content-length': String(body.length) }).end(body)
    })

    const run = await runOpenLoad({ mode: 'http', port, env: { ORIGIN_HMAC_KEY_ID: hmac.keyId, ORIGIN_HMAC_SECRET: hmac.secret }, connections: 64 })

    expect(run.ok).toBe(0)
    expect(run.failed).toBe(run.offered)
    expect(run.needsUnlock).toBeGreaterThan(run.offered * 0.4)
    expect(run.needsUnlock).toBeLessThan(run.offered * 0.6)
  })

  it('http: counts every refused request as failed', async () => {
    const { port, seen } = await verifyingServer()

    const run = await runOpenLoad({ mode: 'http', port, env: { ORIGIN_HMAC_KEY_ID: hmac.keyId, ORIGIN_HMAC_SECRET: 'not-the-secret' }, connections: 64 })

    expect(seen.verified).toBe(0)
    expect(seen.refused.every((reason) => reason === 'bad-signature')).toBe(true)
    expect(run.ok).toBe(0)
    expect(run.failed).toBe(run.offered)
    expect(run.latencyMs.client.p99).toBe(-1)
  })

  it('http: uses every connection in turn, and carries on when the server closes them', async () => {
    // The 40th answer on a connection closes it, and its FIN comes 100 ms after the answer, as a busy server's may.
    const { port, answered, order } = await perConnectionServer((count, _request, response) => {
      if (count < 40) return response.writeHead(200, { 'content-length': '2' }).end('{}')
      response.writeHead(200, { 'content-length': '2', connection: 'close' }).write('{}')
      setTimeout(() => response.end(), 100)
    })

    const run = await runOpenLoad({ mode: 'http', port, env: { ORIGIN_HMAC_KEY_ID: hmac.keyId, ORIGIN_HMAC_SECRET: hmac.secret } })

    // In turn, though each was answered at once: among the first 80 requests every connection carried about 10.
    // (Always the same idle connection would have carried 40 of them; the order they reached the server in may
    // differ a little from the order they were sent in, on a busy machine.)
    const carried = new Map<unknown, number>()
    for (const socket of order.slice(0, 80)) carried.set(socket, (carried.get(socket) ?? 0) + 1)
    expect(carried.size).toBe(8)
    expect(Math.max(...carried.values())).toBeLessThanOrEqual(20)
    // 8 connections × 40 answers (200 of them in the warm-up): then all were closed, and the rest was skipped. None
    // failed: a connection whose answer said `connection: close` carried no more requests, even before the FIN came.
    expect([...answered.values()]).toEqual(Array(8).fill(40))
    expect(run.stderr).toContain('the server closed 8 of 8 connections')
    expect(run.failed).toBe(0)
    expect(run.ok).toBeGreaterThan(0)
    expect(run.skipped).toBeGreaterThan(0)
    expect(run.ok + run.skipped).toBe(run.offered)
  })

  it('http: counts a request whose connection the server resets as failed, and goes on with the others', async () => {
    // The 30th request on a connection gets no answer: a TCP reset. No warm-up, so all eight are recorded however the
    // turns went.
    const { port, answered } = await perConnectionServer((count, request, response) => {
      if (count === 30) request.socket.resetAndDestroy()
      else response.writeHead(200, { 'content-length': '2' }).end('{}')
    })

    const run = await runOpenLoad({ mode: 'http', port, env: { ORIGIN_HMAC_KEY_ID: hmac.keyId, ORIGIN_HMAC_SECRET: hmac.secret }, warmupSeconds: 0 })

    expect(run.failed).toBe(8)
    expect(run.stderr).toContain('the server closed 8 of 8 connections')
    expect([...answered.values()]).toEqual(Array(8).fill(30))
    expect(run.ok).toBe(8 * 29)
    expect(run.ok + run.failed + run.skipped).toBe(run.offered)
  })

  it('groups the requests of 10 ms or more into the bursts they came in, with the time between bursts', { timeout: 20_000 }, async () => {
    // The server stops for 40 ms every 250 ms, as a machine whose housekeeping takes its cores now and then: a request
    // that arrives in a stop is answered when it ends, at least 10 ms late.
    const started = performance.now()
    const { port } = await perConnectionServer((_count, _request, response) => {
      const phase = (performance.now() - started) % 250
      const answer = () => response.writeHead(200, { 'content-length': '2' }).end('{}')
      if (phase < 40) setTimeout(answer, Math.max(40 - phase, 10))
      else answer()
    })

    // This machine stalls now and then on its own (its kernel's memory monitor, every ~540 ms; see the README, and
    // other test files running alongside), which adds bursts of its own: one of three runs must show the server's alone.
    const measure = () => runOpenLoad({ mode: 'http', port, env: { ORIGIN_HMAC_KEY_ID: hmac.keyId, ORIGIN_HMAC_SECRET: hmac.secret }, connections: 64 })
    const serversAlone = ({ slow }: Run) => slow.bursts >= 4 && slow.bursts <= 6 && slow.medianBurstGapMs >= 230 && slow.medianBurstGapMs <= 270
    let run = await measure()
    for (let attempt = 1; attempt < 3 && !serversAlone(run); attempt++) run = await measure()

    // One recorded second holds four or five stops, each with about 16 requests (400/s for 40 ms); a busy machine may add one.
    expect(run.slow.overMs).toBe(10)
    expect(run.slow.bursts).toBeGreaterThanOrEqual(4)
    expect(run.slow.requests).toBeGreaterThanOrEqual(4 * 8)
    if (serversAlone(run)) {
      expect(run.slow.requests).toBeGreaterThanOrEqual(run.slow.bursts * 8)
    } else {
      // All three runs had stalls of the machine's own (so did two CI runs in one day, with other test files alongside),
      // which add bursts and split the server's gaps: the grouping still shows (one burst per slow request would be dozens).
      expect(run.slow.bursts).toBeLessThanOrEqual(15)
      expect(run.slow.medianBurstGapMs).toBeGreaterThan(20)
      expect(run.slow.medianBurstGapMs).toBeLessThanOrEqual(270)
    }
  })

  it('frames: sends SIGN frames for the given keys and reads the enclave time from each answer', async () => {
    const { port, keysSeen } = await framesServer()

    const run = await runOpenLoad({ mode: 'frames', port })

    expect(run).toMatchObject({ failed: 0, skipped: 0 })
    expect(run.ok).toBe(run.offered)
    expect(run.latencyMs.enclave.p50).toBe(1.5)
    expect(keysSeen).toEqual(new Set(keyIds))
  })

  it('sends every request due in the recorded second, also when it was stopped across the second\u2019s end', { timeout: 20_000 }, async () => {
    // Of the 600 requests (200 in the warm-up), the 500th reaching the server stops the generator (SIGSTOP) for 1 s,
    // as a machine that stalls it would: the last 100 or so, due before the end at 1.5 s, can go out only after it.
    let generator: ChildProcess | undefined
    onTestFinished(() => {
      // Never a stopped generator left behind by a test that ended (timed out) within that second.
      if (generator?.exitCode === null && generator.signalCode === null) generator.kill('SIGKILL')
    })
    const { port } = await framesServer((received) => {
      if (received !== 500) return
      generator!.kill('SIGSTOP')
      setTimeout(() => generator!.kill('SIGCONT'), 1_000)
    })

    const run = await runOpenLoad({ mode: 'frames', port, started: (child) => (generator = child) })

    expect(run.offered).toBeGreaterThanOrEqual(399)
    expect(run).toMatchObject({ failed: 0, skipped: 0 })
    expect(run.ok).toBe(run.offered)
    expect(run.latencyMs.client.p99).toBeGreaterThan(200)
  })
})

/** An enclave-shaped server: answers each SIGN frame with a signature that took 1.5 ms, and records the keys. */
async function framesServer(onFrame?: (received: number) => void) {
  const keysSeen = new Set<string>()
  let received = 0
  const server = createTcpServer((socket) => {
    const decoder = new FrameDecoder()
    socket.on('data', (chunk: Uint8Array) => {
      for (const frame of decoder.push(chunk)) {
        onFrame?.(++received)
        expect(frame.opcode).toBe(opcodes.SIGN)
        keysSeen.add(decodeSignRequest(frame.payload).keyId)
        const payload = encodeSignResponse({ signature: new Uint8Array(64), recoveryId: 1, enclaveMicros: 1_500 })
        socket.write(encodeFrame({ requestId: frame.requestId, opcode: frame.opcode, status: 0, payload }))
      }
    })
    socket.on('error', () => {})
  })
  return { port: await listening(server), keysSeen }
}
