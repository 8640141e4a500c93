import { createServer as createNetServer, type AddressInfo, type ListenOptions, type Server as NetServer, type Socket } from 'node:net'
import { createServer as createTlsServer } from 'node:tls'
import { endLingering } from '../protocol/endLingering.js'

/**
 * The parent API's HTTP/1.1 server: the subset of RFC 9112 its clients use
 * (the Worker's fetch, the operator CLI, curl, Prometheus), on plain TCP or
 * TLS, with keep-alive and pipelining, and nothing else.
 *
 * Why not Node's `http`: its request and response objects, streams and
 * events cost the parent's one thread time on every signature, and under
 * load the signatures wait for that thread. On this server the parent spends
 * about a fifth less CPU per signature (README, Benchmarks).
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
  /** Lower-case names. Date, Content-Length, Transfer-Encoding, Connection and Keep-Alive are the server's: an answer that sets one is answered 500 instead. */
  headers: Record<string, string>
  body: string
  /** The connection closes after this answer (a refused authentication: whoever forges requests pays a connection for each). */
  close?: boolean
  /** The request was authenticated: from now on its connection may idle for `keepAliveTimeoutMs` (see `unauthenticatedKeepAliveMs`). */
  authenticated?: boolean
}

export type HttpServerOptions = {
  /** Answers every complete, well-formed request; a rejection is answered 500 and the connection closed. */
  handle: (request: HttpRequest) => Promise<HttpAnswer>
  /** Called with the status of each answer the server makes itself: a request malformed, too large or too slow, or a handler that failed. */
  onRefused?: (status: number) => void
  tls?: { cert: string; key: string; ca?: string; requireClientCertificate?: boolean }
  /** How long a client may take to send a whole request, its headers within half of it; default 10 s. */
  requestReadTimeoutMs?: number
  /** How long an idle keep-alive connection stays open; default 60 s. */
  keepAliveTimeoutMs?: number
  /**
   * How long an idle keep-alive connection stays open while none of its answers said `authenticated`; default
   * `keepAliveTimeoutMs`. Set shorter, it also bounds such a connection's life: its first answer after that long
   * says close. Short, a client that never authenticates cannot hold its connections (and their places under
   * `maxConnections`) with a cheap request now and then, nor with answers it does not read.
   */
  unauthenticatedKeepAliveMs?: number
  maxHeaderBytes?: number
  maxBodyBytes?: number
  /**
   * Connections held at once, TLS handshakes included; one more is closed as it arrives. Unlimited by default.
   * Clients that open connections without end would otherwise take every file descriptor, the enclave
   * pool's reconnections included.
   */
  maxConnections?: number
  /** Called for each connection closed for being over maxConnections. */
  onConnectionDropped?: () => void
  /**
   * Called with each error of the listening socket once it listens (a failed accept(): out of memory, say). Such an
   * error must not end the process and every connection with it, as it would with no listener.
   */
  onListenerError?: (error: Error) => void
}

type Connection = {
  socket: Socket
  /**
   * Bytes read and not yet taken by a request, as they came. They are joined
   * only to look for the end of a head (at most maxHeaderBytes) or once a
   * parsed head's whole body is in: a body that arrives a byte at a time
   * costs neither a re-parse nor a copy per byte.
   */
  parts: Buffer[]
  partsBytes: number
  /** Where the search for the end of the head resumes: the bytes before it hold none. */
  scannedBytes: number
  /** The head of the request being read, once complete, while its body is still coming. */
  waiting: { head: Head; bodyStart: number; bodyEnd: number } | undefined
  /** A request is with the handler and not yet answered: later ones wait, in order. */
  busy: boolean
  /** Its answers have run ahead of the client's reading: later requests wait for 'drain'. */
  blocked: boolean
  /** No more requests are read: the connection closes once the current answer is out. */
  closing: boolean
  /** The client has ended its side. */
  ended: boolean
  /** When the request being read began (its first byte, or the end of the answer before it); 0 while idle. */
  requestStartedAt: number
  /** When its last answer went out or was taken in by the socket. */
  lastActiveAt: number
  /** It has had an answer. */
  answered: boolean
  /** One of its requests was authenticated (see `unauthenticatedKeepAliveMs`). */
  authenticated: boolean
  /** When it was accepted. */
  openedAt: number
  /** The request in progress is a HEAD, from its request line until it is answered: any answer to it, a refusal too, is the head alone (RFC 9110 §9.3.2). */
  headRequest: boolean
}

const headEnd = Buffer.from('\r\n\r\n')

/** An LF at or after `from` not preceded by CR. */
function hasBareLf(bytes: Buffer, from: number): boolean {
  for (let at = bytes.indexOf(0x0a, from); at !== -1; at = bytes.indexOf(0x0a, at + 1)) if (at === 0 || bytes[at - 1] !== 0x0d) return true
  return false
}
const token = "[!#$%&'*+\\-.^_`|~0-9A-Za-z]+"
const requestLinePattern = new RegExp(`^(${token}) (\\S+) HTTP/(\\d)\\.(\\d)$`)
/** name ":" value, the value visible ASCII, obs-text, space or tab: a CR, LF or NUL anywhere refuses the request. */
const fieldLinePattern = new RegExp(`^${token}:[\\t\\x20-\\x7e\\x80-\\xff]*$`)
const fieldNamePattern = new RegExp(`^${token}$`)
/** Set by the server alone: the framing and connection headers, and Date. */
const serverHeaders = new Set(['content-length', 'transfer-encoding', 'connection', 'keep-alive', 'date'])
const originForm = /^\/[\x21-\x7e]*$/
const absoluteForm = /^https?:\/\/[^/?#\s]+([/?][\x21-\x7e]*)?$/i

const reasons: Record<number, string> = {
  200: 'OK',
  201: 'Created',
  400: 'Bad Request',
  401: 'Unauthorized',
  403: 'Forbidden',
  404: 'Not Found',
  405: 'Method Not Allowed',
  408: 'Request Timeout',
  409: 'Conflict',
  411: 'Length Required',
  413: 'Content Too Large',
  417: 'Expectation Failed',
  431: 'Request Header Fields Too Large',
  500: 'Internal Server Error',
  501: 'Not Implemented',
  503: 'Service Unavailable',
  505: 'HTTP Version Not Supported',
}

/** What the server answers itself, and closes on: a request it refuses, or a handler that failed (500). The status and what to tell the client. */
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
  /** Every TCP connection, TLS handshakes in progress included, for closeAllConnections. */
  private readonly sockets = new Set<Socket>()
  private readonly requestReadTimeoutMs: number
  private readonly keepAliveTimeoutMs: number
  private readonly unauthenticatedKeepAliveMs: number
  /** How long a connection none of whose requests authenticated is kept alive at all: only when set shorter than the keep-alive. */
  private readonly unauthenticatedLifetimeMs: number
  private readonly maxHeaderBytes: number
  private readonly maxBodyBytes: number
  private sweeper: NodeJS.Timeout | undefined
  private shuttingDown = false
  private dateSecond = -1
  private dateText = ''

  constructor(private readonly options: HttpServerOptions) {
    this.requestReadTimeoutMs = options.requestReadTimeoutMs ?? 10_000
    this.keepAliveTimeoutMs = options.keepAliveTimeoutMs ?? 60_000
    this.unauthenticatedKeepAliveMs = Math.min(options.unauthenticatedKeepAliveMs ?? this.keepAliveTimeoutMs, this.keepAliveTimeoutMs)
    // A server whose answers never authenticate (the benchmark's floor) keeps its connections as long as they are used.
    this.unauthenticatedLifetimeMs = this.unauthenticatedKeepAliveMs < this.keepAliveTimeoutMs ? this.unauthenticatedKeepAliveMs : Number.POSITIVE_INFINITY
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
            ALPNProtocols: ['http/1.1'],
          },
          accept,
        )
      : createNetServer({ allowHalfOpen: true, noDelay: true }, accept)
    // A failed TLS handshake concerns that client only.
    this.server.on('tlsClientError', () => undefined)
    if (options.maxConnections !== undefined) this.server.maxConnections = options.maxConnections
    this.server.on('drop', () => options.onConnectionDropped?.())
    this.server.on('connection', (socket: Socket) => {
      this.sockets.add(socket)
      socket.once('close', () => this.sockets.delete(socket))
    })
  }

  listen(address: ListenOptions): Promise<void> {
    return new Promise((resolve, reject) => {
      this.server.once('error', reject)
      this.server.listen(address, () => {
        this.server.off('error', reject)
        this.server.on('error', (error: Error) => this.options.onListenerError?.(error))
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
   * request in progress or an answer still going out closes after it (the
   * answer says so). After `drainMs` whatever is left is cut.
   */
  async close(options: { drainMs: number }): Promise<void> {
    this.shuttingDown = true
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()))
    for (const connection of this.connections) this.serve(connection)
    // The sweeper runs on while draining: partly read requests keep the read timeout's protection.
    const cut = setTimeout(() => this.closeAllConnections(), options.drainMs)
    try {
      await closed
    } finally {
      clearInterval(this.sweeper)
      clearTimeout(cut)
    }
  }

  /** Cuts every connection now, answered or not, TLS handshakes included. */
  closeAllConnections(): void {
    for (const socket of this.sockets) socket.destroy()
  }

  private accept(socket: Socket): void {
    if (this.shuttingDown) return void socket.destroy()
    const now = Date.now()
    const connection: Connection = {
      socket,
      parts: [],
      partsBytes: 0,
      scannedBytes: 0,
      waiting: undefined,
      busy: false,
      blocked: false,
      closing: false,
      ended: false,
      // A connection that sends nothing is held to the request read timeout too.
      requestStartedAt: now,
      lastActiveAt: now,
      answered: false,
      authenticated: false,
      openedAt: now,
      headRequest: false,
    }
    this.connections.add(connection)
    socket.on('data', (chunk: Buffer) => this.received(connection, chunk))
    socket.on('end', () => {
      connection.ended = true
      this.serve(connection)
    })
    socket.on('drain', () => {
      connection.blocked = false
      connection.lastActiveAt = Date.now()
      // What came while it was blocked could not be read: its clock starts now.
      if (connection.partsBytes > 0) connection.requestStartedAt = connection.lastActiveAt
      this.serve(connection)
    })
    // A reset or a failed write concerns this client only; 'close' follows.
    socket.on('error', () => undefined)
    socket.on('close', () => this.connections.delete(connection))
  }

  private received(connection: Connection, chunk: Buffer): void {
    if (connection.closing) return
    if (connection.requestStartedAt === 0) connection.requestStartedAt = Date.now()
    connection.parts.push(chunk)
    connection.partsBytes += chunk.length
    // A client that sends faster than it reads is held at the socket, not in memory.
    if ((connection.busy || connection.blocked) && connection.partsBytes > this.maxHeaderBytes + this.maxBodyBytes) connection.socket.pause()
    this.serve(connection)
  }

  /** Takes the next complete request off the connection if it may, or closes it once it has nothing left to do. */
  private serve(connection: Connection): void {
    if (connection.busy || connection.blocked || connection.closing) return
    if (connection.partsBytes === 0) {
      if (connection.ended || this.shuttingDown) this.finish(connection)
      return
    }
    if (connection.socket.isPaused()) connection.socket.resume()
    if (connection.waiting === undefined) {
      const unread = this.joined(connection)
      let start = 0
      // RFC 9112 §2.2: empty lines before a request line are ignored.
      while (unread[start] === 0x0d && unread[start + 1] === 0x0a) start += 2
      if (start > 0) {
        this.consume(connection, unread, start)
        // After an answer they are the tail of the request before (some clients end a body with CRLF), and the
        // connection is idle again; on a new connection they do not stop the clock that cuts one that sends nothing.
        if (connection.partsBytes === 0 && connection.answered) connection.requestStartedAt = 0
        return this.serve(connection)
      }
      const scanFrom = Math.max(0, connection.scannedBytes - (headEnd.length - 1))
      const end = unread.indexOf(headEnd, scanFrom)
      // A head whose lines end in bare LF never shows CRLFCRLF: refused now, not timed out.
      if (end === -1 && hasBareLf(unread, scanFrom)) return this.refuse(connection, new Refusal(400, 'a line of the request head ends in a bare LF: lines end in CRLF'))
      if (end === -1 || end > this.maxHeaderBytes) {
        connection.scannedBytes = unread.length
        // Up to 3 more bytes may be the start of the blank line that ends a head of exactly the limit.
        if (end > this.maxHeaderBytes || unread.length > this.maxHeaderBytes + headEnd.length - 1) this.refuse(connection, new Refusal(431, `the request head is larger than ${this.maxHeaderBytes} bytes`))
        else if (connection.ended) this.refuse(connection, new Refusal(400, 'the connection ended inside a request'))
        return
      }
      const head = this.parseHead(unread.toString('latin1', 0, end), connection)
      if (head instanceof Refusal) return this.refuse(connection, head)
      const bodyStart = end + headEnd.length
      connection.waiting = { head, bodyStart, bodyEnd: bodyStart + head.bodyBytes }
      if (head.expectsContinue && connection.partsBytes < connection.waiting.bodyEnd) connection.socket.write('HTTP/1.1 100 Continue\r\n\r\n')
    }
    const { head, bodyStart, bodyEnd } = connection.waiting
    if (connection.partsBytes < bodyEnd) {
      if (connection.ended) this.refuse(connection, new Refusal(400, 'the connection ended inside a request body'))
      return
    }
    const unread = this.joined(connection)
    const request: HttpRequest = { method: head.method, target: head.target, headers: head.headers, body: unread.subarray(bodyStart, bodyEnd) }
    this.consume(connection, unread, bodyEnd)
    connection.busy = true
    let answered: Promise<HttpAnswer>
    try {
      answered = this.options.handle(request)
    } catch (error) {
      answered = Promise.reject(error)
    }
    answered
      .then(
        (answer) => this.answer(connection, answer, head.keepAlive),
        () => this.refuse(connection, new Refusal(500, 'internal error')),
      )
      // Nothing above should throw; if it does, this connection ends and the process serves on.
      .catch(() => connection.socket.destroy())
  }

  /** The unread bytes as one buffer (kept as the only part). */
  private joined(connection: Connection): Buffer {
    if (connection.parts.length > 1) connection.parts = [Buffer.concat(connection.parts, connection.partsBytes)]
    return connection.parts[0]!
  }

  /** Drops the bytes before `at`: a request was taken, or empty lines skipped. */
  private consume(connection: Connection, unread: Buffer, at: number): void {
    const rest = unread.subarray(at)
    connection.parts = rest.length === 0 ? [] : [rest]
    connection.partsBytes = rest.length
    connection.scannedBytes = 0
    connection.waiting = undefined
  }

  /** Parses a request's head; from its request line on, `connection.headRequest` says whether it is a HEAD. */
  private parseHead(text: string, connection: Connection): Head | Refusal {
    const lines = text.split('\r\n')
    const requestLine = requestLinePattern.exec(lines[0]!)
    if (requestLine === null) return new Refusal(400, 'the request line is not "METHOD target HTTP/1.1"')
    const [, method, rawTarget, major, minor] = requestLine as unknown as [string, string, string, string, string]
    connection.headRequest = method === 'HEAD'
    return major === '1' ? this.parseFields(lines, method, rawTarget, minor === '0') : new Refusal(505, 'only HTTP/1.x is served')
  }

  /** The rest of a head after an HTTP/1.x request line; a later 1.x is read as 1.1 (RFC 9110 §2.5). */
  private parseFields(lines: string[], method: string, rawTarget: string, http10: boolean): Head | Refusal {
    const target = originFormOf(rawTarget)
    if (target === undefined) return new Refusal(400, 'the request target is not a path')
    const headers: Record<string, string> = Object.create(null)
    let contentLength: string | undefined
    for (let i = 1; i < lines.length; i++) {
      const line = lines[i]!
      if (!fieldLinePattern.test(line)) return new Refusal(400, `header line ${i} is malformed (folded, a bare CR or LF, a space before the colon, or a bad character)`)
      const colon = line.indexOf(':')
      const name = line.slice(0, colon).toLowerCase()
      const value = withoutOptionalWhitespace(line, colon + 1)
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
    if (!http10 && headers.host === undefined) return new Refusal(400, 'an HTTP/1.1 request needs a host header')
    if (headers['transfer-encoding'] !== undefined) {
      // RFC 9112 §6.1: HTTP/1.0 has no transfer codings, so the framing is faulty; a 1.1 client can send a length instead.
      if (http10) return new Refusal(400, 'transfer-encoding in an HTTP/1.0 request: its framing is faulty')
      return new Refusal(411, 'transfer-encoding is not accepted; send the body with a content-length')
    }
    const bodyBytes = contentLength === undefined ? 0 : Number(contentLength)
    if (bodyBytes > this.maxBodyBytes) return new Refusal(413, `body too large (limit ${this.maxBodyBytes} bytes)`)
    // RFC 9110 §10.1.1: an HTTP/1.0 client's expectation is ignored.
    const expect = http10 ? undefined : headers.expect?.toLowerCase()
    if (expect !== undefined && expect !== '100-continue') return new Refusal(417, 'the only expectation met is 100-continue')
    const connection = headers.connection?.toLowerCase() ?? ''
    const keepAlive = http10 ? /(^|,)\s*keep-alive\s*(,|$)/.test(connection) : !/(^|,)\s*close\s*(,|$)/.test(connection)
    return { method, target, headers, keepAlive, bodyBytes, expectsContinue: expect !== undefined && bodyBytes > 0 }
  }

  /** Writes the answer in one write (the head alone for a HEAD request); the connection goes on to its next request, or closes. */
  private answer(connection: Connection, answer: HttpAnswer, keepAlive: boolean): void {
    connection.busy = false
    const { socket } = connection
    if (socket.destroyed) return
    if (answer.authenticated) connection.authenticated = true
    const now = Date.now()
    const open = keepAlive && !this.shuttingDown && !answer.close && (connection.authenticated || now - connection.openedAt < this.unauthenticatedLifetimeMs)
    let text = `HTTP/1.1 ${answer.status} ${reasons[answer.status] ?? 'Unknown'}\r\ndate: ${this.date()}\r\n`
    for (const name in answer.headers) {
      const value = answer.headers[name]!
      // Headers come from this process, never from a request; still, a line break would split the answer, and
      // a framing header of the handler's would contradict the server's own.
      if (/[\r\n]/.test(value) || !fieldNamePattern.test(name) || serverHeaders.has(name)) return this.refuse(connection, new Refusal(500, 'internal error'))
      text += `${name}: ${value}\r\n`
    }
    text += `content-length: ${Buffer.byteLength(answer.body)}\r\n${open ? `connection: keep-alive\r\nkeep-alive: timeout=${Math.floor(this.idleTimeoutOf(connection) / 1_000)}` : 'connection: close'}\r\n\r\n`
    if (!connection.headRequest) text += answer.body
    connection.headRequest = false
    connection.lastActiveAt = now
    connection.answered = true
    // The next request's clock starts now: it could not be read while this one was with the handler.
    connection.requestStartedAt = connection.partsBytes > 0 ? connection.lastActiveAt : 0
    if (!socket.write(text)) connection.blocked = true
    if (!open) return this.finish(connection)
    this.serve(connection)
  }

  /** Answers a request the server will not pass on, or one its handler failed, counts it, then closes the connection. */
  private refuse(connection: Connection, refusal: Refusal): void {
    this.options.onRefused?.(refusal.status)
    connection.parts = []
    connection.partsBytes = 0
    this.answer(connection, errorAnswer(refusal.status, refusal.message), false)
  }

  /**
   * Takes no more requests and ends the connection once what was written is
   * out, reading (and dropping, in `received`) until the client closes: for a
   * second after the answer has gone out, and for no longer than a slow
   * reader is given at all (the shorter time, if it never authenticated).
   */
  private finish(connection: Connection): void {
    if (connection.closing) return
    connection.closing = true
    connection.parts = []
    connection.partsBytes = 0
    endLingering(connection.socket, { lingerMs: 1_000, capMs: this.idleTimeoutOf(connection) })
  }

  private idleTimeoutOf(connection: Connection): number {
    return connection.authenticated ? this.keepAliveTimeoutMs : this.unauthenticatedKeepAliveMs
  }

  /**
   * Cuts requests that arrive too slowly (408), keep-alive connections idle
   * too long, and clients that have not taken an answer in as long.
   */
  private sweep(): void {
    const now = Date.now()
    for (const connection of this.connections) {
      if (connection.busy || connection.closing) continue
      if (connection.blocked || connection.requestStartedAt === 0) {
        // One that does not take its answers is held to the same time as an idle one: an unauthenticated client
        // that stops reading must not keep its connection for the authenticated keep-alive.
        if (now - connection.lastActiveAt > this.idleTimeoutOf(connection)) connection.socket.destroy()
        continue
      }
      const waited = now - connection.requestStartedAt
      if (waited > this.requestReadTimeoutMs || (connection.waiting === undefined && waited > this.requestReadTimeoutMs / 2)) {
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

function errorAnswer(status: number, message: string): HttpAnswer {
  return { status, headers: { 'content-type': 'application/json' }, body: JSON.stringify({ error: message }) }
}

/** A request target as a path: itself, or the path and query of an absolute-form one (a bare query gets its `/`); undefined if neither. */
function originFormOf(rawTarget: string): string | undefined {
  if (originForm.test(rawTarget)) return rawTarget
  const absolute = absoluteForm.exec(rawTarget)
  if (absolute === null) return undefined
  const pathAndQuery = absolute[1] ?? ''
  return pathAndQuery.startsWith('/') ? pathAndQuery : `/${pathAndQuery}`
}

/** A field value without the optional whitespace around it (RFC 9110 §5.5), by index: a regex here can take time quadratic in a run of spaces. */
function withoutOptionalWhitespace(line: string, from: number): string {
  let start = from
  let end = line.length
  while (start < end && (line.charCodeAt(start) === 0x20 || line.charCodeAt(start) === 0x09)) start++
  while (end > start && (line.charCodeAt(end - 1) === 0x20 || line.charCodeAt(end - 1) === 0x09)) end--
  return line.slice(start, end)
}
