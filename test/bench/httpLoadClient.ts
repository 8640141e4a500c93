import { connect, type Socket } from 'node:net'

/**
 * A lean HTTP/1.1 keep-alive client for the benchmarks: one request at a time
 * per connection, over plain sockets. Node's own clients (fetch, http,
 * undici) spend 0.15–0.6 ms of CPU per request, which on a shared 2-core
 * machine makes the load generator, not the server, the bottleneck. This one
 * writes the request in one buffer and reads only what the benchmark needs
 * (status, Content-Length and chosen headers), so it spends a few tens of µs.
 */

export type LeanResponse = { status: number; headers: Record<string, string>; body: Buffer }

type Waiting = { resolve: (response: LeanResponse) => void; reject: (error: Error) => void }

const headerEnd = Buffer.from('\r\n\r\n')

export class LeanHttpConnection {
  private buffered: Buffer = Buffer.alloc(0)
  private waiting: Waiting | undefined
  private closedWith: Error | undefined

  private constructor(
    private readonly socket: Socket,
    private readonly host: string,
    /** Lower-case names of the response headers to keep. */
    private readonly keepHeaders: string[],
  ) {
    socket.setNoDelay(true)
    socket.on('data', (chunk: Buffer) => {
      this.buffered = this.buffered.length === 0 ? chunk : Buffer.concat([this.buffered, chunk])
      this.parse()
    })
    const fail = (error: Error) => {
      this.closedWith ??= error
      this.waiting?.reject(this.closedWith)
      this.waiting = undefined
    }
    socket.on('error', fail)
    socket.on('close', () => fail(new Error('connection closed')))
  }

  static open(options: { host: string; port: number; keepHeaders?: string[] }): Promise<LeanHttpConnection> {
    return new Promise((resolve, reject) => {
      const socket = connect({ host: options.host, port: options.port })
      socket.once('connect', () => resolve(new LeanHttpConnection(socket, `${options.host}:${options.port}`, options.keepHeaders ?? [])))
      socket.once('error', reject)
    })
  }

  request(options: { method: string; path: string; headers?: Record<string, string>; body?: Uint8Array }): Promise<LeanResponse> {
    if (this.closedWith) return Promise.reject(this.closedWith)
    if (this.waiting) return Promise.reject(new Error('LeanHttpConnection carries one request at a time'))
    const body = options.body ?? new Uint8Array(0)
    let head = `${options.method} ${options.path} HTTP/1.1\r\nhost: ${this.host}\r\ncontent-length: ${body.length}\r\n`
    for (const [name, value] of Object.entries(options.headers ?? {})) head += `${name}: ${value}\r\n`
    const request = Buffer.concat([Buffer.from(`${head}\r\n`, 'latin1'), body])
    return new Promise((resolve, reject) => {
      this.waiting = { resolve, reject }
      this.socket.write(request)
    })
  }

  close(): void {
    this.socket.destroy()
  }

  /** Completes the waiting request once its head and Content-Length bytes of body have arrived. */
  private parse(): void {
    const end = this.buffered.indexOf(headerEnd)
    if (end === -1 || !this.waiting) return
    const lines = this.buffered.toString('latin1', 0, end).split('\r\n')
    const status = Number(lines[0]!.split(' ')[1])
    const headers: Record<string, string> = {}
    let length = -1
    for (const line of lines.slice(1)) {
      const colon = line.indexOf(':')
      const name = line.slice(0, colon).toLowerCase()
      if (name === 'content-length') length = Number(line.slice(colon + 1))
      else if (this.keepHeaders.includes(name)) headers[name] = line.slice(colon + 1).trim()
    }
    if (length < 0) {
      // The origin always sends Content-Length; anything else is a bug worth seeing, not guessing around.
      this.socket.destroy(new Error(`response without Content-Length (status ${status})`))
      return
    }
    if (this.buffered.length < end + 4 + length) return
    const body = this.buffered.subarray(end + 4, end + 4 + length)
    this.buffered = this.buffered.subarray(end + 4 + length)
    const waiting = this.waiting
    this.waiting = undefined
    waiting.resolve({ status, headers, body })
  }
}
