import { request, type RequestOptions } from 'node:https'
import { connect, type AddressInfo } from 'node:net'
import type { HttpServer } from '../../enclave-origin/parent/httpServer.js'
import { afterAll, beforeAll, expect, it } from 'vitest'
import type { BlobStore } from '../../enclave-origin/parent/blobStore.js'
import { createParentApi } from '../../enclave-origin/parent/httpApi.js'
import { OriginParent } from '../../enclave-origin/parent/origin.js'
import { RequestVerifier } from '../../enclave-origin/protocol/requestSigning.js'
import { startTestCa, type TestCa } from '../support/testCertificates.js'

/** The parent's API over TLS with client certificates required: a CA, server and client certificate made with openssl at test time. */

let ca: TestCa
let server: HttpServer
let client: { cert: string; key: string }
const port = 18676

beforeAll(async () => {
  ca = startTestCa()
  const serverCertificate = ca.issue('server', 'IP:127.0.0.1')
  client = ca.issue('client')
  // No enclave listens on port 1: /healthz answers 503, which is all this test needs to reach over TLS.
  const parent = new OriginParent({ enclaves: [{ id: 'none', address: { host: '127.0.0.1', port: 1 } }], poolSize: 1, store: {} as BlobStore, requestTimeoutMs: 200, credentials: () => Promise.reject(new Error('not needed here')) })
  server = createParentApi({
    parent,
    verifier: new RequestVerifier({ secrets: {} }),
    log: () => {},
    tls: { ...serverCertificate, ca: ca.caPem, requireClientCertificate: true },
  })
  await server.listen({ port, host: '127.0.0.1' })
})

afterAll(async () => {
  await server.close({ drainMs: 0 })
  ca.close()
})

function get(options: RequestOptions): Promise<number> {
  return new Promise((resolve, reject) => {
    const req = request({ host: '127.0.0.1', port, path: '/healthz', ca: ca.caPem, ...options }, (response) => {
      response.resume()
      resolve(response.statusCode!)
    })
    req.on('error', reject)
    req.end()
  })
}

it('serves a client that presents a certificate from the trusted CA', async () => {
  expect(await get(client)).toBe(503)
})

it('refuses a client without a certificate at the TLS handshake', async () => {
  await expect(get({})).rejects.toThrow()
})

it('refuses a client whose certificate another CA issued', async () => {
  const other = startTestCa('another CA')
  try {
    // Cut at the handshake (an alert, or the connection reset), not answered: no HTTP status comes back.
    await expect(get(other.issue('stranger'))).rejects.toMatchObject({ code: expect.stringMatching(/^(ECONNRESET|ERR_SSL_)/) })
  } finally {
    other.close()
  }
})

it('without client certificates required, serves a client that presents none over TLS', async () => {
  const parent = new OriginParent({ enclaves: [{ id: 'none', address: { host: '127.0.0.1', port: 1 } }], poolSize: 1, store: {} as BlobStore, requestTimeoutMs: 200, credentials: () => Promise.reject(new Error('not needed here')) })
  const open = createParentApi({ parent, verifier: new RequestVerifier({ secrets: {} }), log: () => {}, tls: { ...ca.issue('server', 'IP:127.0.0.1'), ca: ca.caPem } })
  await open.listen({ port: 0, host: '127.0.0.1' })
  try {
    expect(await get({ port: (open.address() as AddressInfo).port })).toBe(503)
    // TLS all the same: a plain-HTTP request gets no HTTP answer.
    const plain = await fetch(`http://127.0.0.1:${(open.address() as AddressInfo).port}/healthz`).then((response) => response.status, () => 'refused')
    expect(plain).toBe('refused')
  } finally {
    await open.close({ drainMs: 0 })
    parent.close()
  }
})

it('cuts a TLS handshake that never finishes when it closes', async () => {
  const parent = new OriginParent({ enclaves: [{ id: 'none', address: { host: '127.0.0.1', port: 1 } }], poolSize: 1, store: {} as BlobStore, requestTimeoutMs: 200, credentials: () => Promise.reject(new Error('not needed here')) })
  const closing = createParentApi({ parent, verifier: new RequestVerifier({ secrets: {} }), log: () => {}, tls: { ...ca.issue('server', 'IP:127.0.0.1'), ca: ca.caPem } })
  await closing.listen({ port: 0, host: '127.0.0.1' })
  // A TCP connection that sends no ClientHello: the server waits for it up to its handshake timeout (10 s).
  const silent = connect((closing.address() as AddressInfo).port, '127.0.0.1')
  silent.on('error', () => undefined)
  const cut = new Promise((resolve) => silent.once('close', resolve))
  // Held by the server, not just queued in the kernel, before it closes.
  await expect.poll(() => (closing as unknown as { sockets: Set<unknown> }).sockets.size).toBe(1)
  const started = Date.now()
  await closing.close({ drainMs: 200 })
  await cut
  expect(Date.now() - started).toBeLessThan(2_000)
  parent.close()
})
