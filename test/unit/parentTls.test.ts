import { execFile } from 'node:child_process'
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { request, type RequestOptions } from 'node:https'
import { connect, type AddressInfo } from 'node:net'
import { tmpdir } from 'node:os'
import path from 'node:path'
import { promisify } from 'node:util'
import type { HttpServer } from '../../enclave-origin/parent/httpServer.js'
import { afterAll, beforeAll, expect, it } from 'vitest'
import type { BlobStore } from '../../enclave-origin/parent/blobStore.js'
import { createParentApi } from '../../enclave-origin/parent/httpApi.js'
import { OriginParent } from '../../enclave-origin/parent/origin.js'
import { RequestVerifier } from '../../enclave-origin/protocol/requestSigning.js'
import { buildOrigin } from '../support/origin.js'
import { startTestCa, type TestCa } from '../support/testCertificates.js'

/** The parent's API over TLS with client certificates required: a CA, server and client certificate made with openssl at test time. */

let ca: TestCa
let server: HttpServer
let client: { cert: string; key: string }
const port = 18676
/** The operators' CLI, as production runs it. */
let builtCli: string

beforeAll(async () => {
  builtCli = buildOrigin('parentTls')
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

it('the operators\u2019 CLI presents the client certificate of ORIGIN_TLS_CERT_FILE and ORIGIN_TLS_KEY_FILE, trusting ORIGIN_TLS_CA_FILE', { timeout: 30_000 }, async () => {
  const directory = mkdtempSync(path.join(tmpdir(), 'cli-tls-'))
  try {
    const files = { ca: path.join(directory, 'ca.pem'), cert: path.join(directory, 'client.pem'), key: path.join(directory, 'client.key') }
    writeFileSync(files.ca, ca.caPem)
    writeFileSync(files.cert, client.cert)
    writeFileSync(files.key, client.key, { mode: 0o600 })
    const status = (env: Record<string, string>) =>
      promisify(execFile)(process.execPath, [builtCli, 'status'], { env: { PATH: process.env.PATH, ORIGIN_URL: `https://127.0.0.1:${port}`, ...env }, timeout: 20_000 }).catch(
        (error: { code: number; stdout: string; stderr: string }) => error,
      )
    // Through TLS to /healthz, which answers down (no enclave here): printed, and exit 1.
    const reached = await status({ ORIGIN_TLS_CA_FILE: files.ca, ORIGIN_TLS_CERT_FILE: files.cert, ORIGIN_TLS_KEY_FILE: files.key })
    expect(reached).toMatchObject({ code: 1 })
    expect(JSON.parse((reached as { stdout: string }).stdout)).toMatchObject({ ok: false, status: 'down' })
    // Without the certificate it is cut at the handshake, and says where it could not get.
    expect(await status({ ORIGIN_TLS_CA_FILE: files.ca })).toMatchObject({ code: 1, stderr: expect.stringMatching(new RegExp(`^cannot reach the parent at https://127\\.0\\.0\\.1:${port}: `)) })
    expect(await status({ ORIGIN_TLS_CA_FILE: files.ca, ORIGIN_TLS_CERT_FILE: files.cert })).toMatchObject({ code: 1, stderr: 'ORIGIN_TLS_CERT_FILE and ORIGIN_TLS_KEY_FILE go together: a client certificate and its key\n' })
    // A relative one is read from the working directory, and one that cannot be read is named, its path in full.
    expect(await status({ ORIGIN_TLS_CA_FILE: 'no-such-ca.pem' })).toMatchObject({ code: 1, stderr: `ORIGIN_TLS_CA_FILE: cannot read ${path.resolve('no-such-ca.pem')}: ENOENT\n` })
  } finally {
    rmSync(directory, { recursive: true, force: true })
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
