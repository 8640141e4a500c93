import { createServer as createHttpServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http'
import { createServer as createHttpsServer } from 'node:https'
import { messageOf } from '../errors.js'
import { maxKeyIdBytes } from '../protocol/messages.js'
import type { RequestVerifier } from '../protocol/requestSigning.js'
import type { KeyState } from '../types.js'
import { originMetrics } from './metrics.js'
import { ThrottledLog } from './throttledLog.js'
import { NeedsUnlockError, OriginRequestError, type EnclaveHealth, type OriginParent } from './origin.js'

export type ParentApiOptions = {
  parent: OriginParent
  verifier: RequestVerifier
  log: (fields: Record<string, unknown>) => void
  /** TLS, optionally requiring client certificates; plain HTTP on loopback otherwise. */
  tls?: { cert: string; key: string; ca?: string; requireClientCertificate?: boolean }
  /** How long a client may take to send a whole request (headers within half of it); default 10 s. */
  requestReadTimeoutMs?: number
}

const maxBodyBytes = 16 * 1024
const utf8 = new TextDecoder()

/**
 * `/healthz`'s verdict. Degraded still serves: other enclaves sign for the
 * keys of one that is not well. Only a parent that can serve nothing asks to
 * be taken out: no enclave answers and is in service (one held back after
 * failing requests still answers, and a lone one is still tried), or the
 * store takes no writes.
 */
export function healthStatus({ enclaves, storeOk }: { enclaves: EnclaveHealth[]; storeOk: boolean }): 'ok' | 'degraded' | 'down' {
  if (!storeOk || !enclaves.some((enclave) => enclave.ok || enclave.held)) return 'down'
  return enclaves.every((enclave) => enclave.ok) ? 'ok' : 'degraded'
}

/**
 * The parent's HTTP(S) API for the Worker and operators: create, sign, get,
 * freeze / unfreeze / archive, unlock, attestation, DEK rotation, /healthz
 * and /metrics. Every route but the two probes needs an HMAC-signed request
 * (stale or replayed ones are refused).
 */
export function createParentApi(options: ParentApiOptions): Server {
  const metrics = originMetrics(options.parent)
  const { figures } = metrics
  const throttledLog = new ThrottledLog({ log: options.log })

  const send = (response: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}) => {
    const json = JSON.stringify(body)
    // An explicit length: writeHead would otherwise commit to chunked encoding, an extra frame per answer.
    response.writeHead(status, { 'content-type': 'application/json', 'content-length': String(Buffer.byteLength(json)), ...headers }).end(json)
  }

  const handle = async (request: IncomingMessage, response: ServerResponse, route: { name: string }) => {
    // The path is all a route needs; no query string means anything here.
    const target = request.url ?? '/'
    const query = target.indexOf('?')
    const path = query === -1 ? target : target.slice(0, query)
    if (request.method === 'GET' && path === '/healthz') {
      route.name = 'healthz'
      const enclaves = await options.parent.health()
      const store = options.parent.storeHealth()
      const status = healthStatus({ enclaves, storeOk: store.ok })
      return send(response, status === 'down' ? 503 : 200, { ok: status === 'ok', status, enclaves, store })
    }
    if (request.method === 'GET' && path === '/metrics') {
      route.name = 'metrics'
      // The text first: headers sent before it fails could not be followed by the error's own.
      const text = await metrics.text()
      response.writeHead(200, { 'content-type': metrics.contentType }).end(text)
      return
    }

    // A declared length over the limit is refused before a byte of the body is read.
    const body = Number(request.headers['content-length'] ?? 0) > maxBodyBytes ? undefined : await readBody(request)
    if (body === undefined) return send(response, 413, { error: `body too large (limit ${maxBodyBytes} bytes)` }, { connection: 'close' })
    const failure = await options.verifier.verify({ method: request.method ?? 'GET', path, headers: (name) => header(request, name), body })
    if (failure) {
      // Why goes to the operator, not the caller: which check failed is a hint to whoever forges requests.
      metrics.authFailures.inc({ reason: failure })
      throttledLog.write(`refused ${failure}`, { level: 'warn', event: 'request_refused', reason: failure, hmacKeyId: header(request, 'x-origin-key-id')?.slice(0, 64) })
      return send(response, 401, { error: 'request authentication failed' })
    }

    const keyRoute = /^\/v1\/keys\/([^/]+)(?:\/(sign|freeze|unfreeze|archive))?$/.exec(path)
    if (request.method === 'POST' && path === '/v1/keys') {
      route.name = 'create'
      return send(response, 201, await options.parent.createKey())
    }
    if (request.method === 'POST' && path === '/v1/unlock') {
      route.name = 'unlock'
      const unlock = unlockRequestOf(body)
      if (typeof unlock === 'string') return send(response, 400, { error: unlock })
      await (unlock ? options.parent.unlockWithSealedPreloadIdentities(unlock) : options.parent.unlock())
      return send(response, 200, { ok: true })
    }
    if (request.method === 'POST' && path === '/v1/data-key/rotate') {
      route.name = 'rotate-data-key'
      return send(response, 200, await options.parent.rotateDataKey())
    }
    if (request.method === 'GET' && path === '/v1/attestation') {
      route.name = 'attestation'
      const enclaves = await options.parent.attestations()
      return send(response, 200, {
        enclaves: enclaves.map(({ id, recipient, attestationDocument }) => ({
          id,
          recipient,
          attestationDocument: attestationDocument.length > 0 ? Buffer.from(attestationDocument).toString('base64') : null,
        })),
      })
    }
    if (keyRoute) {
      const keyId = decodedPathSegment(keyRoute[1]!)
      if (keyId === undefined) return send(response, 400, { error: 'the key id in the path is not valid percent-encoding' })
      if (Buffer.byteLength(keyId) > maxKeyIdBytes) return send(response, 400, { error: `the key id is longer than ${maxKeyIdBytes} bytes` })
      const action = keyRoute[2]
      if (request.method === 'GET' && !action) {
        route.name = 'get'
        return send(response, 200, await options.parent.getKey(keyId))
      }
      if (request.method === 'POST' && action === 'sign') {
        route.name = 'sign'
        const digest = parseDigest(body)
        if (!digest) return send(response, 400, { error: 'body must be {"digest": "0x" + 32 bytes hex}' })
        const started = performance.now()
        const { rpcMs, enclaveMs, ...signed } = await options.parent.sign(keyId, digest)
        const totalMs = performance.now() - started
        const queueMs = Math.max(0, rpcMs - enclaveMs)
        figures.observeSign('enclave', enclaveMs / 1_000)
        figures.observeSign('queue', queueMs / 1_000)
        figures.observeSign('rpc', rpcMs / 1_000)
        figures.observeSign('total', totalMs / 1_000)
        // Server-Timing lets a caller (and the benchmark) split its latency by phase.
        const timing = `enclave;dur=${enclaveMs.toFixed(3)}, queue;dur=${queueMs.toFixed(3)}, rpc;dur=${rpcMs.toFixed(3)}, total;dur=${totalMs.toFixed(3)}`
        return send(response, 200, signed, { 'server-timing': timing })
      }
      const states: Record<string, KeyState> = { freeze: 'frozen', unfreeze: 'active', archive: 'archived' }
      if (request.method === 'POST' && action && states[action]) {
        route.name = action
        await options.parent.setState(keyId, states[action]!)
        return send(response, 200, { keyId, state: states[action] })
      }
    }
    route.name = 'unknown'
    return send(response, 404, { error: 'no such route' })
  }

  const listener = (request: IncomingMessage, response: ServerResponse) => {
    const route = { name: 'unknown' }
    handle(request, response, route)
      .catch((error: unknown) => {
        // Too late for a status: the answer has begun. Cutting the connection tells the client it is incomplete.
        if (response.headersSent) return void response.destroy()
        if (error instanceof NeedsUnlockError) {
          metrics.needsUnlock.inc()
          // The enclave has jittered it already (50–200 ms); Retry-After itself counts whole seconds.
          const { retryAfterMs } = error
          return send(response, 503, { error: 'needs_unlock', retryAfterMs }, { 'retry-after': String(Math.max(1, Math.ceil(retryAfterMs / 1_000))), 'retry-after-ms': String(retryAfterMs) })
        }
        if (error instanceof OriginRequestError) {
          return send(response, { 'not-found': 404, 'not-active': 409, 'bad-request': 400, unavailable: 503 }[error.kind], { error: error.message })
        }
        throttledLog.write(`failed ${route.name} ${error instanceof Error ? error.constructor.name : typeof error}`, {
          level: 'error',
          event: 'origin_request_failed',
          route: route.name,
          error: messageOf(error),
        })
        return send(response, 503, { error: 'origin unavailable' })
      })
      .finally(() => figures.countRequest(route.name, response.statusCode))
      // Nothing above should throw; if it does, this connection ends and the process serves on.
      .catch(() => response.destroy())
  }
  // Slow clients, before any authentication, must not hold connections for Node's default five minutes.
  const requestTimeout = options.requestReadTimeoutMs ?? 10_000
  const timeouts = { requestTimeout, headersTimeout: requestTimeout / 2, connectionsCheckingInterval: Math.min(1_000, requestTimeout / 4) }
  const server = options.tls
    ? createHttpsServer(
        { ...timeouts, cert: options.tls.cert, key: options.tls.key, ca: options.tls.ca, requestCert: options.tls.requireClientCertificate, rejectUnauthorized: options.tls.requireClientCertificate },
        listener,
      )
    : createHttpServer(timeouts, listener)
  server.keepAliveTimeout = 60_000
  return server
}

/**
 * Stops taking connections and lets requests in flight finish for up to
 * `drainMs`; then cuts what is left. Idle keep-alive connections close at once.
 */
export async function closeGracefully(server: Server, options: { drainMs: number }): Promise<void> {
  const closed = new Promise<void>((resolve) => server.close(() => resolve()))
  // close() ends the connections idle at that moment; a keep-alive connection whose answer goes out later turns idle after it.
  const idle = setInterval(() => server.closeIdleConnections(), 20)
  const cut = setTimeout(() => server.closeAllConnections(), options.drainMs)
  try {
    await closed
  } finally {
    clearInterval(idle)
    clearTimeout(cut)
  }
}

function decodedPathSegment(segment: string): string | undefined {
  try {
    return decodeURIComponent(segment)
  } catch {
    return undefined
  }
}

function header(request: IncomingMessage, name: string): string | undefined {
  const value = request.headers[name]
  return Array.isArray(value) ? value[0] : value
}

/** The whole body, or undefined past maxBodyBytes (the rest is not read: the 413 closes the connection). */
function readBody(request: IncomingMessage): Promise<Uint8Array | undefined> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = []
    let total = 0
    const onData = (chunk: Buffer) => {
      total += chunk.length
      if (total <= maxBodyBytes) return void chunks.push(chunk)
      request.off('data', onData).off('end', onEnd).pause()
      resolve(undefined)
    }
    const onEnd = () => resolve(chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks))
    request.on('data', onData).on('end', onEnd).once('error', reject)
    // 'close' follows every request; only before 'end' does it mean the client went away mid-body.
    // The check comes first: building the Error (its stack trace) cost about 20 µs on every request.
    request.once('close', () => {
      if (!request.readableEnded) reject(new Error('the request closed before its body was complete'))
    })
  })
}

/**
 * An unlock body: empty (unwrap the data key again), or
 * `{"sealedPreloadIdentities": {"<enclave id>": "<base64 age ciphertext>", …}}`
 * for preload mode. A string says what is wrong with it.
 */
function unlockRequestOf(body: Uint8Array): Map<string, Uint8Array> | undefined | string {
  if (body.length === 0) return undefined
  const expected = 'the unlock body must be empty or {"sealedPreloadIdentities": {"<enclave id>": "<base64>", …}}'
  let parsed: unknown
  try {
    parsed = JSON.parse(utf8.decode(body))
  } catch {
    return expected
  }
  if (typeof parsed !== 'object' || parsed === null) return expected
  if ('preloadIdentity' in parsed) return 'a preload identity in the clear is refused: seal it to each enclave\'s attested recipient (GET /v1/attestation; `origin unlock` does this)'
  const sealed = (parsed as { sealedPreloadIdentities?: unknown }).sealedPreloadIdentities
  if (typeof sealed !== 'object' || sealed === null || Array.isArray(sealed)) return expected
  const entries = Object.entries(sealed)
  if (entries.length === 0 || !entries.every(([, value]) => typeof value === 'string' && /^[A-Za-z0-9+/]+={0,2}$/.test(value))) return expected
  return new Map(entries.map(([id, value]) => [id, new Uint8Array(Buffer.from(value as string, 'base64'))]))
}

function parseDigest(body: Uint8Array): Uint8Array | undefined {
  try {
    const { digest } = JSON.parse(utf8.decode(body)) as { digest?: unknown }
    return typeof digest === 'string' && /^0x[0-9a-fA-F]{64}$/.test(digest) ? Buffer.from(digest.slice(2), 'hex') : undefined
  } catch {
    return undefined
  }
}
