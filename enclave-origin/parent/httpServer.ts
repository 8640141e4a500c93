import { createServer as createNetServer, type AddressInfo, type ListenOptions, type Server as NetServer, type Socket } from 'node:net'
import { createServer as createTlsServer } from 'node:tls'

/**
 * The parent API's HTTP/1.1 server: the subset of RFC 9112 its clients use
 * (the Worker's fetch, the operator CLI, curl, Prometheus), on plain TCP or
 * TLS, with keep-alive and pipelining, and nothing else.
 *
 * Why not Node's `http`: on this 2-core benchmark machine its request and
 * response objects, streams and events cost about 65 µs of CPU per request,
 * against about 25 µs for a socket that parses a request and writes its
 * answer in one write. The parent's one thread spends that time on every
 * signature, and under load the signatures wait for it (README, Benchmarks).
 *
 * It is strict where leniency lets two parsers disagree about where a request
 * ends (request smuggling behind a proxy): a body is framed by Content-Length
 * alone; Transfer-Encoding, differing lengths, folded lines, bare CR or LF,
 * and whitespace before a colon are refused, and the connection closed.
 */

export type HttpRequest = {
  method: string
  /** The path and query as sent (origin-form; the path of an absolute-form target). */
  target: string
  /** Field names in lower case; a repeated field's values joined with ", ". */
  headers: Record<string, string>
  body: Uint8Array
}

export type HttpAnswer = {
  status: number
  /** Lower-case names; Date, Content-Length and Connection are the server's. */
  headers: Record<string, string>
  body: string
}

export type HttpServerOptions = {
  /** Answers every complete, well-formed request; a rejection is answered 500 and the connection closed. */
  handle: (request: HttpRequest) => Promise<HttpAnswer>
  /** Called for each request the server answers itself (malformed, too large, too slow), with the status. */
  onRefused?: (status: number) => void
  tls?: { cert: string; key: string; ca?: string; requireClientCertificate?: boolean }
  /** How long a client may take to send a whole request, its headers within half of it; default 10 s. */
  requestReadTimeoutMs?: number
  /** How long an idle keep-alive connection stays open; default 60 s. */
  keepAliveTimeoutMs?: number
  maxHeaderBytes?: number
  maxBodyBytes?: number
}

type Connection = {
  socket: Socket
  /** Bytes read and not yet taken by a request. */
  unread: Buffer | undefined
  /** A request is with the handler and not yet answered: later ones wait, in order. */
  busy: boolean
  /** Its answers have run ahead of the client's reading: later requests wait for 'drain'. */
  blocked: boolean
  /** No more requests are read: the connection closes once the current answer is out. */
  closing: boolean
  /** The client has ended its side. */
  ended: boolean
  /** 100 Continue went out for the request being read. */
  continued: boolean
  /** When the first byte of the request being read came (ms since the epoch); 0 between requests. */
  requestStartedAt: number
  /** Its head is complete and its body still coming. */
  headComplete: boolean
  lastActiveAt: number
}

const headEnd = Buffer.from('\r\n\r\n')
const token = "[!#$%&'*+\\-.^_`|~0-9A-Za-z]+"
const requestLinePattern = new RegExp(`^(${token}) (\\S+) HTTP/(\\d)\\.(\\d)$`)
/** name ":" value, the value visible ASCII, obs-text, space or tab: a CR, LF or NUL anywhere refuses the request. */
const fieldLinePattern = new RegExp(`^${token}:[\\t\\x20-\\x7e\\x80-\\xff]*$`)
const originForm = /^\/[\x21-\x7e]*$/
const absoluteForm = /^https?:\/\/[^/?#\s]+(\/[\x21-\x7e]*)?$/i

const reasons: Record<number, string> = {
  100: 'Continue',
  200: 'OK',
  201: 'Created',
  400: 'Bad Request',
  401: 'Unauthorized',
  404: 'Not Found',
  408: 'Request Timeout',
  409: 'Conflict',
  411: 'Length Required',
  413: 'Content Too Large',
  417: 'Expectation Failed',
  431: 'Request Header Fields Too Large',
  500: 'Internal Server Error',
  503: 'Service Unavailable',
  505: 'HTTP Version Not Supported',
}

/** A request head the server refuses, with the status and what to tell the client. */
class Refusal {
  constructor(
    readonly status: number,
    readonly message: string,
  ) {}
}

type Head = { method: string; target: string; headers: Record<string, string>; keepAlive: boolean; bodyBytes: number; expectsContinue: boolean }

export class HttpServer {
  private readonly server: NetServer
  private readonly connections = new Set<Connection>()
  private readonly requestReadTimeoutMs: number
  private readonly keepAliveTimeoutMs: number
  private readonly maxHeaderBytes: number
  private readonly maxBodyBytes: number
  private sweeper: NodeJS.Timeout | undefined
  private shuttingDown = false
  private dateSecond = -1
  private dateText = ''

  constructor(private readonly options: HttpServerOptions) {
    this.requestReadTimeoutMs = options.requestReadTimeoutMs ?? 10_000
    this.keepAliveTimeoutMs = options.keepAliveTimeoutMs ?? 60_000
    this.maxHeaderBytes = options.maxHeaderBytes ?? 16 * 1024
    this.maxBodyBytes = options.maxBodyBytes ?? 16 * 1024
    const accept = (socket: Socket) => this.accept(socket)
    // allowHalfOpen: a client that ends its side after a request still gets the answer.
    this.server = options.tls
      ? createTlsServer(
          {
            allowHalfOpen: true,
            noDelay: true,
            cert: options.tls.cert,
            key: options.tls.key,
            ca: options.tls.ca,
            requestCert: options.tls.requireClientCertificate,
            rejectUnauthorized: options.tls.requireClientCertificate,
            handshakeTimeout: this.requestReadTimeoutMs,
          },
          accept,
        )
      : createNetServer({ allowHalfOpen: true, noDelay: true }, accept)
    // A failed TLS handshake concerns that client only.
    this.server.on('tlsClientError', () => undefined)
  }

  listen(address: ListenOptions): Promise<void> {
    return new Promise((resolve, reject) => {
      this.server.once('error', reject)
      this.server.listen(address, () => {
        this.server.off('error', reject)
        // Often enough that a timeout is late by at most a quarter of itself.
        this.sweeper = setInterval(() => this.sweep(), Math.min(1_000, this.requestReadTimeoutMs / 4))
        this.sweeper.unref()
        resolve()
      })
    })
  }

  address(): AddressInfo | string | null {
    return this.server.address()
  }

  get listening(): boolean {
    return this.server.listening
  }

  /**
   * Stops taking connections; idle ones close at once, and each one with a
   * request in progress closes after its answer (which says so). After
   * `drainMs` whatever is left is cut.
   */
  async close(options: { drainMs: number }): Promise<void> {
    this.shuttingDown = true
    clearInterval(this.sweeper)
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()))
    for (const connection of this.connections) {
      if (!connection.busy && connection.unread === undefined) connection.socket.destroy()
    }
    // Partly read requests still get the read timeout's protection while draining.
    const sweeping = setInterval(() => this.sweep(), Math.min(1_000, this.requestReadTimeoutMs / 4))
    const cut = setTimeout(() => this.closeAllConnections(), options.drainMs)
    try {
      await closed
    } finally {
      clearInterval(sweeping)
      clearTimeout(cut)
    }
  }

  /** Cuts every connection now, answered or not. */
  closeAllConnections(): void {
    for (const connection of this.connections) connection.socket.destroy()
  }

  private accept(socket: Socket): void {
    if (this.shuttingDown) return void socket.destroy()
    const connection: Connection = {
      socket,
      unread: undefined,
      busy: false,
      blocked: false,
      closing: false,
      ended: false,
      continued: false,
      // A connection that sends nothing is held to the request read timeout too.
      requestStartedAt: Date.now(),
      headComplete: false,
      lastActiveAt: Date.now(),
    }
    this.connections.add(connection)
    socket.on('data', (chunk: Buffer) => this.received(connection, chunk))
    socket.on('end', () => {
      connection.ended = true
      this.serve(connection)
    })
    socket.on('drain', () => {
      connection.blocked = false
      this.serve(connection)
    })
    // A reset or a failed write concerns this client only; 'close' follows.
    socket.on('error', () => undefined)
    socket.on('close', () => this.connections.delete(connection))
  }

  private received(connection: Connection, chunk: Buffer): void {
    if (connection.closing) return
    if (connection.unread === undefined) {
      connection.unread = chunk
      if (connection.requestStartedAt === 0) connection.requestStartedAt = Date.now()
    } else {
      connection.unread = Buffer.concat([connection.unread, chunk])
    }
    // A client that sends faster than it reads is held at the socket, not in memory.
    if ((connection.busy || connection.blocked) && connection.unread.length > this.maxHeaderBytes + this.maxBodyBytes) connection.socket.pause()
    this.serve(connection)
  }

  /** Takes the next complete request off the connection, if it may. */
  private serve(connection: Connection): void {
    if (connection.busy || connection.blocked || connection.closing) return
    const unread = connection.unread
    if (unread === undefined) {
      if (connection.ended) this.finish(connection)
      return
    }
    if (connection.socket.isPaused()) connection.socket.resume()
    let start = 0
    // RFC 9112 §2.2: empty lines before a request line are ignored.
    while (unread[start] === 0x0d && unread[start + 1] === 0x0a) start += 2
    const end = unread.indexOf(headEnd, start)
    if (end === -1 || end - start > this.maxHeaderBytes) {
      if (unread.length - start > this.maxHeaderBytes) this.refuse(connection, new Refusal(431, `the request head is larger than ${this.maxHeaderBytes} bytes`))
      else if (start === unread.length) this.consumed(connection, unread, start)
      else if (connection.ended) this.refuse(connection, new Refusal(400, 'the connection ended inside a request'))
      return
    }
    const head = this.parseHead(unread.toString('latin1', start, end))
    if (head instanceof Refusal) return this.refuse(connection, head)
    const bodyStart = end + headEnd.length
    const bodyEnd = bodyStart + head.bodyBytes
    if (unread.length < bodyEnd) {
      connection.headComplete = true
      if (connection.ended) return this.refuse(connection, new Refusal(400, 'the connection ended inside a request body'))
      if (head.expectsContinue && !connection.continued) {
        connection.continued = true
        connection.socket.write('HTTP/1.1 100 Continue\r\n\r\n')
      }
      return
    }
    this.consumed(connection, unread, bodyEnd)
    connection.busy = true
    const request: HttpRequest = { method: head.method, target: head.target, headers: head.headers, body: unread.subarray(bodyStart, bodyEnd) }
    this.options.handle(request).then(
      (answer) => this.answer(connection, answer, head.keepAlive, head.method === 'HEAD'),
      () => this.answer(connection, errorAnswer(500, 'internal error'), false, false),
    )
  }

  /** Drops the bytes before `at`; the request after them, if any, has begun. */
  private consumed(connection: Connection, unread: Buffer, at: number): void {
    connection.unread = at === unread.length ? undefined : unread.subarray(at)
    connection.requestStartedAt = connection.unread === undefined ? 0 : Date.now()
    connection.headComplete = false
    connection.continued = false
  }

  private parseHead(text: string): Head | Refusal {
    const lines = text.split('\r\n')
    const requestLine = requestLinePattern.exec(lines[0]!)
    if (requestLine === null) return new Refusal(400, 'the request line is not "METHOD target HTTP/1.1"')
    const [, method, rawTarget, major, minor] = requestLine as unknown as [string, string, string, string, string]
    if (major !== '1' || (minor !== '0' && minor !== '1')) return new Refusal(505, 'only HTTP/1.0 and HTTP/1.1 are served')
    const target = originForm.test(rawTarget) ? rawTarget : absoluteForm.exec(rawTarget)?.[1] ?? (absoluteForm.test(rawTarget) ? '/' : undefined)
    if (target === undefined) return new Refusal(400, 'the request target is not a path')
    const headers: Record<string, string> = Object.create(null)
    let contentLength: string | undefined
    for (let i = 1; i < lines.length; i++) {
      const line = lines[i]!
      if (!fieldLinePattern.test(line)) return new Refusal(400, `header line ${i} is malformed (folded, a bare CR or LF, a space before the colon, or a bad character)`)
      const colon = line.indexOf(':')
      const name = line.slice(0, colon).toLowerCase()
      const value = line.slice(colon + 1).replace(/^[ \t]+|[ \t]+$/g, '')
      if (name === 'content-length') {
        if (!/^\d{1,15}$/.test(value) || (contentLength !== undefined && contentLength !== value)) return new Refusal(400, 'the content-length is not one decimal number')
        contentLength = value
        headers[name] = value
      } else if (name === 'host' && headers.host !== undefined) {
        return new Refusal(400, 'more than one host header')
      } else {
        const earlier = headers[name]
        headers[name] = earlier === undefined ? value : `${earlier}, ${value}`
      }
    }
    if (minor === '1' && headers.host === undefined) return new Refusal(400, 'an HTTP/1.1 request needs a host header')
    if (headers['transfer-encoding'] !== undefined) return new Refusal(411, 'transfer-encoding is not accepted; send the body with a content-length')
    const bodyBytes = contentLength === undefined ? 0 : Number(contentLength)
    if (bodyBytes > this.maxBodyBytes) return new Refusal(413, `body too large (limit ${this.maxBodyBytes} bytes)`)
    const expect = headers.expect?.toLowerCase()
    if (expect !== undefined && expect !== '100-continue') return new Refusal(417, 'the only expectation met is 100-continue')
    const connection = headers.connection?.toLowerCase() ?? ''
    const keepAlive = minor === '1' ? !/(^|,)\s*close\s*(,|$)/.test(connection) : /(^|,)\s*keep-alive\s*(,|$)/.test(connection)
    return { method, target, headers, keepAlive, bodyBytes, expectsContinue: expect !== undefined && bodyBytes > 0 }
  }

  /** Writes the answer in one write; the connection goes on to its next request, or closes. */
  private answer(connection: Connection, answer: HttpAnswer, keepAlive: boolean, headOnly: boolean): void {
    connection.busy = false
    const { socket } = connection
    if (socket.destroyed) return
    const open = keepAlive && !this.shuttingDown
    let text = `HTTP/1.1 ${answer.status} ${reasons[answer.status] ?? 'Unknown'}\r\ndate: ${this.date()}\r\n`
    for (const name in answer.headers) {
      const value = answer.headers[name]!
      // Values come from this process, never from a request; a line break would still split the answer.
      if (/[\r\n]/.test(value)) return this.answer(connection, errorAnswer(500, 'internal error'), false, false)
      text += `${name}: ${value}\r\n`
    }
    text += `content-length: ${Buffer.byteLength(answer.body)}\r\n${open ? `connection: keep-alive\r\nkeep-alive: timeout=${Math.floor(this.keepAliveTimeoutMs / 1_000)}` : 'connection: close'}\r\n\r\n`
    if (!headOnly) text += answer.body
    connection.lastActiveAt = Date.now()
    // The next request's clock starts now: it could not be read while this one was with the handler.
    if (connection.unread !== undefined) connection.requestStartedAt = connection.lastActiveAt
    if (!socket.write(text)) connection.blocked = true
    if (!open) return this.finish(connection)
    this.serve(connection)
  }

  /** Answers a request the server will not pass on, then closes the connection. */
  private refuse(connection: Connection, refusal: Refusal): void {
    this.options.onRefused?.(refusal.status)
    connection.unread = undefined
    this.answer(connection, errorAnswer(refusal.status, refusal.message), false, false)
  }

  /**
   * Reads no more and ends the connection once what was written is out. Unread
   * bytes left in the kernel would turn the close into a reset that can
   * overtake the answer, so it goes on reading (and dropping) until the
   * client closes, for at most a second.
   */
  private finish(connection: Connection): void {
    if (connection.closing) return
    connection.closing = true
    connection.unread = undefined
    const { socket } = connection
    socket.resume()
    socket.end()
    setTimeout(() => socket.destroy(), 1_000).unref()
  }

  /** Cuts requests that arrive too slowly, and keep-alive connections idle too long. */
  private sweep(): void {
    const now = Date.now()
    for (const connection of this.connections) {
      if (connection.busy || connection.closing) continue
      if (connection.requestStartedAt === 0) {
        if (now - connection.lastActiveAt > this.keepAliveTimeoutMs) connection.socket.destroy()
        continue
      }
      const waited = now - connection.requestStartedAt
      if (waited > this.requestReadTimeoutMs || (!connection.headComplete && waited > this.requestReadTimeoutMs / 2)) {
        this.refuse(connection, new Refusal(408, 'the request did not arrive in time'))
      }
    }
  }

  /** The Date header, made once a second. */
  private date(): string {
    const now = Date.now()
    const second = Math.floor(now / 1_000)
    if (second !== this.dateSecond) {
      this.dateSecond = second
      this.dateText = new Date(now).toUTCString()
    }
    return this.dateText
  }
}

export function errorAnswer(status: number, message: string): HttpAnswer {
  return { status, headers: { 'content-type': 'application/json' }, body: JSON.stringify({ error: message }) }
}
