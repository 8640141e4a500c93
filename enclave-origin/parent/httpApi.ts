import { messageOf } from '../errors.js'
import { maxKeyIdBytes } from '../protocol/messages.js'
import { signatureHeaders, type RequestVerifier } from '../protocol/requestSigning.js'
import type { KeyState } from '../types.js'
import { HttpServer, type HttpAnswer, type HttpRequest, type HttpServerOptions } from './httpServer.js'
import { originMetrics } from './metrics.js'
import { ThrottledLog } from '../throttledLog.js'
import { KeyTurnTimeoutError, NeedsUnlockError, OriginRequestError, OverloadedError, preloadRefusalOf, type EnclaveHealth, type OriginParent } from './origin.js'

export type ParentApiOptions = {
  parent: OriginParent
  verifier: RequestVerifier
  log: (fields: Record<string, unknown>) => void
  /** TLS, optionally requiring client certificates; plain HTTP otherwise. */
  tls?: HttpServerOptions['tls']
  /** How long a client may take to send a whole request (headers within half of it); default 10 s. */
  requestReadTimeoutMs?: number
  /** Client connections held at once; more are closed as they arrive. Default 10,000. */
  maxConnections?: number
  /** HMAC key ids that may only sign and read keys (the Worker's); 403 for anything else. */
  signOnlyKeyIds?: ReadonlySet<string>
  /** Connections the operators' listener (see `createParentServers`) holds at once; default 64. */
  operatorMaxConnections?: number
  /** How long a connection that has authenticated no request may idle; default 5 s (60 s once one has). */
  unauthenticatedKeepAliveMs?: number
}

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
export function createParentApi(options: ParentApiOptions): HttpServer {
  return createParentServers(options).clients
}

/**
 * The API on two servers that share routes, metrics and logs: the clients' (`MAX_CONNECTIONS`), and the
 * operators' (`OPERATOR_LISTEN`), whose own connection limit a flood of client connections cannot take:
 * a freeze must get through when the parent is under attack. Either listens only when told to.
 */
export function createParentServers(options: ParentApiOptions): { clients: HttpServer; operators: HttpServer } {
  const metrics = originMetrics(options.parent)
  const { figures } = metrics
  const throttledLog = new ThrottledLog({ log: options.log })

  const json = (status: number, body: unknown, headers: Record<string, string> = {}): HttpAnswer => ({
    status,
    headers: { 'content-type': 'application/json', ...headers },
    body: JSON.stringify(body),
  })

  /** Undefined once the request's signature holds (the route then counts as authenticated), else the 401 to answer. */
  const authenticate = async (request: HttpRequest, method: string, path: string, route: { authenticated: boolean }): Promise<HttpAnswer | undefined> => {
    const failure = await options.verifier.verify({ method, path, headers: (header) => request.headers[header], body: request.body })
    if (failure) {
      // Why goes to the operator, not the caller: which check failed is a hint to whoever forges requests.
      metrics.authFailures.inc({ reason: failure })
      throttledLog.write(`refused ${failure}`, { level: 'warn', event: 'request_refused', reason: failure, hmacKeyId: printable(request.headers[signatureHeaders.keyId]) })
      return { ...json(401, { error: 'request authentication failed' }), close: true }
    }
    route.authenticated = true
    return undefined
  }

  const handle = async (request: HttpRequest, route: { name: string; authenticated: boolean }): Promise<HttpAnswer> => {
    // The path is all a route needs; no query string means anything here (and none is signed: see below).
    const { target, method, body } = request
    const query = target.indexOf('?')
    const path = query === -1 ? target : target.slice(0, query)
    const found = routeOf(path)
    // Settled before authentication: the routes are no secret (the README lists them), and a caller with the
    // wrong method or path learns which it got wrong.
    if (!knownMethods.has(method)) return json(501, { error: `the method ${printable(method, 16)} is not implemented` })
    if (!found) return json(404, { error: 'no such route' })
    const name = found.methods[method]
    if (name === undefined) {
      const allowed = Object.keys(found.methods)
      return json(405, { error: `${path} takes ${allowed.join(' or ')}` }, { allow: allowed.join(', ') })
    }
    // Named once it is served: a refused request counts under `unknown`.
    if (name === 'healthz' || name === 'metrics') route.name = name
    if (name === 'healthz') {
      // The parts' error texts (hosts, ports, a store's paths, a preload's refusal) and the enclaves' figures go to
      // signed requests alone (the CLI's status); an anonymous probe (a load balancer's) gets the verdict and which
      // part is not well. A request that claims a signature and fails it is refused, as on any route.
      const signed = request.headers[signatureHeaders.keyId] !== undefined
      if (signed) {
        const refused = await authenticate(request, method, path, route)
        if (refused) return refused
      }
      const enclaves = await options.parent.health()
      const store = options.parent.storeHealth()
      const status = healthStatus({ enclaves, storeOk: store.ok })
      const body = signed
        ? { ok: status === 'ok', status, enclaves, store }
        : { ok: status === 'ok', status, enclaves: enclaves.map(({ id, answered, ok, held }) => ({ id, answered, ok, ...(held === undefined ? {} : { held }) })), store: { ok: store.ok } }
      return json(status === 'down' ? 503 : 200, body)
    }
    if (name === 'metrics') return { status: 200, headers: { 'content-type': metrics.contentType }, body: await metrics.text() }
    // The signature covers the path alone: a query on a signed request could be changed in flight without breaking it,
    // harmless while no route reads one, a bypass the day one does.
    if (query !== -1) return json(400, { error: `${path} takes no query string` })

    const refused = await authenticate(request, method, path, route)
    if (refused) return refused

    const hmacKeyId = request.headers[signatureHeaders.keyId] ?? ''
    if (name !== 'sign' && name !== 'get' && options.signOnlyKeyIds?.has(hmacKeyId)) {
      // Authenticated, but not an operator: a leaked Worker secret must not undo a freeze.
      metrics.authFailures.inc({ reason: 'not-permitted' })
      throttledLog.write('refused not-permitted', { level: 'warn', event: 'request_refused', reason: 'not-permitted', hmacKeyId, method, path: printable(path) })
      return json(403, { error: 'this HMAC key may only sign and read keys' })
    }
    route.name = name
    // A body where a route reads none is a mistake of the caller's (`{"count": 2}` to a create makes one key): said, not
    // ignored. `{}` says nothing, and is what many HTTP clients send for a POST without data.
    if (!isEmptyBody(body) && name !== 'unlock' && name !== 'sign') return json(400, { error: `${method} ${path} takes no body` })
    switch (name) {
      case 'create':
        return json(201, await options.parent.createKey())
      case 'unlock': {
        const unlock = unlockRequestOf(body)
        if (typeof unlock === 'string') return json(400, { error: unlock })
        if (unlock) {
          await options.parent.unlockWithSealedPreloadIdentities(unlock)
          return json(200, { ok: true })
        }
        await options.parent.unlock()
        // A preload enclave serves its accounts only once an unlock brings the identity its file was sealed to: say
        // which serve none and why, or a restarted one would look unlocked.
        const notServed = (await options.parent.health()).flatMap((enclave) => {
          const reason = preloadRefusalOf(enclave)
          return reason === undefined ? [] : [{ enclave: enclave.id, reason }]
        })
        return json(200, notServed.length > 0 ? { ok: true, preloadNotServed: notServed } : { ok: true })
      }
      case 'rotate-data-key':
        return json(200, await options.parent.rotateDataKey())
      case 'attestation': {
        const enclaves = await options.parent.attestations()
        return json(200, {
          enclaves: enclaves.map(({ id, recipient, attestationDocument }) => ({
            id,
            recipient,
            attestationDocument: attestationDocument.length > 0 ? Buffer.from(attestationDocument).toString('base64') : null,
          })),
        })
      }
    }
    // A key's own routes.
    const keyId = decodedPathSegment(found.keyIdSegment!)
    if (keyId === undefined) return json(400, { error: 'the key id in the path is not valid percent-encoding' })
    if (Buffer.byteLength(keyId) > maxKeyIdBytes) return json(400, { error: `the key id is longer than ${maxKeyIdBytes} bytes` })
    if (name === 'get') return json(200, await options.parent.getKey(keyId))
    if (name === 'sign') {
      const digest = parseDigest(body)
      if (!digest) return json(400, { error: 'body must be {"digest": "0x" + 32 bytes hex}' })
      return signAnswer(keyId, digest)
    }
    const state = keyStateOf[name]!
    await options.parent.setState(keyId, state)
    return json(200, { keyId, state })
  }

  /**
   * A sign, its latency by phase observed and returned in Server-Timing. `total` counts signs that failed too (a
   * timeout, a refusal), or its percentiles would look best while the origin fails; the phases count signatures.
   */
  const signAnswer = async (keyId: string, digest: Uint8Array): Promise<HttpAnswer> => {
    const started = performance.now()
    const { rpcMs, enclaveMs, ...signed } = await options.parent.sign(keyId, digest).catch((error: unknown) => {
      figures.observeSign('total', (performance.now() - started) / 1_000)
      throw error
    })
    const totalMs = performance.now() - started
    const queueMs = Math.max(0, rpcMs - enclaveMs)
    figures.observeSign('enclave', enclaveMs / 1_000)
    figures.observeSign('queue', queueMs / 1_000)
    figures.observeSign('rpc', rpcMs / 1_000)
    figures.observeSign('total', totalMs / 1_000)
    // Server-Timing lets a caller (and the benchmark) split its latency by phase.
    const timing = `enclave;dur=${enclaveMs.toFixed(3)}, queue;dur=${queueMs.toFixed(3)}, rpc;dur=${rpcMs.toFixed(3)}, total;dur=${totalMs.toFixed(3)}`
    return json(200, signed, { 'server-timing': timing })
  }

  const answer = async (request: HttpRequest): Promise<HttpAnswer> => {
    const route = { name: 'unknown', authenticated: false }
    const handled = await handle(request, route).catch((error: unknown) => {
      if (error instanceof NeedsUnlockError) {
        metrics.needsUnlock.inc()
        // The enclave has jittered it already (50–200 ms); Retry-After itself counts whole seconds.
        const { retryAfterMs } = error
        return json(503, { error: 'needs_unlock', retryAfterMs }, { 'retry-after': String(Math.max(1, Math.ceil(retryAfterMs / 1_000))), 'retry-after-ms': String(retryAfterMs) })
      }
      if (error instanceof OverloadedError) {
        metrics.shed.inc({ route: route.name })
        const { retryAfterMs } = error
        return json(503, { error: 'overloaded', retryAfterMs }, { 'retry-after': '1', 'retry-after-ms': String(retryAfterMs) })
      }
      if (error instanceof KeyTurnTimeoutError) return json(503, { error: error.message })
      if (error instanceof OriginRequestError) {
        return json({ 'not-found': 404, 'not-active': 409, 'bad-request': 400, unavailable: 503 }[error.kind], { error: error.message })
      }
      throttledLog.write(`failed ${route.name} ${error instanceof Error ? error.constructor.name : typeof error}`, {
        level: 'error',
        event: 'origin_request_failed',
        route: route.name,
        error: messageOf(error),
      })
      // An operator's command (an unlock KMS refused, a rotation an enclave failed) says why; a sign or a read, the
      // Worker's routes, says no more than that the origin failed.
      const operators = route.authenticated && route.name !== 'sign' && route.name !== 'get'
      return json(503, { error: operators ? `origin unavailable: ${messageOf(error)}` : 'origin unavailable' })
    })
    figures.countRequest(route.name, handled.status)
    // Set on the answer itself (each one is made for its request): no copy per request on the sign path.
    if (route.authenticated) handled.authenticated = true
    return handled
  }
  const serverHolding = (listener: 'clients' | 'operators', maxConnections: number) =>
    new HttpServer({
      handle: answer,
      onRefused: (status) => figures.countRequest('unknown', status),
      tls: options.tls,
      // Slow clients, before any authentication, must not hold connections for long.
      requestReadTimeoutMs: options.requestReadTimeoutMs,
      unauthenticatedKeepAliveMs: options.unauthenticatedKeepAliveMs ?? 5_000,
      maxConnections,
      onConnectionDropped: () => metrics.droppedConnections.inc({ listener }),
      onListenerError: (error) => throttledLog.write(`listener error ${listener}`, { level: 'error', event: 'listener_error', listener, error: messageOf(error) }),
    })
  return { clients: serverHolding('clients', options.maxConnections ?? 10_000), operators: serverHolding('operators', options.operatorMaxConnections ?? 64) }
}

/** Methods of RFC 9110 §9: one the API does not take on a path it has is answered 405, any other 501. */
const knownMethods = new Set(['GET', 'HEAD', 'POST', 'PUT', 'DELETE', 'PATCH', 'OPTIONS', 'CONNECT', 'TRACE'])

/** The route names of the API's paths by the methods each takes; HEAD on the probes, as load balancers use it (the server sends the head alone). */
const fixedRoutes = new Map<string, Record<string, string>>([
  ['/healthz', { GET: 'healthz', HEAD: 'healthz' }],
  ['/metrics', { GET: 'metrics', HEAD: 'metrics' }],
  ['/v1/keys', { POST: 'create' }],
  ['/v1/unlock', { POST: 'unlock' }],
  ['/v1/data-key/rotate', { POST: 'rotate-data-key' }],
  ['/v1/attestation', { GET: 'attestation' }],
])
const keyActions: Record<string, Record<string, string>> = {
  '': { GET: 'get' },
  sign: { POST: 'sign' },
  freeze: { POST: 'freeze' },
  unfreeze: { POST: 'unfreeze' },
  archive: { POST: 'archive' },
}
const keyStateOf: Record<string, KeyState> = { freeze: 'frozen', unfreeze: 'active', archive: 'archived' }

/** The methods a path takes and, on a key's routes, its key id as sent; undefined for a path the API does not have. */
function routeOf(path: string): { methods: Record<string, string>; keyIdSegment?: string } | undefined {
  const fixed = fixedRoutes.get(path)
  if (fixed) return { methods: fixed }
  const keyRoute = /^\/v1\/keys\/([^/]+)(?:\/(sign|freeze|unfreeze|archive))?$/.exec(path)
  return keyRoute ? { methods: keyActions[keyRoute[2] ?? '']!, keyIdSegment: keyRoute[1]! } : undefined
}

function decodedPathSegment(segment: string): string | undefined {
  try {
    return decodeURIComponent(segment)
  } catch {
    return undefined
  }
}

/**
 * An unlock body: empty (unwrap the data key again), or
 * `{"sealedPreloadIdentities": {"<enclave id>": "<base64 age ciphertext>", …}}`
 * for preload mode. A string says what is wrong with it.
 */
function unlockRequestOf(body: Uint8Array): Map<string, Uint8Array> | undefined | string {
  if (isEmptyBody(body)) return undefined
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

/** No bytes, or a JSON object with nothing in it (`{}`, whitespace allowed). */
function isEmptyBody(body: Uint8Array): boolean {
  return body.length === 0 || (body.length <= 64 && /^[ \t\r\n]*\{[ \t\r\n]*\}[ \t\r\n]*$/.test(Buffer.from(body).toString('latin1')))
}

function parseDigest(body: Uint8Array): Uint8Array | undefined {
  try {
    const { digest } = JSON.parse(utf8.decode(body)) as { digest?: unknown }
    return typeof digest === 'string' && /^0x[0-9a-fA-F]{64}$/.test(digest) ? Buffer.from(digest.slice(2), 'hex') : undefined
  } catch {
    return undefined
  }
}

/**
 * A client's text for a log line: its first `max` characters, each outside visible ASCII as `?`. Header bytes
 * 0x80–0xff arrive as latin-1 characters, and JSON leaves the C1 controls among them unescaped, which some
 * terminals act on.
 */
function printable(text: string | undefined, max = 64): string | undefined {
  return text?.slice(0, max).replace(/[^\x21-\x7e]/g, '?')
}
