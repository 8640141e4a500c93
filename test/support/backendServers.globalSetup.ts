import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { createServer } from 'node:http'
import { tmpdir } from 'node:os'
import path from 'node:path'
import { Request } from 'miniflare'
import { generatePrivateKey } from 'viem/accounts'
import type { TestProject } from 'vitest/node'
import { signRequest } from '../../enclave-origin/protocol/requestSigning.js'
import type { KeyServerInfo } from './backendConfig.js'
import { certificateFetcher } from './certificateFetcher.js'
import { startKeyServers } from './keyServers.js'
import type { KmsFault } from './kmsServer.js'
import { listenLocal, readBody } from './localHttp.js'
import { buildOrigin, originHmac, startOrigin, symmetricKmsKey, workerHmac } from './origin.js'
import { startTestCa } from './testCertificates.js'

/**
 * For the workerd tests: the local KMS, Vault and HTTP key servers (real
 * cryptography, on 127.0.0.1), all holding one key made for this run, plus a
 * small control endpoint through which tests inside workerd inject faults,
 * since they cannot reach these Node objects directly. Also an enclave
 * origin (enclave and parent processes) whose parent takes only TLS
 * connections presenting a client certificate from a CA made for this run,
 * with one key made in it; vitest.config.ts binds that certificate for the
 * Worker.
 */

export type BackendServers = KeyServerInfo & { controlUrl: string }

/** The origin's parent (https, client certificates required), its key, and the TLS material the Worker's binding uses. */
export type TlsOrigin = { url: string; keyId: string; address: `0x${string}`; hmacKeyId: string; hmacSecret: string; ca: string; clientCert: string; clientKey: string }

declare module 'vitest' {
  export interface ProvidedContext {
    backendServers: BackendServers
    tlsOrigin: TlsOrigin
  }
}

/** POST /v1/keys on the parent over TLS, as an operator with a client certificate. */
async function createKey(url: string, tls: { ca: string; cert: string; key: string }): Promise<{ keyId: string; address: `0x${string}` }> {
  const body = new Uint8Array()
  const headers = await signRequest({ ...originHmac, method: 'POST', path: '/v1/keys', body })
  const response = await certificateFetcher(tls)(new Request(`${url}/v1/keys`, { method: 'POST', headers, body, signal: AbortSignal.timeout(30_000) }))
  const text = await response.text()
  if (response.status !== 201) throw new Error(`creating the test key: ${response.status} ${text}`)
  return JSON.parse(text) as { keyId: string; address: `0x${string}` }
}

export default async function setup(project: TestProject) {
  const keyServers = await startKeyServers({ privateKey: generatePrivateKey(), ports: { kms: 18611, vault: 18612, http: 18613 } })
  const { kms, http } = keyServers

  const control = createServer(async (request, response) => {
    const body = JSON.parse((await readBody(request)).toString('utf8') || '{}') as Record<string, string>
    let answer: unknown = { ok: true }
    switch (request.url) {
      case '/kms/fault':
        kms.setFault(body.fault as KmsFault)
        break
      case '/kms/keys':
        answer = { keyId: kms.createKey({ keySpec: body.keySpec as 'ECC_SECG_P256K1' | 'ECC_NIST_P256' }) }
        break
      case '/http/fault':
        http.fault = body.fault as typeof http.fault
        break
      case '/http/format':
        http.format = body.format as typeof http.format
        break
      case '/reset':
        kms.setFault('none')
        http.fault = 'none'
        http.format = 'hex65'
        break
      default:
        response.writeHead(404).end()
        return
    }
    response.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(answer))
  })

  /** What setup started, stopped newest first, each whatever became of the others. */
  const started: Array<() => unknown> = [() => keyServers.stop()]
  const stopAll = async () => {
    let failure: unknown
    for (const stop of started.reverse()) await Promise.resolve().then(stop).catch((error: unknown) => (failure ??= error))
    if (failure) throw failure
  }
  try {
    const stopControl = await listenLocal(control, 18614)
    started.push(stopControl)
    project.provide('backendServers', { ...keyServers.servers, controlUrl: 'http://127.0.0.1:18614' })
    const ca = startTestCa('worker tests CA')
    started.push(() => ca.close())
    const tlsDir = mkdtempSync(path.join(tmpdir(), 'worker-tests-origin-'))
    started.push(() => rmSync(tlsDir, { recursive: true, force: true }))
    const server = ca.issue('parent', 'DNS:localhost')
    const client = { ca: ca.caPem, ...ca.issue('worker') }
    const file = (name: string, text: string) => {
      writeFileSync(path.join(tlsDir, name), text)
      return path.join(tlsDir, name)
    }
    const origin = await startOrigin({
      kms,
      kmsKeyId: await symmetricKmsKey(kms),
      enclavePort: 18615,
      parentPort: 18616,
      storeDir: path.join(tlsDir, 'store'),
      builtCli: buildOrigin('workerTests'),
      extraEnv: { TLS_CERT_FILE: file('parent.crt', server.cert), TLS_KEY_FILE: file('parent.key', server.key), TLS_CA_FILE: file('ca.crt', ca.caPem), TLS_REQUIRE_CLIENT_CERT: '1' },
    })
    started.push(() => origin.stop())
    const url = 'https://localhost:18616'
    const key = await createKey(url, client)
    project.provide('tlsOrigin', { url, ...key, hmacKeyId: workerHmac.keyId, hmacSecret: workerHmac.secret, ca: ca.caPem, clientCert: client.cert, clientKey: client.key })
  } catch (error) {
    await stopAll()
    throw error
  }
  return stopAll
}
