import { createServer } from 'node:http'
import { generatePrivateKey } from 'viem/accounts'
import type { TestProject } from 'vitest/node'
import type { KeyServerInfo } from './backendConfig.js'
import { startKeyServers } from './keyServers.js'
import type { KmsFault } from './kmsServer.js'
import { listenLocal, readBody } from './localHttp.js'

/**
 * For the workerd tests: the local KMS, Vault and HTTP key servers (real
 * cryptography, on 127.0.0.1), all holding one key made for this run, plus a
 * small control endpoint through which tests inside workerd inject faults,
 * since they cannot reach these Node objects directly.
 */

export type BackendServers = KeyServerInfo & { controlUrl: string }

declare module 'vitest' {
  export interface ProvidedContext {
    backendServers: BackendServers
  }
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
  const stopControl = await listenLocal(control, 18614)

  project.provide('backendServers', { ...keyServers.servers, controlUrl: 'http://127.0.0.1:18614' })

  return async () => {
    await stopControl()
    await keyServers.stop()
  }
}
