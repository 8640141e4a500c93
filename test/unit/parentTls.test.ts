import { execFileSync } from 'node:child_process'
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { request, type RequestOptions } from 'node:https'
import type { Server } from 'node:http'
import { tmpdir } from 'node:os'
import path from 'node:path'
import { afterAll, beforeAll, expect, it } from 'vitest'
import type { BlobStore } from '../../enclave-origin/parent/blobStore.js'
import { createParentApi } from '../../enclave-origin/parent/httpApi.js'
import { OriginParent } from '../../enclave-origin/parent/origin.js'
import { RequestVerifier } from '../../enclave-origin/protocol/requestSigning.js'

/** The parent's API over TLS with client certificates required: a CA, server and client certificate made with openssl at test time. */

let dir: string
let server: Server
const port = 18676
const file = (name: string) => readFileSync(path.join(dir, name), 'utf8')

function openssl(args: string[]) {
  execFileSync('openssl', args, { cwd: dir, stdio: 'ignore' })
}

beforeAll(async () => {
  dir = mkdtempSync(path.join(tmpdir(), 'parent-tls-'))
  writeFileSync(path.join(dir, 'server.ext'), 'subjectAltName=IP:127.0.0.1\n')
  openssl(['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', 'ca.key', '-out', 'ca.crt', '-days', '1', '-subj', '/CN=test CA'])
  for (const name of ['server', 'client']) {
    openssl(['req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', `${name}.key`, '-out', `${name}.csr`, '-subj', `/CN=${name}`])
    openssl(['x509', '-req', '-in', `${name}.csr`, '-CA', 'ca.crt', '-CAkey', 'ca.key', '-CAcreateserial', '-out', `${name}.crt`, '-days', '1', ...(name === 'server' ? ['-extfile', 'server.ext'] : [])])
  }
  // No enclave listens on port 1: /healthz answers 503, which is all this test needs to reach over TLS.
  const parent = new OriginParent({ enclaves: [{ id: 'none', address: { host: '127.0.0.1', port: 1 } }], poolSize: 1, store: {} as BlobStore, requestTimeoutMs: 200 })
  server = createParentApi({
    parent,
    verifier: new RequestVerifier({ secrets: {} }),
    log: () => {},
    tls: { cert: file('server.crt'), key: file('server.key'), ca: file('ca.crt'), requireClientCertificate: true },
  })
  await new Promise<void>((resolve) => server.listen(port, '127.0.0.1', resolve))
})

afterAll(async () => {
  server.closeAllConnections()
  await new Promise((resolve) => server.close(resolve))
  rmSync(dir, { recursive: true, force: true })
})

function get(options: RequestOptions): Promise<number> {
  return new Promise((resolve, reject) => {
    const req = request({ host: '127.0.0.1', port, path: '/healthz', ca: file('ca.crt'), ...options }, (response) => {
      response.resume()
      resolve(response.statusCode!)
    })
    req.on('error', reject)
    req.end()
  })
}

it('serves a client that presents a certificate from the trusted CA', async () => {
  expect(await get({ cert: file('client.crt'), key: file('client.key') })).toBe(503)
})

it('refuses a client without a certificate at the TLS handshake', async () => {
  await expect(get({})).rejects.toThrow()
})
