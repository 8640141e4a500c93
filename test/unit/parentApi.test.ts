import { execFile } from 'node:child_process'
import { mkdtempSync, readdirSync, rmSync } from 'node:fs'
import { connect, createServer as createNetServer, type Socket } from 'node:net'
import { tmpdir } from 'node:os'
import path from 'node:path'
import { promisify } from 'node:util'
import type { AddressInfo } from 'node:net'
import type { HttpServer } from '../../enclave-origin/parent/httpServer.js'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import type { BlobStore } from '../../enclave-origin/parent/blobStore.js'
import { createParentApi, createParentServers, healthStatus } from '../../enclave-origin/parent/httpApi.js'
import { ThrottledLog } from '../../enclave-origin/throttledLog.js'
import { KeyTurnTimeoutError, OriginParent, OverloadedError } from '../../enclave-origin/parent/origin.js'
import { RequestVerifier, signRequest } from '../../enclave-origin/protocol/requestSigning.js'
import { buildOrigin } from '../support/origin.js'
import { exchange } from '../support/rawHttp.js'

/**
 * The parent's HTTP API against bad clients and failing parts: what it
 * answers, and that it serves on after. No enclave listens (port 1): every
 * case here is settled before one would be asked.
 */

const hmac = { keyId: 'worker', secret: 'a-test-secret-of-enough-bytes' }
let server: HttpServer
let parent: OriginParent
let base: string
const logged: Array<Record<string, unknown>> = []
/** The parent process, as production runs it (for its refusals of settings). */
let builtCli: string

beforeAll(async () => {
  builtCli = buildOrigin('parentApi')
  parent = new OriginParent({ enclaves: [{ id: 'none', address: { host: '127.0.0.1', port: 1 } }], poolSize: 1, store: {} as BlobStore, requestTimeoutMs: 200, credentials: () => Promise.reject(new Error('not needed here')) })
  server = createParentApi({ parent, verifier: new RequestVerifier({ secrets: { [hmac.keyId]: hmac.secret }, maxFutureSkewMs: 0 }), log: (fields) => logged.push(fields), requestReadTimeoutMs: 400 })
  await server.listen({ port: 0, host: '127.0.0.1' })
  base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`
})

afterAll(async () => {
  await server.close({ drainMs: 0 })
  parent.close()
})

async function signed(method: 'GET' | 'POST', path: string, body = '') {
  const payload = new TextEncoder().encode(body)
  const headers = await signRequest({ ...hmac, method, path, body: payload })
  return fetch(`${base}${path}`, { method, headers, body: method === 'POST' ? payload : undefined })
}

describe('the parent API', () => {
  it('answers 503 when its metrics cannot be gathered, and serves on', async () => {
    const health = parent.health
    parent.health = () => Promise.reject(new Error('the enclave health broke'))
    try {
      const response = await fetch(`${base}/metrics`)
      expect(response.status).toBe(503)
      expect(await response.json()).toEqual({ error: 'origin unavailable' })
    } finally {
      parent.health = health
    }
    expect((await fetch(`${base}/healthz`)).status).toBe(503)
    expect((await fetch(`${base}/metrics`)).status).toBe(200)
  })

  it('closes the connection of a request that fails authentication, and keeps one idle for 60 s only once a request on it authenticated (5 s before)', async () => {
    const port = Number(new URL(base).port)
    const raw = (method: string, path: string, headers: Record<string, string>) => `${method} ${path} HTTP/1.1\r\nhost: x\r\n${Object.entries(headers).map(([name, value]) => `${name}: ${value}\r\n`).join('')}\r\n`
    const forged = await signRequest({ keyId: 'nobody-known', secret: 'not-the-secret', method: 'GET', path: '/v1/keys/k1', body: new Uint8Array() })
    const refused = await exchange(port, [raw('GET', '/v1/keys/k1', forged) + raw('GET', '/metrics', {})], { waitMs: 3_000 })
    expect({ closed: refused.closed, statuses: [...refused.answer.matchAll(/HTTP\/1\.1 (\d{3}) /g)].map((match) => match[1]) }).toEqual({ closed: true, statuses: ['401'] })
    expect(refused.answer).toMatch(/\r\nconnection: close\r\n/)
    const anonymous = await exchange(port, [raw('GET', '/healthz', {})], { waitMs: 3_000, answers: 1 })
    expect(anonymous.answer).toMatch(/\r\nkeep-alive: timeout=5\r\n/)
    anonymous.socket.destroy()
    // Authenticated, though the parent (with no enclave) cannot answer it: 503, and the connection trusted.
    const authenticated = await exchange(port, [raw('GET', '/v1/keys/k1', await signRequest({ ...hmac, method: 'GET', path: '/v1/keys/k1', body: new Uint8Array() }))], { waitMs: 3_000, answers: 1 })
    expect(authenticated.answer).toMatch(/^HTTP\/1\.1 503 [^]*\r\nkeep-alive: timeout=60\r\n/)
    authenticated.socket.destroy()
  })

  it('answers /healthz 200 degraded while some enclaves serve, and 503 down when none does', async () => {
    const health = parent.health
    const enclave = (id: string, ok: boolean) => ({ id, answered: ok, ok, inflight: 0, admitted: 0, ...(ok ? {} : { error: 'connection refused' }) })
    try {
      parent.health = async () => [enclave('a', true), enclave('b', false)]
      const degraded = await signed('GET', '/healthz')
      expect(degraded.status).toBe(200)
      expect(await degraded.json()).toMatchObject({ ok: false, status: 'degraded', enclaves: [{ id: 'a', ok: true }, { id: 'b', ok: false, error: 'connection refused' }] })
      parent.health = async () => [enclave('a', true), enclave('b', true)]
      expect(await (await fetch(`${base}/healthz`)).json()).toMatchObject({ ok: true, status: 'ok' })
      parent.health = async () => [enclave('a', false), enclave('b', false)]
      const down = await fetch(`${base}/healthz`)
      expect(down.status).toBe(503)
      expect(await down.json()).toMatchObject({ ok: false, status: 'down' })
    } finally {
      parent.health = health
    }
  })

  it('tells an anonymous /healthz each part\u2019s verdict, and a signed one also what is wrong; a forged signature is refused', async () => {
    const health = parent.health
    const storeHealth = parent.storeHealth
    try {
      parent.health = async () => [
        { id: 'a', answered: true, ok: false, held: true, inflight: 2, admitted: 3, stats: { cacheStates: { WARM: 1 } }, error: 'held back after failing requests' },
        { id: 'b', answered: false, ok: false, inflight: 0, admitted: 0, error: 'connect ECONNREFUSED 10.1.2.3:5000' },
      ]
      parent.storeHealth = () => ({ ok: false, error: 'fsync /var/lib/origin/blobs.log: EIO' })
      const anonymous = await fetch(`${base}/healthz`)
      expect(anonymous.status).toBe(503)
      expect(await anonymous.json()).toEqual({
        ok: false,
        status: 'down',
        enclaves: [
          { id: 'a', answered: true, ok: false, held: true },
          { id: 'b', answered: false, ok: false },
        ],
        store: { ok: false },
      })
      const detailed = await signed('GET', '/healthz')
      expect(detailed.status).toBe(503)
      expect(await detailed.json()).toMatchObject({
        enclaves: [
          { id: 'a', stats: { cacheStates: { WARM: 1 } }, error: 'held back after failing requests' },
          { id: 'b', error: 'connect ECONNREFUSED 10.1.2.3:5000' },
        ],
        store: { ok: false, error: 'fsync /var/lib/origin/blobs.log: EIO' },
      })
      // On an API of its own: the shared one's refusal counts are another test's.
      const own = createParentApi({ parent, verifier: new RequestVerifier({ secrets: { [hmac.keyId]: hmac.secret }, maxFutureSkewMs: 0 }), log: () => {} })
      await own.listen({ port: 0, host: '127.0.0.1' })
      try {
        const forged = await signRequest({ keyId: hmac.keyId, secret: 'not-the-secret-but-long-enough', method: 'GET', path: '/healthz', body: new Uint8Array() })
        const refused = await fetch(`http://127.0.0.1:${(own.address() as AddressInfo).port}/healthz`, { headers: forged })
        expect(refused.status).toBe(401)
        expect(await refused.json()).toEqual({ error: 'request authentication failed' })
      } finally {
        await own.close({ drainMs: 100 })
      }
    } finally {
      parent.health = health
      parent.storeHealth = storeHealth
    }
  })

  it('reports on /healthz a store that takes no more writes', async () => {
    const failed = new OriginParent({ enclaves: [{ id: 'none', address: { host: '127.0.0.1', port: 1 } }], poolSize: 1, store: { writeFailure: () => 'blob store write failed, reopen it to recover: EIO' } as BlobStore, requestTimeoutMs: 200, credentials: () => Promise.reject(new Error('not needed here')) })
    // Its enclave serves: the store alone is what is down.
    failed.health = async () => [{ id: 'a', answered: true, ok: true, inflight: 0, admitted: 0 }]
    const api = createParentApi({ parent: failed, verifier: new RequestVerifier({ secrets: { [hmac.keyId]: hmac.secret }, maxFutureSkewMs: 0 }), log: () => {} })
    await api.listen({ port: 0, host: '127.0.0.1' })
    try {
      const headers = await signRequest({ ...hmac, method: 'GET', path: '/healthz', body: new Uint8Array() })
      const response = await fetch(`http://127.0.0.1:${(api.address() as AddressInfo).port}/healthz`, { headers })
      expect(response.status).toBe(503)
      expect(await response.json()).toMatchObject({ ok: false, status: 'down', store: { ok: false, error: 'blob store write failed, reopen it to recover: EIO' } })
      expect(((await (await fetch(`${base}/healthz`)).json()) as { store: unknown }).store).toEqual({ ok: true })
    } finally {
      await api.close({ drainMs: 100 })
      failed.close()
    }
  })

  it('refuses a declared body over the limit before reading it', async () => {
    // Headers only: a server that waited for the 20,000 bytes would answer nothing before the client gives up.
    const { answer, closed } = await exchange(Number(new URL(base).port), ['POST /v1/keys HTTP/1.1\r\nhost: x\r\ncontent-length: 20000\r\n\r\n'], { waitMs: 300 })
    expect(answer).toMatch(/^HTTP\/1\.1 413 /)
    expect(answer).toContain('body too large (limit 16384 bytes)')
    expect(closed).toBe(true)
    // The server's own refusals are counted with the API's requests.
    expect(await (await fetch(`${base}/metrics`)).text()).toMatch(/^origin_requests_total\{route="unknown",status="413"\} 1$/m)
  })

  it('cuts off a client that takes too long to send its request', async () => {
    const { answer, closed } = await exchange(Number(new URL(base).port), ['POST /v1/keys HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{"dig'], { waitMs: 3_000 })
    expect(answer).toMatch(/^HTTP\/1\.1 408 /)
    expect(closed).toBe(true)
  })

  it('closes gracefully: a request in flight is answered, not cut off', async () => {
    // An enclave that takes connections and never answers: the request waits out the parent's 300 ms timeout.
    let bytesAtEnclave = 0
    const silentEnclave = createNetServer((socket) => socket.on('data', (chunk) => (bytesAtEnclave += chunk.length)))
    await new Promise<void>((listening) => silentEnclave.listen(0, '127.0.0.1', listening))
    const slowParent = new OriginParent({ enclaves: [{ id: 'silent', address: { host: '127.0.0.1', port: (silentEnclave.address() as AddressInfo).port } }], poolSize: 1, store: {} as BlobStore, requestTimeoutMs: 300, credentials: () => Promise.reject(new Error('not needed here')) })
    const closing = createParentApi({ parent: slowParent, verifier: new RequestVerifier({ secrets: { [hmac.keyId]: hmac.secret }, maxFutureSkewMs: 0 }), log: () => {} })
    await closing.listen({ port: 0, host: '127.0.0.1' })
    try {
      const path = '/v1/keys/k'
      const headers = await signRequest({ ...hmac, method: 'GET', path, body: new Uint8Array() })
      const answer = fetch(`http://127.0.0.1:${(closing.address() as AddressInfo).port}${path}`, { headers })
      // In flight: the parent has sent it on to the enclave.
      await expect.poll(() => bytesAtEnclave, { timeout: 10_000, interval: 5 }).toBeGreaterThan(0)
      const closeStarted = Date.now()
      const closed = closing.close({ drainMs: 3_000 })
      expect((await answer).status).toBe(503)
      await closed
      expect(closing.listening).toBe(false)
      // Closed once the answer was out, not when the drain ran out.
      expect(Date.now() - closeStarted).toBeLessThan(1_500)
    } finally {
      slowParent.close()
      silentEnclave.close()
    }
  })

  it('answers a wrong method 405 with Allow, an unknown one 501 and an unknown path 404, signed or not, keeping the connection', async () => {
    const port = Number(new URL(base).port)
    const cases: Array<[string, string, number, string | null]> = [
      ['GET', '/v1/keys/k1/sign', 405, 'POST'],
      ['DELETE', '/v1/keys/k1', 405, 'GET'],
      ['HEAD', '/v1/attestation', 405, 'GET'],
      ['POST', '/healthz', 405, 'GET, HEAD'],
      ['BREW', '/v1/keys', 501, null],
      ['GET', '/v1/nothing', 404, null],
      ['POST', '/v1/keys/k1/rename', 404, null],
    ]
    for (const [method, path, status, allow] of cases) {
      for (const headers of [{}, await signRequest({ ...hmac, method, path, body: new Uint8Array() })]) {
        const fields = Object.entries(headers).map(([name, value]) => `${name}: ${value}\r\n`).join('')
        const { answer, socket } = await exchange(port, [`${method} ${path} HTTP/1.1\r\nhost: x\r\n${fields}\r\n`], { waitMs: 3_000, answers: 1, headsOnly: method === 'HEAD' })
        socket.destroy()
        expect({ method, path, status: Number(/^HTTP\/1\.1 (\d{3}) /.exec(answer)?.[1]), allow: /\r\nallow: ([^\r]*)\r\n/.exec(answer)?.[1] ?? null, keptAlive: answer.includes('\r\nconnection: keep-alive\r\n') }).toEqual({ method, path, status, allow, keptAlive: true })
        if (method !== 'HEAD') expect(JSON.parse(answer.slice(answer.indexOf('\r\n\r\n') + 4)).error).toMatch(status === 501 ? /the method BREW is not implemented/ : status === 405 ? new RegExp(`^${path} takes`) : /no such route/)
      }
    }
  })

  it('answers 400 for a key id longer than the enclave protocol carries, not an outage', async () => {
    const response = await signed('GET', `/v1/keys/${'k'.repeat(129)}`)
    expect(response.status).toBe(400)
    expect(await response.json()).toEqual({ error: 'the key id is longer than 128 bytes' })
  })

  it('refuses a query string on a signed route 400 before authentication (the signature covers the path alone); /healthz takes one', async () => {
    // Signed over the path without its query, as the signature would still verify.
    const headers = await signRequest({ ...hmac, method: 'GET', path: '/v1/keys/k1', body: new Uint8Array() })
    const response = await fetch(`${base}/v1/keys/k1?state=active`, { headers })
    expect({ status: response.status, body: await response.json() }).toEqual({ status: 400, body: { error: '/v1/keys/k1 takes no query string' } })
    // The nonce was not spent: the request without the query is still the signer's to send.
    expect((await fetch(`${base}/v1/keys/k1`, { headers })).status).toBe(503)
    expect((await fetch(`${base}/healthz?verbose=1`)).status).toBe(503)
  })

  it('refuses a signed request sent again, through the server as a client would replay it', async () => {
    const headers = await signRequest({ ...hmac, method: 'GET', path: '/v1/keys/k1', body: new Uint8Array() })
    // The first is authenticated (the parent, with no enclave, cannot answer it); the same bytes again are not.
    expect((await fetch(`${base}/v1/keys/k1`, { headers })).status).toBe(503)
    const replayed = await fetch(`${base}/v1/keys/k1`, { headers })
    expect({ status: replayed.status, body: await replayed.json() }).toEqual({ status: 401, body: { error: 'request authentication failed' } })
    expect(await (await fetch(`${base}/metrics`)).text()).toContain('origin_request_auth_failures_total{reason="replayed"} 1')
  })

  it('tells a refused caller only that authentication failed; the reason goes to the metric and the log', async () => {
    const payload = new TextEncoder().encode('')
    const forged = await signRequest({ keyId: hmac.keyId, secret: 'not-the-worker-secret', method: 'GET', path: '/v1/keys/k1', body: payload })
    const stale = await signRequest({ ...hmac, method: 'GET', path: '/v1/keys/k1', body: payload, now: Date.now() - 10 * 60_000 })
    for (const headers of [forged, stale]) {
      const response = await fetch(`${base}/v1/keys/k1`, { headers })
      expect(response.status).toBe(401)
      expect(await response.json()).toEqual({ error: 'request authentication failed' })
    }
    const metrics = await (await fetch(`${base}/metrics`)).text()
    expect(metrics).toContain('origin_request_auth_failures_total{reason="bad-signature"} 1')
    expect(metrics).toContain('origin_request_auth_failures_total{reason="stale"} 1')
    expect(logged).toContainEqual({ level: 'warn', event: 'request_refused', reason: 'bad-signature', hmacKeyId: hmac.keyId, count: 1 })
    expect(logged).toContainEqual({ level: 'warn', event: 'request_refused', reason: 'stale', hmacKeyId: hmac.keyId, count: 1 })
  })

  it('logs an error of its listening socket (a failed accept), naming the listener, and serves on', async () => {
    const ownLog: Array<Record<string, unknown>> = []
    const api = createParentApi({ parent, verifier: new RequestVerifier({ secrets: {} }), log: (fields) => ownLog.push(fields) })
    await api.listen({ port: 0, host: '127.0.0.1' })
    try {
      ;(api as unknown as { server: { emit(event: string, error: Error): void } }).server.emit('error', new Error('accept failed: ENOMEM'))
      expect(ownLog).toContainEqual({ level: 'error', event: 'listener_error', listener: 'clients', error: 'accept failed: ENOMEM', count: 1 })
      expect((await fetch(`http://127.0.0.1:${(api.address() as AddressInfo).port}/healthz`)).status).toBeGreaterThan(0)
    } finally {
      await api.close({ drainMs: 100 })
    }
  })

  it('logs a presented key id only as visible ASCII: header bytes 0x80–0xff would reach the log as C1 controls', async () => {
    // An API of its own: its log has seen no refusal yet (each kind is logged at most once every 10 s).
    const ownLog: Array<Record<string, unknown>> = []
    const api = createParentApi({ parent, verifier: new RequestVerifier({ secrets: {} }), log: (fields) => ownLog.push(fields) })
    await api.listen({ port: 0, host: '127.0.0.1' })
    try {
      const headers = await signRequest({ keyId: 'caf\u00e9\u009b31m', secret: 'any', method: 'GET', path: '/v1/keys/k1', body: new Uint8Array() })
      expect((await fetch(`http://127.0.0.1:${(api.address() as AddressInfo).port}/v1/keys/k1`, { headers })).status).toBe(401)
      expect(ownLog).toContainEqual({ level: 'warn', event: 'request_refused', reason: 'unknown-key', hmacKeyId: 'caf??31m', count: 1 })
    } finally {
      await api.close({ drainMs: 100 })
    }
  })
})

it('logs the failures of a flood of signs its enclave cannot take once, not once each', async () => {
  const before = logged.length
  const body = JSON.stringify({ digest: `0x${'11'.repeat(32)}` })
  for (let i = 0; i < 5; i++) {
    const response = await signed('POST', '/v1/keys/k1/sign', body)
    expect({ status: response.status, body: await response.json() }).toEqual({ status: 503, body: { error: 'origin unavailable' } })
  }
  const failures = logged.slice(before).filter((line) => line.event === 'origin_request_failed')
  expect(failures).toEqual([{ level: 'error', event: 'origin_request_failed', route: 'sign', error: expect.stringContaining('cannot connect to the enclave'), count: 1 }])
  // Their time counts in the total (its percentiles would look best while the origin fails), not in the phases of a signature.
  const metrics = await (await fetch(`${base}/metrics`)).text()
  expect(Number(/^origin_sign_latency_seconds_count\{phase="total"\} (\d+)$/m.exec(metrics)?.[1])).toBeGreaterThanOrEqual(5)
  expect(metrics).toMatch(/^origin_sign_latency_seconds_count\{phase="rpc"\} 0$/m)
})

it('tells an operator why a command failed; a sign or a read is told only that the origin failed', async () => {
  parent.unlock = () => Promise.reject(new Error('KMS Decrypt: AccessDeniedException'))
  parent.getKey = () => Promise.reject(new Error('the enclave broke'))
  try {
    const unlock = await signed('POST', '/v1/unlock')
    expect({ status: unlock.status, body: await unlock.json() }).toEqual({ status: 503, body: { error: 'origin unavailable: KMS Decrypt: AccessDeniedException' } })
    const get = await signed('GET', '/v1/keys/k1')
    expect({ status: get.status, body: await get.json() }).toEqual({ status: 503, body: { error: 'origin unavailable' } })
  } finally {
    parent.unlock = OriginParent.prototype.unlock
    parent.getKey = OriginParent.prototype.getKey
  }
})

it('answers HEAD on /healthz and /metrics as GET, head alone, and has every auth-failure reason and shed route at 0 from the start', async () => {
  const api = createParentApi({ parent, verifier: new RequestVerifier({ secrets: {} }), log: () => {} })
  await api.listen({ port: 0, host: '127.0.0.1' })
  const at = `http://127.0.0.1:${(api.address() as AddressInfo).port}`
  try {
    for (const path of ['/healthz', '/metrics']) {
      const [head, get] = [await fetch(`${at}${path}`, { method: 'HEAD' }), await fetch(`${at}${path}`)]
      expect({ status: head.status, type: head.headers.get('content-type'), body: await head.text() }).toEqual({ status: get.status, type: get.headers.get('content-type'), body: '' })
      await get.text()
    }
    const metrics = await (await fetch(`${at}/metrics`)).text()
    for (const reason of ['missing', 'unknown-key', 'stale', 'before-start', 'replayed', 'bad-signature', 'not-permitted']) {
      expect(metrics).toContain(`origin_request_auth_failures_total{reason="${reason}"} 0`)
    }
    for (const route of ['sign', 'get', 'create']) expect(metrics).toContain(`origin_requests_shed_total{route="${route}"} 0`)
  } finally {
    await api.close({ drainMs: 100 })
  }
})

describe('the parent API under load', () => {
  /** An API of its own, on its own port, over a parent whose enclave is full: its signs, gets and creates are refused. */
  async function apiOnFullParent(options: { maxConnections?: number } = {}) {
    const full = new OriginParent({ enclaves: [{ id: 'full', address: { host: '127.0.0.1', port: 1 } }], poolSize: 1, store: {} as BlobStore, requestTimeoutMs: 200, credentials: () => Promise.reject(new Error('not needed here')) })
    full.sign = () => Promise.reject(new OverloadedError('full'))
    full.getKey = () => Promise.reject(new OverloadedError('full'))
    full.createKey = () => Promise.reject(new OverloadedError('full'))
    const api = createParentApi({ parent: full, verifier: new RequestVerifier({ secrets: { [hmac.keyId]: hmac.secret }, maxFutureSkewMs: 0 }), log: () => {}, ...options })
    await api.listen({ port: 0, host: '127.0.0.1' })
    const port = (api.address() as AddressInfo).port
    const request = async (method: 'GET' | 'POST', path: string, body = '') => {
      const payload = new TextEncoder().encode(body)
      const headers = await signRequest({ ...hmac, method, path, body: payload })
      const response = await fetch(`http://127.0.0.1:${port}${path}`, { method, headers, body: method === 'POST' ? payload : undefined })
      return { status: response.status, headers: response.headers, body: (await response.json()) as Record<string, unknown> }
    }
    const close = async () => {
      await api.close({ drainMs: 0 })
      full.close()
    }
    return { port, request, close, metrics: async () => (await fetch(`http://127.0.0.1:${port}/metrics`)).text() }
  }

  it('answers a sign, get or create its enclave has no place for 503 overloaded, with a jittered Retry-After-Ms, counted per route', async () => {
    const api = await apiOnFullParent()
    try {
      const digest = JSON.stringify({ digest: `0x${'11'.repeat(32)}` })
      for (const [method, path] of [['POST', '/v1/keys/k1/sign'], ['GET', '/v1/keys/k1'], ['POST', '/v1/keys'], ['POST', '/v1/keys/k2/sign']] as const) {
        const refused = await api.request(method, path, path.endsWith('/sign') ? digest : '')
        expect(refused.status).toBe(503)
        expect(refused.body).toEqual({ error: 'overloaded', retryAfterMs: expect.any(Number) })
        const retryAfterMs = Number(refused.headers.get('retry-after-ms'))
        expect(retryAfterMs).toBe(refused.body.retryAfterMs)
        expect(retryAfterMs).toBeGreaterThanOrEqual(100)
        expect(retryAfterMs).toBeLessThan(300)
        expect(refused.headers.get('retry-after')).toBe('1')
      }
      const metrics = await api.metrics()
      expect(metrics).toMatch(/^origin_requests_shed_total\{route="sign"\} 2$/m)
      expect(metrics).toMatch(/^origin_requests_shed_total\{route="get"\} 1$/m)
      expect(metrics).toMatch(/^origin_requests_shed_total\{route="create"\} 1$/m)
      expect(metrics).toMatch(/^origin_requests_total\{route="sign",status="503"\} 2$/m)
    } finally {
      await api.close()
    }
  })

  it('answers a sign that gave up waiting for its key\u2019s turn 503 with why, as the parent\u2019s own refusal rather than a failure to log', async () => {
    const sign = parent.sign
    const why = "waiting for key k1's turn (a change of its state is still under way) took longer than 200 ms"
    parent.sign = () => Promise.reject(new KeyTurnTimeoutError(why))
    const loggedBefore = logged.length
    try {
      const response = await signed('POST', '/v1/keys/k1/sign', JSON.stringify({ digest: `0x${'12'.repeat(32)}` }))
      expect(response.status).toBe(503)
      expect(await response.json()).toEqual({ error: why })
      expect(logged.slice(loggedBefore).filter((line) => line.event === 'origin_request_failed')).toEqual([])
    } finally {
      parent.sign = sign
    }
  })

  it('lets a sign-only HMAC key sign and read keys and nothing else (403, counted and logged, the parent not asked); an operator key does the rest, with no body or `{}`', async () => {
    const operator = { keyId: 'operator', secret: 'an-operator-secret-of-enough-bytes' }
    const asked: string[] = []
    const scripted = new OriginParent({ enclaves: [{ id: 'none', address: { host: '127.0.0.1', port: 1 } }], poolSize: 1, store: {} as BlobStore, requestTimeoutMs: 200, credentials: () => Promise.reject(new Error('not needed here')) })
    const key = { keyId: 'k1', publicKey: '0x04' as const, address: '0x0000000000000000000000000000000000000001' as const, state: 'active' as const }
    scripted.sign = async () => (asked.push('sign'), { signature: `0x${'ab'.repeat(64)}`, recoveryId: 0, rpcMs: 0, enclaveMs: 0 })
    scripted.getKey = async () => (asked.push('get'), key)
    scripted.createKey = async () => (asked.push('create'), key)
    scripted.setState = async (_keyId, state) => void asked.push(state)
    scripted.unlock = async () => void asked.push('unlock')
    scripted.rotateDataKey = async () => (asked.push('rotate'), { resealed: 0 })
    scripted.attestations = async () => (asked.push('attestation'), [])
    const apiLogged: Array<Record<string, unknown>> = []
    const api = createParentApi({ parent: scripted, verifier: new RequestVerifier({ secrets: { [hmac.keyId]: hmac.secret, [operator.keyId]: operator.secret }, maxFutureSkewMs: 0 }), log: (fields) => apiLogged.push(fields), signOnlyKeyIds: new Set([hmac.keyId]) })
    await api.listen({ port: 0, host: '127.0.0.1' })
    const port = (api.address() as AddressInfo).port
    const as = async (who: { keyId: string; secret: string }, method: 'GET' | 'POST', path: string, body = '') => {
      const payload = new TextEncoder().encode(body)
      const response = await fetch(`http://127.0.0.1:${port}${path}`, { method, headers: await signRequest({ ...who, method, path, body: payload }), body: method === 'POST' ? payload : undefined })
      return { status: response.status, statusText: response.statusText, body: (await response.json()) as Record<string, unknown> }
    }
    try {
      const digest = JSON.stringify({ digest: `0x${'13'.repeat(32)}` })
      expect((await as(hmac, 'POST', '/v1/keys/k1/sign', digest)).status).toBe(200)
      expect((await as(hmac, 'GET', '/v1/keys/k1')).status).toBe(200)
      const operatorsOnly = [['POST', '/v1/keys/k1/freeze'], ['POST', '/v1/keys/k1/unfreeze'], ['POST', '/v1/keys/k1/archive'], ['POST', '/v1/keys'], ['POST', '/v1/unlock'], ['POST', '/v1/data-key/rotate'], ['GET', '/v1/attestation']] as const
      for (const [method, path] of operatorsOnly) expect(await as(hmac, method, path)).toEqual({ status: 403, statusText: 'Forbidden', body: { error: 'this HMAC key may only sign and read keys' } })
      expect(asked).toEqual(['sign', 'get'])
      for (const [method, path] of operatorsOnly) expect((await as(operator, method, path)).status).toBeLessThan(300)
      expect(asked).toEqual(['sign', 'get', 'frozen', 'active', 'archived', 'create', 'unlock', 'rotate', 'attestation'])
      // An empty JSON object, as many HTTP clients send for a POST without data, is no body; anything in it is refused.
      asked.length = 0
      for (const [method, path] of operatorsOnly.filter(([method]) => method === 'POST')) expect((await as(operator, method, path, ' {\r\n} ')).status).toBeLessThan(300)
      expect(asked).toEqual(['frozen', 'active', 'archived', 'create', 'unlock', 'rotate'])
      expect(await as(operator, 'POST', '/v1/keys', '{"count": 2}')).toMatchObject({ status: 400, body: { error: 'POST /v1/keys takes no body' } })
      expect(await as(operator, 'POST', '/v1/keys/k1/freeze', '{}{}')).toMatchObject({ status: 400 })
      expect(asked).toHaveLength(6)
      expect((await (await fetch(`http://127.0.0.1:${port}/metrics`)).text())).toContain('origin_request_auth_failures_total{reason="not-permitted"} 7')
      expect(apiLogged).toContainEqual(expect.objectContaining({ event: 'request_refused', reason: 'not-permitted', hmacKeyId: hmac.keyId }))
    } finally {
      await api.close({ drainMs: 0 })
      scripted.close()
    }
  })

  it('closes connections over MAX_CONNECTIONS as they arrive, and serves the ones it holds', async () => {
    const api = await apiOnFullParent({ maxConnections: 2 })
    const sockets: Socket[] = []
    try {
      const open = () =>
        new Promise<Socket>((resolve, reject) => {
          const socket = connect(api.port, '127.0.0.1', () => resolve(socket))
          socket.on('error', reject)
          sockets.push(socket)
        })
      const [held] = [await open(), await open()]
      const third = await open()
      // Closed by the server without a word (the test times out if it is not).
      await new Promise((resolve) => third.on('close', resolve))
      // The connections it holds are served: one asks for the count.
      const { answer } = await new Promise<{ answer: string }>((resolve) => {
        let answer = ''
        held!.on('data', (chunk) => {
          answer += chunk.toString('latin1')
          if (/^origin_connections_dropped_total\{listener="clients"\} \d+$/m.test(answer)) resolve({ answer })
        })
        held!.write('GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n')
      })
      expect(answer).toMatch(/^HTTP\/1\.1 200 /)
      expect(answer).toMatch(/^origin_connections_dropped_total\{listener="clients"\} 1$/m)
      // The other listener's series is there from the start.
      expect(answer).toMatch(/^origin_connections_dropped_total\{listener="operators"\} 0$/m)
    } finally {
      for (const socket of sockets) socket.destroy()
      await api.close()
    }
  })
})

it('serves operators on a listener of their own while client connections fill MAX_CONNECTIONS', async () => {
  const scripted = new OriginParent({ enclaves: [{ id: 'none', address: { host: '127.0.0.1', port: 1 } }], poolSize: 1, store: {} as BlobStore, requestTimeoutMs: 200, credentials: () => Promise.reject(new Error('not needed here')) })
  const frozen: string[] = []
  scripted.setState = async (keyId, state) => void frozen.push(`${keyId} ${state}`)
  const { clients, operators } = createParentServers({ parent: scripted, verifier: new RequestVerifier({ secrets: { [hmac.keyId]: hmac.secret }, maxFutureSkewMs: 0 }), log: () => {}, maxConnections: 2, operatorMaxConnections: 4 })
  await clients.listen({ port: 0, host: '127.0.0.1' })
  await operators.listen({ port: 0, host: '127.0.0.1' })
  const portOf = (server: HttpServer) => (server.address() as AddressInfo).port
  const sockets: Socket[] = []
  const open = (port: number) =>
    new Promise<Socket>((resolve, reject) => {
      const socket = connect(port, '127.0.0.1', () => resolve(socket))
      socket.on('error', reject)
      sockets.push(socket)
    })
  const closedByServer = (socket: Socket) => new Promise((resolve) => socket.on('close', resolve))
  try {
    // A flood takes every client connection: the next is closed as it arrives.
    await open(portOf(clients))
    await open(portOf(clients))
    await closedByServer(await open(portOf(clients)))
    // The operators' listener still takes a freeze.
    const path = '/v1/keys/k1/freeze'
    const response = await fetch(`http://127.0.0.1:${portOf(operators)}${path}`, { method: 'POST', headers: await signRequest({ ...hmac, method: 'POST', path, body: new Uint8Array() }) })
    expect({ status: response.status, body: await response.json() }).toEqual({ status: 200, body: { keyId: 'k1', state: 'frozen' } })
    expect(frozen).toEqual(['k1 frozen'])
    // The operators' listener has a limit of its own (4, the freeze's connection perhaps among them): the next one past it is dropped.
    for (let opened = 0; ; opened++) {
      expect(opened).toBeLessThan(5)
      const socket = await open(portOf(operators))
      if (await Promise.race([closedByServer(socket).then(() => true), new Promise((resolve) => setTimeout(resolve, 200, false))])) break
    }
    const metrics = await new Promise<string>((resolve) => {
      let answer = ''
      const held = sockets[0]!
      held.on('data', (chunk) => {
        answer += chunk.toString('latin1')
        if (/^origin_connections_dropped_total\{listener="operators"\} \d+$/m.test(answer)) resolve(answer)
      })
      held.write('GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n')
    })
    // Each listener's drops on their own.
    expect(metrics).toMatch(/^origin_connections_dropped_total\{listener="clients"\} 1$/m)
    expect(metrics).toMatch(/^origin_connections_dropped_total\{listener="operators"\} 1$/m)
  } finally {
    for (const socket of sockets) socket.destroy()
    await Promise.all([clients.close({ drainMs: 0 }), operators.close({ drainMs: 0 })])
    scripted.close()
  }
})

describe('healthStatus', () => {
  const enclave = (state: 'ok' | 'held' | 'down') => ({ id: state, answered: state !== 'down', ok: state === 'ok', held: state === 'held', inflight: 0, admitted: 0 })
  it('is down only when no enclave answers in service, or the store takes no writes; held back is degraded', () => {
    expect(healthStatus({ enclaves: [enclave('ok'), enclave('ok')], storeOk: true })).toBe('ok')
    expect(healthStatus({ enclaves: [enclave('ok'), enclave('down')], storeOk: true })).toBe('degraded')
    expect(healthStatus({ enclaves: [enclave('held')], storeOk: true })).toBe('degraded')
    expect(healthStatus({ enclaves: [enclave('held'), enclave('down')], storeOk: true })).toBe('degraded')
    expect(healthStatus({ enclaves: [enclave('down'), enclave('down')], storeOk: true })).toBe('down')
    expect(healthStatus({ enclaves: [enclave('ok')], storeOk: false })).toBe('down')
  })
})

describe('ThrottledLog', () => {
  it('writes a kind at most once an interval, counting the occurrences it did not write', () => {
    const lines: Array<Record<string, unknown>> = []
    let now = 0
    const log = new ThrottledLog({ log: (fields) => lines.push(fields), intervalMs: 10_000, now: () => now })
    log.write('stale', { reason: 'stale' })
    now = 4_000
    log.write('stale', { reason: 'stale' })
    log.write('replayed', { reason: 'replayed' })
    now = 9_999
    log.write('stale', { reason: 'stale' })
    expect(lines).toEqual([
      { reason: 'stale', count: 1 },
      { reason: 'replayed', count: 1 },
    ])
    now = 10_000
    log.write('stale', { reason: 'stale', hmacKeyId: 'x' })
    expect(lines.at(-1)).toEqual({ reason: 'stale', hmacKeyId: 'x', count: 3 })
  })
})

it.each([
  { setting: 'PARENT_LISTEN', value: 'vsock:3:8443', refusal: 'PARENT_LISTEN must be host:port or a Unix socket path' },
  { setting: 'OPERATOR_LISTEN', value: 'vsock:3:8443', refusal: 'OPERATOR_LISTEN must be host:port or a Unix socket path' },
  // Empty, as from an image's `ENV OPERATOR_LISTEN=$ARG` with no build argument: not quietly no operators' listener.
  { setting: 'OPERATOR_LISTEN', value: '', refusal: 'OPERATOR_LISTEN is set but empty' },
  { setting: 'TLS_CERT_FILE', value: '', refusal: 'TLS_CERT_FILE is set but empty' },
  { setting: 'POOL_SIZE', value: '0', refusal: 'POOL_SIZE must be a whole number from 1 to 256, got 0' },
  { setting: 'STORE_TIMEOUT_MS', value: 'soon', refusal: 'STORE_TIMEOUT_MS must be a whole number' },
])('refuses $setting=$value before it opens its store', async ({ setting, value, refusal }) => {
  const storeDir = mkdtempSync(path.join(tmpdir(), 'parent-settings-'))
  try {
    const env: Record<string, string | undefined> = { ...process.env, PARENT_LISTEN: '127.0.0.1:8443', [setting]: value, STORE_DIR: storeDir, ORIGIN_HMAC_KEYS: `${hmac.keyId}:${hmac.secret}` }
    const run = promisify(execFile)(process.execPath, [builtCli, 'parent'], { env, timeout: 30_000 })
    await expect(run).rejects.toMatchObject({ code: 1, stderr: expect.stringContaining(refusal) })
    // Not even its lock: a wrong setting stops the process before it touches the store.
    expect(readdirSync(storeDir)).toEqual([])
  } finally {
    rmSync(storeDir, { recursive: true, force: true })
  }
}, 40_000)
