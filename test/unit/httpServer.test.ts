import { connect, type AddressInfo, type Server as NetServer, type Socket } from 'node:net'
import { setFlagsFromString } from 'node:v8'
import { runInNewContext } from 'node:vm'
import { afterEach, describe, expect, it } from 'vitest'
import { HttpServer, type HttpAnswer, type HttpRequest, type HttpServerOptions } from '../../enclave-origin/parent/httpServer.js'
import { exchange, statuses } from '../support/rawHttp.js'

/**
 * The parent's HTTP/1.1 server on a real socket, fed raw bytes: framing,
 * what it refuses and how, keep-alive, pipelining, timeouts, back-pressure
 * and closing. (The API on top of it is in parentApi.test.ts.)
 */

const servers: HttpServer[] = []
afterEach(async () => {
  await Promise.all(servers.splice(0).map((server) => server.close({ drainMs: 0 })))
})

/** Echoes method, target, a header and the body's length; `?wait=N` answers after N ms. */
const echo = async (request: HttpRequest): Promise<HttpAnswer> => {
  const wait = /[?&]wait=(\d+)/.exec(request.target)
  if (wait) await new Promise((resolve) => setTimeout(resolve, Number(wait[1])))
  const body = JSON.stringify({ method: request.method, target: request.target, x: request.headers['x-test'] ?? null, body: Buffer.from(request.body).toString() })
  return { status: 200, headers: { 'content-type': 'application/json' }, body }
}

async function start(options: Partial<HttpServerOptions> = {}): Promise<{ server: HttpServer; port: number; refused: number[] }> {
  const refused: number[] = []
  const server = new HttpServer({ handle: echo, onRefused: (status) => refused.push(status), ...options })
  servers.push(server)
  await server.listen({ port: 0, host: '127.0.0.1' })
  return { server, port: (server.address() as AddressInfo).port, refused }
}

const get = (target: string, extra = '') => `GET ${target} HTTP/1.1\r\nhost: x\r\n${extra}\r\n`
const post = (target: string, body: string, extra = '') => `POST ${target} HTTP/1.1\r\nhost: x\r\ncontent-length: ${Buffer.byteLength(body)}\r\n${extra}\r\n${body}`
const bodies = (answer: string) => [...answer.matchAll(/\r\n\r\n(\{[^\r]*?\})(?=HTTP\/1\.1 |$)/g)].map((match) => JSON.parse(match[1]!))

describe('HttpServer', () => {
  it('answers pipelined requests on one connection in order, each in one piece, and keeps it open', async () => {
    const { port } = await start()
    const { answer, closed } = await exchange(port, [get('/a?wait=60') + post('/b', '{"n":1}', 'x-test: two\r\n') + get('/c')], { waitMs: 3_000, answers: 3 })
    expect(closed).toBe(false)
    expect(statuses(answer)).toEqual([200, 200, 200])
    expect(bodies(answer)).toEqual([
      { method: 'GET', target: '/a?wait=60', x: null, body: '' },
      { method: 'POST', target: '/b', x: 'two', body: '{"n":1}' },
      { method: 'GET', target: '/c', x: null, body: '' },
    ])
    expect(answer).toMatch(/content-length: \d+\r\nconnection: keep-alive\r\nkeep-alive: timeout=60\r\n\r\n/)
    expect(answer).toMatch(/\r\ndate: \w{3}, \d{2} \w{3} \d{4} \d{2}:\d{2}:\d{2} GMT\r\n/)
  })

  it('reads a request that arrives a few bytes at a time, and ignores empty lines before it', async () => {
    const { port } = await start()
    const request = `\r\n${post('/split', 'hello world')}`
    const parts = request.match(/[\s\S]{1,7}/g)!.flatMap((part) => [part, 2])
    const { answer } = await exchange(port, parts, { waitMs: 3_000, answers: 1 })
    expect(bodies(answer)).toEqual([{ method: 'POST', target: '/split', x: null, body: 'hello world' }])
  })

  it('takes the path of an absolute-form target', async () => {
    const { port } = await start()
    const { answer } = await exchange(port, [get('http://x:8443/v1/keys?q=1') + get('http://x?a=1') + get('https://x')], { waitMs: 3_000, answers: 3 })
    expect(bodies(answer).map((body) => body.target)).toEqual(['/v1/keys?q=1', '/?a=1', '/'])
  })

  it.each([
    ['a request line that is not HTTP/1.x', 'GET /\r\nhost: x\r\n\r\n', 400, 'the request line is not'],
    ['HTTP/2.0', 'GET / HTTP/2.0\r\nhost: x\r\n\r\n', 505, 'only HTTP/1.x'],
    ['a target that is not a path', 'GET x/y HTTP/1.1\r\nhost: x\r\n\r\n', 400, 'the request target is not a path'],
    ['an HTTP/1.1 request without host', 'GET / HTTP/1.1\r\n\r\n', 400, 'needs a host header'],
    ['two host headers', 'GET / HTTP/1.1\r\nhost: x\r\nhost: y\r\n\r\n', 400, 'more than one host'],
    ['a space before the colon', 'GET / HTTP/1.1\r\nhost: x\r\nx-test : 1\r\n\r\n', 400, 'header line 2 is malformed'],
    ['a folded header line', 'GET / HTTP/1.1\r\nhost: x\r\nx-test: 1\r\n 2\r\n\r\n', 400, 'header line 3 is malformed'],
    ['a bare LF inside a header line', 'GET / HTTP/1.1\r\nhost: x\nx-test: 1\r\n\r\n', 400, 'header line 1 is malformed'],
    ['a bare CR inside a header value', 'GET / HTTP/1.1\r\nhost: x\rx-test: 1\r\n\r\n', 400, 'header line 1 is malformed'],
    ['transfer-encoding', 'POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n', 411, 'transfer-encoding is not accepted'],
    ['transfer-encoding from an HTTP/1.0 client', 'POST / HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n', 400, 'its framing is faulty'],
    ['two different content-lengths', 'POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab', 400, 'content-length is not one decimal number'],
    ['a content-length that is not a number', 'POST / HTTP/1.1\r\nhost: x\r\ncontent-length: +1\r\n\r\na', 400, 'content-length is not one decimal number'],
    ['a declared body over the limit', 'POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 16385\r\n\r\n', 413, 'body too large (limit 16384 bytes)'],
    ['an expectation other than 100-continue', 'POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\nexpect: magic\r\n\r\na', 417, 'the only expectation met is 100-continue'],
    ['a head over the limit', `GET / HTTP/1.1\r\nhost: x\r\nx-test: ${'a'.repeat(16 * 1024)}\r\n\r\n`, 431, 'request head is larger than 16384 bytes'],
    ['a head over the limit that never ends', `GET / HTTP/1.1\r\nhost: x\r\nx-test: ${'a'.repeat(16 * 1024)}`, 431, 'request head is larger than 16384 bytes'],
  ])('refuses %s with a JSON error, closes the connection and passes nothing on', async (_, request, status, message) => {
    let handled = 0
    const { port, refused } = await start({ handle: (request) => ((handled += 1), echo(request)) })
    // A valid request after the bad one: nothing past a framing error is trusted to be a request.
    const { answer, closed } = await exchange(port, [request + get('/after')], { waitMs: 1_000 })
    expect(closed).toBe(true)
    expect(statuses(answer)).toEqual([status])
    expect(answer).toContain('connection: close\r\n')
    expect(JSON.parse(answer.slice(answer.indexOf('\r\n\r\n') + 4)).error).toContain(message)
    expect(handled).toBe(0)
    expect(refused).toEqual([status])
  })

  it('sends 100 Continue to a client that waits for it, then takes its body', async () => {
    const { port } = await start()
    const socket = connect(port, '127.0.0.1')
    let answer = ''
    socket.on('data', (chunk) => (answer += chunk))
    socket.write('POST /c HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\nexpect: 100-continue\r\n\r\n')
    await expect.poll(() => answer).toBe('HTTP/1.1 100 Continue\r\n\r\n')
    socket.write('body')
    await expect.poll(() => bodies(answer)).toEqual([{ method: 'POST', target: '/c', x: null, body: 'body' }])
    socket.destroy()
  })

  it('ignores the expectation of an HTTP/1.0 client: no 100 Continue, and no 417', async () => {
    const { port } = await start()
    for (const expectation of ['100-continue', 'magic']) {
      const { answer } = await exchange(port, [`POST /c HTTP/1.0\r\ncontent-length: 4\r\nexpect: ${expectation}\r\n\r\n`, 100, 'body'], { waitMs: 1_000 })
      expect(statuses(answer)).toEqual([200])
      expect(answer).not.toContain('100 Continue')
    }
  })

  it('trims a header value by index: a long run of spaces inside one, with its body in many pieces, is read at once', async () => {
    // A trimming regex backtracks quadratically on this value, and re-parsing the head for each piece of the body multiplies that.
    const { port } = await start({ requestReadTimeoutMs: 2_000 })
    const value = `a${' '.repeat(16_000)}b`
    const body = 'x'.repeat(200)
    const parts: Array<string | number> = [`POST /t HTTP/1.1\r\nhost: x\r\nx-test: \t ${value} \t\r\ncontent-length: ${body.length}\r\n\r\n`]
    for (const piece of body.match(/.{1,2}/g)!) parts.push(piece, 1)
    const { answer } = await exchange(port, parts, { waitMs: 3_000 })
    expect(statuses(answer)).toEqual([200])
    expect(bodies(answer)[0]).toMatchObject({ x: value, body })
  })

  it('closes after the answer when the client asks, or speaks HTTP/1.0 without keep-alive', async () => {
    const { port } = await start()
    for (const request of [get('/', 'connection: close\r\n'), 'GET / HTTP/1.0\r\n\r\n']) {
      const { answer, closed } = await exchange(port, [request + get('/never')], { waitMs: 1_000 })
      expect(closed).toBe(true)
      expect(statuses(answer)).toEqual([200])
      expect(answer).toContain('connection: close\r\n')
    }
    const { answer, closed } = await exchange(port, ['GET / HTTP/1.0\r\nconnection: keep-alive\r\n\r\n'], { waitMs: 3_000, answers: 1 })
    expect({ closed, statuses: statuses(answer) }).toEqual({ closed: false, statuses: [200] })
    // An HTTP/1.0 client keeps the connection only when the answer says so.
    expect(answer).toContain('connection: keep-alive\r\n')
  })

  it('still answers a client that ends its side right after its requests', async () => {
    const { port } = await start()
    const { answer, closed } = await exchange(port, [get('/a?wait=50') + get('/b')], { waitMs: 1_000, endAfter: true })
    expect(closed).toBe(true)
    expect(bodies(answer).map((body) => body.target)).toEqual(['/a?wait=50', '/b'])
  })

  it('closes at once after a client sends an empty line after its request and ends its side', async () => {
    const { port } = await start()
    const { answer, closed } = await exchange(port, [post('/x?wait=50', '{}') + '\r\n'], { waitMs: 1_000, endAfter: true })
    expect({ closed, statuses: statuses(answer) }).toEqual({ closed: true, statuses: [200] })
  })

  it('answers a request cut off by the client ending its side with 400', async () => {
    const { port } = await start()
    const { answer, closed } = await exchange(port, ['POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nabc'], { waitMs: 1_000, endAfter: true })
    expect(closed).toBe(true)
    expect(statuses(answer)).toEqual([400])
    expect(answer).toContain('the connection ended inside a request body')
  })

  it('serves a later HTTP/1.x minor version as HTTP/1.1 (RFC 9110 §2.5): host required, kept alive', async () => {
    const { port } = await start()
    // Two on one connection: the first answer keeps it open, and the second is served on it.
    const { answer } = await exchange(port, [`GET /later HTTP/1.2\r\nhost: x\r\n\r\n${'GET /again HTTP/1.2\r\nhost: x\r\n\r\n'}`], { waitMs: 3_000, answers: 2 })
    expect({ statuses: statuses(answer), targets: bodies(answer).map((body) => body.target) }).toEqual({ statuses: [200, 200], targets: ['/later', '/again'] })
    expect(answer).toContain('\r\nconnection: keep-alive\r\n')
    expect(statuses((await exchange(port, ['GET / HTTP/1.9\r\n\r\n'], { waitMs: 1_000 })).answer)).toEqual([400])
  })

  it.each([
    ['a head it refuses', () => echo, 'HEAD / HTTP/1.1\r\nhost: x\r\ncontent-length: 99999\r\n\r\n', 413],
    ['a version it does not serve', () => echo, 'HEAD / HTTP/2.0\r\nhost: x\r\n\r\n', 505],
    ['a handler that fails', () => () => Promise.reject(new Error('failed')), 'HEAD / HTTP/1.1\r\nhost: x\r\n\r\n', 500],
    ['an answer header that is refused', () => async () => ({ status: 200, headers: { connection: 'x' }, body: '{}' }), 'HEAD / HTTP/1.1\r\nhost: x\r\n\r\n', 500],
  ])('refuses a HEAD request for %s with the head alone', async (_, handle, request, status) => {
    const { port } = await start({ handle: handle() })
    const { answer, closed } = await exchange(port, [request], { waitMs: 1_000 })
    expect({ closed, statuses: statuses(answer) }).toEqual({ closed: true, statuses: [status] })
    expect(answer).toMatch(/content-length: [1-9]\d*\r\nconnection: close\r\n\r\n$/)
  })

  it('answers with the head alone only while the request in progress is a HEAD: a later refusal on the connection has its body, a 408 for a HEAD body does not', async () => {
    const { port } = await start({ requestReadTimeoutMs: 400 })
    // The second is refused before it has a request line, so nothing of its own says it is not a HEAD.
    const { answer } = await exchange(port, ['HEAD /h HTTP/1.1\r\nhost: x\r\n\r\nnot a request line\r\n\r\n'], { waitMs: 3_000, answers: 2 })
    expect(statuses(answer)).toEqual([200, 400])
    expect(answer).toMatch(/connection: close\r\n\r\n\{"error":"the request line is not [^}]*\}$/)
    const timedOut = await exchange(port, ['HEAD /h HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nab'], { waitMs: 3_000 })
    expect(statuses(timedOut.answer)).toEqual([408])
    expect(timedOut.answer).toMatch(/connection: close\r\n\r\n$/)
  })

  it('answers HEAD without the body, with its length', async () => {
    const { port } = await start()
    const { answer } = await exchange(port, ['HEAD /h HTTP/1.1\r\nhost: x\r\n\r\n' + get('/next')], { waitMs: 3_000, answers: 2 })
    const length = Buffer.byteLength(JSON.stringify({ method: 'HEAD', target: '/h', x: null, body: '' }))
    expect(answer).toMatch(new RegExp(`^HTTP/1\\.1 200 OK\\r\\n[^]*content-length: ${length}\\r\\n[^]*?\\r\\n\\r\\nHTTP/1\\.1 200 OK`))
  })

  it.each([
    ['rejects', () => Promise.reject(new Error('secret detail at /srv/parent.js:12'))],
    ['throws', () => {
      throw new Error('secret detail at /srv/parent.js:12')
    }],
  ])('answers a handler that %s with 500 and no detail, counts it, closes, and serves on', async (_, handle) => {
    const { port, refused } = await start({ handle: handle as HttpServerOptions['handle'] })
    const { answer, closed } = await exchange(port, [get('/')], { waitMs: 1_000 })
    expect(closed).toBe(true)
    expect(statuses(answer)).toEqual([500])
    expect(answer).not.toContain('secret detail')
    expect(answer.endsWith('{"error":"internal error"}')).toBe(true)
    expect(refused).toEqual([500])
    expect(statuses((await exchange(port, [get('/')], { waitMs: 1_000 })).answer)).toEqual([500])
  })

  it.each([
    ['a value that would split the answer', { 'x-bad': 'a\r\nset-cookie: b' }],
    ['a name that is not a token', { 'x bad': 'a' }],
    ['a framing header of its own', { 'content-length': '1' }],
    ['a connection header of its own', { connection: 'keep-alive' }],
  ])('answers 500 instead of an answer header with %s, and counts it', async (_, headers) => {
    const { port, refused } = await start({ handle: async () => ({ status: 200, headers, body: '{}' }) })
    const { answer } = await exchange(port, [get('/')], { waitMs: 1_000 })
    expect(statuses(answer)).toEqual([500])
    expect(refused).toEqual([500])
    expect(answer).not.toContain('set-cookie')
    expect(answer.match(/content-length/g)).toHaveLength(1)
  })

  it('takes a head of exactly the limit however its last bytes arrive', async () => {
    const { port } = await start({ maxHeaderBytes: 100 })
    const prefix = 'GET /limit HTTP/1.1\r\nhost: x\r\nx-test: '
    const head = prefix + 'a'.repeat(100 - prefix.length)
    for (const parts of [[`${head}\r\n\r\n`], [head, 20, '\r\n\r\n'], [`${head}\r`, 20, '\n\r\n'], [`${head}\r\n\r`, 20, '\n']]) {
      const { answer } = await exchange(port, parts, { waitMs: 3_000, answers: 1 })
      expect(statuses(answer)).toEqual([200])
    }
    const { answer } = await exchange(port, [`${head}a\r\n\r\n`], { waitMs: 3_000, answers: 1 })
    expect(statuses(answer)).toEqual([431])
  })

  it('lets go of a connection once it has closed', async () => {
    setFlagsFromString('--expose-gc')
    const gc = runInNewContext('gc') as () => void
    const { server, port } = await start()
    let accepted: WeakRef<Socket> | undefined
    ;(server as unknown as { server: NetServer }).server.once('connection', (socket: Socket) => (accepted = new WeakRef(socket)))
    const { closed } = await exchange(port, [get('/', 'connection: close\r\n')], { waitMs: 1_000 })
    expect(closed).toBe(true)
    // Its timers (the linger after the answer, the cap for slow readers) must not hold it until they fire.
    await expect.poll(() => {
      gc()
      return accepted !== undefined && accepted.deref() === undefined
    }, { timeout: 3_000, interval: 100 }).toBe(true)
  })

  it('cuts off a request that is too slow (408), a connection that sends nothing or only an empty line, and an idle keep-alive one', async () => {
    const { port, refused } = await start({ requestReadTimeoutMs: 400, keepAliveTimeoutMs: 300 })
    const slowHead = exchange(port, ['GET / HTTP/1.1\r\nhost: x\r\n'], { waitMs: 2_000 })
    const slowBody = exchange(port, ['POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nab'], { waitMs: 2_000 })
    const silent = exchange(port, [], { waitMs: 2_000 })
    const emptyLine = exchange(port, ['\r\n'], { waitMs: 2_000 })
    const idle = exchange(port, [get('/')], { waitMs: 2_000 })
    // Some clients end a body with CRLF: after the answer that is not a new request being slow.
    const trailingEmptyLine = exchange(port, [post('/', 'ab') + '\r\n'], { waitMs: 2_000 })
    for (const cut of [slowHead, slowBody, silent, emptyLine]) {
      const { answer, closed } = await cut
      expect(closed).toBe(true)
      expect(statuses(answer)).toEqual([408])
    }
    for (const kept of [await idle, await trailingEmptyLine]) {
      expect({ closed: kept.closed, statuses: statuses(kept.answer) }).toEqual({ closed: true, statuses: [200] })
    }
    expect(refused).toEqual([408, 408, 408, 408])
  })

  it('closes a connection after an answer that says so, reading nothing after it, and idles one that never authenticated for less long', async () => {
    const handle = async (request: HttpRequest): Promise<HttpAnswer> => ({ status: 200, headers: {}, body: '{}', authenticated: request.target === '/auth', close: request.target === '/close' })
    const { port } = await start({ handle, keepAliveTimeoutMs: 4_000, unauthenticatedKeepAliveMs: 300, requestReadTimeoutMs: 8_000 })
    const [closing, anonymous, trusted] = await Promise.all([
      exchange(port, [get('/close') + get('/after')], { waitMs: 3_000 }),
      exchange(port, [get('/')], { waitMs: 3_000 }),
      exchange(port, [get('/') + get('/auth')], { waitMs: 3_000 }),
    ])
    expect({ closed: closing.closed, statuses: statuses(closing.answer) }).toEqual({ closed: true, statuses: [200] })
    expect(closing.answer).toMatch(/\r\nconnection: close\r\n/)
    expect({ closed: anonymous.closed, statuses: statuses(anonymous.answer) }).toEqual({ closed: true, statuses: [200] })
    expect(anonymous.answer).toMatch(/\r\nkeep-alive: timeout=0\r\n/)
    // Once one of its requests authenticated, the whole keep-alive time: still open when the others have long closed.
    expect({ closed: trusted.closed, statuses: statuses(trusted.answer) }).toEqual({ closed: false, statuses: [200, 200] })
    expect(trusted.answer).toMatch(/\r\nkeep-alive: timeout=4\r\n\r\n\{\}$/)
    trusted.socket.destroy()
  })

  it('stops taking requests from a client that does not read its answers', async () => {
    let handled = 0
    const big = 'x'.repeat(1024 * 1024)
    const { port } = await start({ handle: async () => ((handled += 1), { status: 200, headers: {}, body: big }) })
    const socket = connect(port, '127.0.0.1')
    socket.pause()
    socket.write(get('/').repeat(40))
    await new Promise((resolve) => setTimeout(resolve, 400))
    // Each answer is 1 MiB; what the sockets buffer holds a few of them.
    expect(handled).toBeGreaterThan(0)
    expect(handled).toBeLessThan(40)
    let received = 0
    socket.on('data', (chunk) => (received += chunk.length))
    socket.resume()
    await expect.poll(() => handled, { timeout: 5_000 }).toBe(40)
    await expect.poll(() => received, { timeout: 5_000 }).toBeGreaterThan(40 * big.length)
    socket.destroy()
  })

  it('holds a client that stopped reading its answers to the idle time of its connection: the shorter one, if it never authenticated', async () => {
    const big = 'x'.repeat(1024 * 1024)
    let handled = 0
    const { port } = await start({ handle: async () => ((handled += 1), { status: 200, headers: {}, body: big }), keepAliveTimeoutMs: 5_000, unauthenticatedKeepAliveMs: 300, requestReadTimeoutMs: 800 })
    const socket = connect(port, '127.0.0.1')
    socket.pause()
    socket.write(get('/').repeat(40))
    await new Promise((resolve) => setTimeout(resolve, 1_500))
    // Cut by now: reading again gets what the kernel's buffers held, then the end, not the other answers.
    let received = 0
    socket.on('data', (chunk: Buffer) => (received += chunk.length))
    const closed = new Promise((resolve) => socket.once('close', resolve))
    socket.resume()
    await closed
    expect(handled).toBeLessThan(40)
    expect(received).toBeLessThan(handled * (big.length + 200))
  })

  it('lets a connection that never authenticated live only its shorter idle time, however often it asks', async () => {
    const handle = async (request: HttpRequest): Promise<HttpAnswer> => ({ status: 404, headers: {}, body: '{}', authenticated: request.target === '/auth' })
    const { port } = await start({ handle, keepAliveTimeoutMs: 10_000, unauthenticatedKeepAliveMs: 500 })
    // One whose connections all go unauthenticated, with no shorter time set (the benchmark's floor): no limit of life.
    const { port: floorPort } = await start({ handle, keepAliveTimeoutMs: 500 })
    const ask = async (first: string, at = port) => {
      const socket = connect(at, '127.0.0.1')
      let answer = ''
      socket.on('data', (chunk: Buffer) => (answer += chunk.toString()))
      const closed = new Promise<number>((resolve) => socket.once('close', () => resolve(performance.now())))
      const opened = performance.now()
      // A cheap request every 100 ms: the connection is never idle for long.
      socket.write(get(first))
      const asking = setInterval(() => socket.writable && socket.write(get('/')), 100)
      const ended = await Promise.race([closed, new Promise<undefined>((resolve) => setTimeout(resolve, 3_000))])
      clearInterval(asking)
      socket.destroy()
      return { livedMs: ended === undefined ? undefined : ended - opened, closes: answer.match(/\r\nconnection: close\r\n/g)?.length ?? 0 }
    }
    const [anonymous, trusted, floor] = await Promise.all([ask('/'), ask('/auth'), ask('/', floorPort)])
    // Its first answer past 500 ms says close: one at most 100 ms later, then the end.
    expect(anonymous.closes).toBe(1)
    expect(anonymous.livedMs).toBeGreaterThanOrEqual(500)
    expect(anonymous.livedMs).toBeLessThan(2_000)
    // One whose first request authenticated stays open, and so does one on the server with no shorter time.
    expect(trusted).toEqual({ livedMs: undefined, closes: 0 })
    expect(floor).toEqual({ livedMs: undefined, closes: 0 })
  })

  it('holds a closing connection whose answer is not read to the shorter idle time, if it never authenticated', async () => {
    const big = 'x'.repeat(8 * 1024 * 1024)
    const { port } = await start({ handle: async () => ({ status: 401, headers: {}, body: big, close: true }), keepAliveTimeoutMs: 10_000, unauthenticatedKeepAliveMs: 300 })
    const socket = connect(port, '127.0.0.1')
    socket.pause()
    socket.write(get('/'))
    await new Promise((resolve) => setTimeout(resolve, 1_500))
    // Cut by now (the closing answer's linger is capped at 300 ms, not 10 s): reading gets what the buffers held, then the end.
    let received = 0
    socket.on('data', (chunk: Buffer) => (received += chunk.length))
    socket.on('error', () => {})
    const closed = new Promise((resolve) => socket.once('close', resolve))
    socket.resume()
    await closed
    expect(received).toBeLessThan(big.length)
  })

  it('refuses a head whose lines end in bare LF at once (400), not after the read timeout', async () => {
    const { port, refused } = await start({ requestReadTimeoutMs: 8_000 })
    const started = Date.now()
    const { answer, closed } = await exchange(port, ['GET / HTTP/1.1\nhost: x\n\n'], { waitMs: 3_000 })
    expect(Date.now() - started).toBeLessThan(2_000)
    expect({ closed, statuses: statuses(answer) }).toEqual({ closed: true, statuses: [400] })
    expect(JSON.parse(answer.slice(answer.indexOf('\r\n\r\n') + 4)).error).toBe('a line of the request head ends in a bare LF: lines end in CRLF')
    expect(refused).toEqual([400])
  })

  it('reports an error of its listening socket (a failed accept) and serves on, rather than ending the process', async () => {
    const errors: string[] = []
    const { server, port } = await start({ onListenerError: (error) => errors.push(error.message) })
    // What Node does when accept() fails: an 'error' on the listening socket, which throws where nothing listens for it.
    ;(server as unknown as { server: NetServer }).server.emit('error', new Error('accept failed: ENOMEM'))
    expect(errors).toEqual(['accept failed: ENOMEM'])
    const { answer } = await exchange(port, [get('/')], { waitMs: 1_000, answers: 1 })
    expect(statuses(answer)).toEqual([200])
  })

  it('does not time out requests waiting behind an answer the client is slow to take', async () => {
    // More than the two sockets' kernel buffers hold, so that the first answer is still going out.
    const big = 'x'.repeat(16 * 1024 * 1024)
    const { port, refused } = await start({ requestReadTimeoutMs: 400, handle: async (request) => ({ status: 200, headers: { 'x-target': request.target }, body: big }) })
    const socket = connect(port, '127.0.0.1')
    socket.pause()
    socket.write(get('/1') + get('/2') + get('/3') + get('/4'))
    await new Promise((resolve) => setTimeout(resolve, 1_200))
    let answer = ''
    socket.on('data', (chunk) => (answer += chunk.toString('latin1')))
    socket.resume()
    await expect.poll(() => answer.length, { timeout: 20_000 }).toBeGreaterThan(4 * big.length)
    expect([...answer.matchAll(/HTTP\/1\.1 (\d{3}) [^]*?x-target: (\S+)/g)].map((match) => `${match[1]} ${match[2]}`)).toEqual(['200 /1', '200 /2', '200 /3', '200 /4'])
    expect(refused).toEqual([])
    socket.destroy()
  })

  it('closes gracefully without cutting an answer still going out to a slow reader', async () => {
    const big = 'x'.repeat(4 * 1024 * 1024)
    let handled: () => void = () => undefined
    const atHandler = new Promise<void>((resolve) => (handled = resolve))
    const { server, port } = await start({ handle: async () => (handled(), { status: 200, headers: {}, body: big }) })
    const socket = connect(port, '127.0.0.1')
    socket.pause()
    socket.write(get('/'))
    await atHandler
    await new Promise((resolve) => setTimeout(resolve, 200))
    const closed = server.close({ drainMs: 5_000 })
    await new Promise((resolve) => setTimeout(resolve, 200))
    let received = 0
    socket.on('data', (chunk) => (received += chunk.length))
    const ended = new Promise((resolve) => socket.once('close', resolve))
    socket.resume()
    await ended
    await closed
    expect(received).toBeGreaterThan(big.length)
  })

  it('closes gracefully: idle connections at once, a busy one after its answer, which says so', async () => {
    let atHandler: () => void = () => undefined
    const busyAtHandler = new Promise<void>((resolve) => (atHandler = resolve))
    const { server, port } = await start({ handle: (request) => (request.target.includes('wait') && atHandler(), echo(request)) })
    const idle = await exchange(port, [get('/')], { waitMs: 5_000, answers: 1 })
    expect(idle.closed).toBe(false)
    const idleClosed = new Promise((resolve) => idle.socket.once('close', resolve))
    const busy = exchange(port, [get('/?wait=300')], { waitMs: 5_000 })
    await busyAtHandler
    const started = Date.now()
    await server.close({ drainMs: 2_000 })
    expect(Date.now() - started).toBeLessThan(1_500)
    await idleClosed
    const busyDone = await busy
    expect({ closed: busyDone.closed, statuses: statuses(busyDone.answer) }).toEqual({ closed: true, statuses: [200] })
    expect(busyDone.answer).toContain('connection: close\r\n')
    expect(server.listening).toBe(false)
  })
})
