/**
 * AF_VSOCK stream sockets for the parent ↔ enclave link, shaped like the TCP
 * code uses them: `listenVsock` calls back with a `net.Socket` per connection,
 * `connectVsock` resolves to one.
 *
 * Node has no vsock support; the only addon in the registry is
 * `node-vsock-linux-x64-gnu` (napi-rs, github.com/wei-rong-1/node-vsock), a
 * bare `.node` file whose one export is
 *
 *   class VsockSocket {
 *     constructor(emit: (err, event, ...args) => void, fd?: number)  // socket(AF_VSOCK, SOCK_STREAM) unless fd is given
 *     listen(port)            // bind(VMADDR_CID_ANY, port) + listen; a thread accept()s and emits ('_connection', fd)
 *     connect(cid, port)      // a thread connect()s (retrying, see below) and emits '_connect' or ('_error', Error)
 *     setMaxConnectionAttempts(n), startRecv(), writeBuffer(buf), writeText(s), shutdown(), end(), close()
 *   }
 *
 * Its data path (a recv thread, blocking `send()` on the JS thread) would stall
 * the event loop, so only the addon's connect and accept are used: each
 * connected descriptor is handed to libuv as a stream (a `Pipe` handle opened
 * on the fd, as `net.Socket({ fd })` would do if libuv recognised AF_VSOCK —
 * it reports "UNKNOWN" and Node throws ERR_INVALID_FD_TYPE). The result is a
 * real non-blocking `net.Socket` with backpressure, half-close and `destroy()`.
 *
 * Limits of the addon, handled here:
 * - `connect` retries 5 times with 1+2+4+8+16 s sleeps and even reports an
 *   error after a later attempt succeeded; it is set to one attempt, and the
 *   addon still sleeps 1 s before reporting a failure.
 * - It does not expose the fd of a socket it created; that of a connecting
 *   socket is found by diffing /proc/self/fd around its creation (a new socket
 *   inode; ambiguous results from other threads opening sockets are retried).
 * - On garbage collection it closes its fd number, by then owned by libuv and
 *   perhaps reused: the wrapper of every connected client socket is therefore
 *   kept referenced for the life of the process (a few hundred bytes each; the
 *   parent keeps a small pool of long-lived connections). Node still runs
 *   those finalizers when the environment is torn down: at process exit this
 *   is harmless (it may print "Failed to shutdown socket ... EBADF"), but in a
 *   worker thread it would close fd numbers the process may have reused — use
 *   this module from the main thread only.
 * - The accept thread cannot be stopped (close() does not wake a blocked
 *   accept(); the thread would then spin on EBADF), and it keeps the event loop
 *   alive. A listening port therefore stays bound until the process exits:
 *   `close()` stops handing out connections (new ones are closed at once) and
 *   a later `listenVsock` on the same port reuses the bound socket.
 * - It always binds VMADDR_CID_ANY, and does not set FD_CLOEXEC (a child
 *   process spawned meanwhile inherits open connections).
 * - `process.binding('pipe_wrap')` is a deprecated (DEP0111, documentation
 *   only) but supported way to reach the `Pipe` handle.
 */
import { readdirSync, readlinkSync } from 'node:fs'
import { Socket, type SocketConstructorOpts } from 'node:net'
import { messageOf } from '../errors.js'
import { requireAddon } from '../nativeAddon.js'

/** Any address (listen side). */
export const VMADDR_CID_ANY = 0xffffffff
/** The hypervisor. */
export const VMADDR_CID_HYPERVISOR = 0
/** This machine, through the vsock_loopback transport (CONFIG_VSOCKETS_LOOPBACK). */
export const VMADDR_CID_LOCAL = 1
/** The host (in a Nitro Enclave, the parent instance is CID 3, not this). */
export const VMADDR_CID_HOST = 2
/** "Any port": not usable here (the addon does not report which port it bound). */
export const VMADDR_PORT_ANY = 0xffffffff

export interface VsockAddress {
  cid: number
  port: number
}

export interface VsockListener {
  readonly port: number
  /** Stops handing out connections; resolves once the connections it accepted have all closed (like `net.Server.close`). */
  close(): Promise<void>
}

/** An error from the vsock layer; `code` is the errno name when there is one (`ECONNRESET`, `ETIMEDOUT`, `EADDRINUSE`...). */
export class VsockError extends Error {
  constructor(
    message: string,
    readonly code: string | undefined,
  ) {
    super(message)
    this.name = 'VsockError'
  }
}

/** `vsock:CID:PORT` (decimal, each a u32) → `{ cid, port }`; anything else → undefined. */
export function parseVsockAddress(address: string): VsockAddress | undefined {
  const match = /^vsock:(\d{1,10}):(\d{1,10})$/.exec(address)
  if (!match) return undefined
  const cid = Number(match[1])
  const port = Number(match[2])
  if (cid > 0xffffffff || port > 0xffffffff) return undefined
  return { cid, port }
}

// ---------------------------------------------------------------------------
// The addon and libuv's Pipe handle

type Emit = (...args: unknown[]) => void

interface AddonSocket {
  listen(port: number): void
  connect(cid: number, port: number): void
  setMaxConnectionAttempts(attempts: number): void
  shutdown(): void
  close(): void
}

interface Addon {
  VsockSocket: new (emit: Emit, fd?: number) => AddonSocket
}

interface PipeHandle {
  open(fd: number): number
  close(callback?: () => void): void
}

interface PipeWrap {
  Pipe: new (type: number) => PipeHandle
  constants: { SOCKET: number }
}

const ADDON_PACKAGE = 'node-vsock-linux-x64-gnu'

let addon: Addon | undefined
let pipeWrap: PipeWrap | undefined

function loadAddon(): Addon {
  try {
    addon ??= requireAddon<Addon>(ADDON_PACKAGE, ['VsockSocket'])
  } catch (error) {
    throw new VsockError(`vsock is unavailable: ${messageOf(error)}`, 'ENOTSUP')
  }
  return addon
}

function loadPipeWrap(): PipeWrap {
  if (!pipeWrap) {
    const binding = (process as unknown as { binding?: (name: string) => unknown }).binding
    const wrap = typeof binding === 'function' ? (binding.call(process, 'pipe_wrap') as Partial<PipeWrap>) : undefined
    if (typeof wrap?.Pipe !== 'function' || typeof wrap.constants?.SOCKET !== 'number') {
      throw new VsockError("vsock is unavailable: this Node has no process.binding('pipe_wrap').Pipe", 'ENOTSUP')
    }
    pipeWrap = wrap as PipeWrap
  }
  return pipeWrap
}

const noop: Emit = () => {}

/** The addon calls back `(null, event, ...args)` from its threads and `(event)` or `(null, event)` from synchronous calls. */
function decodeEvent(args: unknown[]): { name: string; value: unknown } {
  const [first, second, third] = args
  if (typeof first === 'string') return { name: first, value: second }
  if (first instanceof Error) return { name: '_error', value: first }
  return { name: typeof second === 'string' ? second : '', value: third }
}

/** `prefix: <cause's message>`, coded with the errno name in that message: the addon reports errno only as text. */
function vsockError(prefix: string, cause: unknown): VsockError {
  const message = messageOf(cause)
  return new VsockError(`${prefix}: ${message}`, /\b(E[A-Z0-9]{2,})\b/.exec(message)?.[1])
}

/** Hands a connected vsock fd to libuv: from here on the returned socket owns (and closes) it. */
function adoptFd(fd: number): Socket {
  const { Pipe, constants } = loadPipeWrap()
  const handle = new Pipe(constants.SOCKET)
  const status = handle.open(fd)
  if (status !== 0) {
    handle.close()
    throw new VsockError(`cannot hand vsock fd ${fd} to libuv (status ${status})`, undefined)
  }
  return new Socket({ handle, readable: true, writable: true } as unknown as SocketConstructorOpts)
}

/** Closes an fd nothing else owns, through the addon (Node has no close for a bare socket fd it does not know). */
function closeFd(fd: number): void {
  try {
    const owner = new (loadAddon().VsockSocket)(noop, fd)
    owner.close()
  } catch {
    // Already closed: nothing to do.
  }
}

function closeQuietly(socket: AddonSocket, shutdown = false): void {
  try {
    if (shutdown) socket.shutdown()
  } catch {
    // Not connected.
  }
  try {
    socket.close()
  } catch {
    // Already closed.
  }
}

function socketFds(): Map<number, string> {
  const fds = new Map<number, string>()
  for (const name of readdirSync('/proc/self/fd')) {
    try {
      const link = readlinkSync(`/proc/self/fd/${name}`)
      if (link.startsWith('socket:')) fds.set(Number(name), link)
    } catch {
      // Closed meanwhile (the directory's own fd, among others).
    }
  }
  return fds
}

/** A new AF_VSOCK socket from the addon, with its fd number (see the header for why it has to be found). */
function createAddonSocket(emit: Emit): { socket: AddonSocket; fd: number } {
  const { VsockSocket } = loadAddon()
  for (let attempt = 0; attempt < 8; attempt++) {
    const before = socketFds()
    let socket: AddonSocket
    try {
      socket = new VsockSocket(emit)
    } catch (error) {
      throw vsockError('cannot create an AF_VSOCK socket', error)
    }
    const created = [...socketFds()].filter(([fd, link]) => before.get(fd) !== link)
    if (created.length === 1) return { socket, fd: created[0]![0] }
    // Another thread opened a socket at the same moment: ours is among them, but which one is unknown.
    closeQuietly(socket)
  }
  throw new VsockError('cannot identify the fd of a new AF_VSOCK socket (other threads keep opening sockets)', undefined)
}

let available: boolean | undefined

/** True when the addon loads, libuv's Pipe handle is reachable and an AF_VSOCK socket can be created (not that any peer is reachable). */
export function vsockAvailable(): boolean {
  if (available === undefined) {
    try {
      if (process.platform !== 'linux') throw new Error('not Linux')
      loadPipeWrap()
      const probe = new (loadAddon().VsockSocket)(noop)
      closeQuietly(probe)
      available = true
    } catch {
      available = false
    }
  }
  return available
}

function checkU32(name: string, value: unknown, max = 0xffffffff): asserts value is number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 0 || value > max) {
    throw new VsockError(`${name} must be an integer from 0 to ${max}, not ${String(value)}`, 'EINVAL')
  }
}

// ---------------------------------------------------------------------------
// Client

/** Wrappers whose fd now belongs to libuv: kept referenced so that their finalizer never closes that fd number. */
const adopted = new Set<AddonSocket>()

/**
 * Connects to `cid:port` and resolves to a connected `net.Socket`, or rejects
 * with a `VsockError` (`code` ECONNRESET when nothing listens, ETIMEDOUT when
 * the kernel's 2 s connect timeout ran out, or when `timeoutMs` did).
 */
export function connectVsock(options: { cid: number; port: number; timeoutMs?: number }): Promise<Socket> {
  const { cid, port, timeoutMs } = options
  return new Promise<Socket>((resolve, reject) => {
    checkU32('cid', cid)
    checkU32('port', port, VMADDR_PORT_ANY - 1)
    const target = `vsock:${cid}:${port}`
    let settled = false
    let timer: ReturnType<typeof setTimeout> | undefined
    let created: { socket: AddonSocket; fd: number } | undefined
    const settle = (action: () => void) => {
      if (timer) clearTimeout(timer)
      if (settled) return
      settled = true
      action()
    }
    const emit: Emit = (...args) => {
      const { name, value } = decodeEvent(args)
      if (!created || (name !== '_connect' && name !== '_error')) return
      const { socket: addonSocket, fd } = created
      // Its fd is libuv's now (and its number may be another socket's): a late event must not close it.
      if (adopted.has(addonSocket)) return
      if (name === '_error') {
        closeQuietly(addonSocket)
        settle(() => reject(vsockError(`vsock connect to ${target} failed`, value)))
        return
      }
      if (settled) {
        // Timed out meanwhile: the fd is still the addon's to close.
        closeQuietly(addonSocket, true)
        return
      }
      let socket: Socket
      try {
        socket = adoptFd(fd)
      } catch (error) {
        closeQuietly(addonSocket, true)
        settle(() => reject(error))
        return
      }
      adopted.add(addonSocket)
      settle(() => resolve(socket))
    }
    created = createAddonSocket(emit)
    try {
      created.socket.setMaxConnectionAttempts(1)
      created.socket.connect(cid, port)
    } catch (error) {
      closeQuietly(created.socket)
      throw vsockError(`vsock connect to ${target} failed`, error)
    }
    if (timeoutMs !== undefined) {
      timer = setTimeout(() => {
        settle(() => reject(new VsockError(`vsock connect to ${target} timed out after ${timeoutMs} ms`, 'ETIMEDOUT')))
      }, timeoutMs)
    }
  })
}

// ---------------------------------------------------------------------------
// Server

interface Listening {
  onConnection: (socket: Socket) => void
  onError: ((error: Error) => void) | undefined
  sockets: Set<Socket>
  drained: (() => void) | undefined
}

/** One bound, listening addon socket per port, for the life of the process (see the header). */
const acceptors = new Map<number, { socket: AddonSocket; active: Listening | undefined }>()

function onAcceptorEvent(port: number, args: unknown[]): void {
  const { name, value } = decodeEvent(args)
  const active = acceptors.get(port)?.active
  if (name === '_connection' && typeof value === 'number') {
    let socket: Socket
    try {
      socket = adoptFd(value)
    } catch (error) {
      closeFd(value)
      active?.onError?.(error as Error)
      return
    }
    if (!active) {
      socket.destroy()
      return
    }
    active.sockets.add(socket)
    socket.once('close', () => {
      active.sockets.delete(socket)
      if (active.sockets.size === 0) active.drained?.()
    })
    active.onConnection(socket)
  } else if (name === '_error') {
    active?.onError?.(vsockError(`vsock port ${port}`, value))
  }
}

/**
 * Listens on `port` (all CIDs) and calls `onConnection` with a `net.Socket`
 * for each connection. Rejects with a `VsockError` (`EADDRINUSE`...) when the
 * port cannot be bound or is already being listened on in this process.
 */
export async function listenVsock(options: {
  port: number
  cid?: number
  onConnection: (socket: Socket) => void
  /** Failures of accept() (the addon retries at once). */
  onError?: (error: Error) => void
}): Promise<VsockListener> {
  const { port, cid = VMADDR_CID_ANY } = options
  checkU32('port', port, VMADDR_PORT_ANY - 1)
  if (cid !== VMADDR_CID_ANY) {
    throw new VsockError(`vsock listen on cid ${cid}: the node-vsock addon only binds VMADDR_CID_ANY`, 'EINVAL')
  }
  let acceptor = acceptors.get(port)
  if (acceptor?.active) throw new VsockError(`vsock port ${port} is already being listened on in this process`, 'EADDRINUSE')
  if (!acceptor) {
    loadPipeWrap()
    const { VsockSocket } = loadAddon()
    let socket: AddonSocket
    try {
      socket = new VsockSocket((...args) => onAcceptorEvent(port, args))
    } catch (error) {
      throw vsockError('cannot create an AF_VSOCK socket', error)
    }
    try {
      socket.listen(port)
    } catch (error) {
      closeQuietly(socket)
      throw vsockError(`cannot listen on vsock port ${port}`, error)
    }
    acceptor = { socket, active: undefined }
    acceptors.set(port, acceptor)
  }
  const listening: Listening = { onConnection: options.onConnection, onError: options.onError, sockets: new Set(), drained: undefined }
  acceptor.active = listening
  const bound = acceptor
  let closing: Promise<void> | undefined
  return {
    port,
    close() {
      closing ??= new Promise<void>((resolve) => {
        if (bound.active === listening) bound.active = undefined
        if (listening.sockets.size === 0) resolve()
        else listening.drained = resolve
      })
      return closing
    },
  }
}
