import { createServer } from 'node:http'
import type { Socket } from 'node:net'
import { generatePrivateKey, privateKeyToAddress } from 'viem/accounts'
import type { TestProject } from 'vitest/node'
import { startHttpSignerServer } from './httpSignerServer.js'
import { startLocalKms, type KmsFault } from './kmsServer.js'
import { startLocalVault } from './vaultServer.js'

/**
 * For the workerd tests: the local KMS, Vault and HTTP key servers (real
 * cryptography, on 127.0.0.1), all holding one key made for this run, plus a
 * small control endpoint through which tests inside workerd inject faults,
 * since they cannot reach these Node objects directly.
 */

export type BackendServers = {
  address: `0x${string}`
  kms: { url: string; keyId: string; accessKeyId: string; secretAccessKey: string; region: string }
  vault: { url: string; token: string }
  http: { url: string; token: string; keyId: string }
  controlUrl: string
}

declare module 'vitest' {
  export interface ProvidedContext {
    backendServers: BackendServers
  }
}

export default async function setup(project: TestProject) {
  const key = generatePrivateKey()
  const kms = await startLocalKms({ port: 18611 })
  const kmsKeyId = kms.createKey({ privateKey: key })
  const vault = await startLocalVault({ port: 18612 })
  vault.putSecret('secret/paymaster/signer', { private_key: key })
  const http = await startHttpSignerServer({ port: 18613, privateKey: key })

  const sockets = new Set<Socket>()
  const control = createServer(async (request, response) => {
    const chunks: Buffer[] = []
    for await (const chunk of request) chunks.push(chunk as Buffer)
    const body = JSON.parse(Buffer.concat(chunks).toString('utf8') || '{}') as Record<string, string>
    let answer: unknown = { ok: true }
    switch (request.url) {
      case '/kms/fault':
        kms.setFault(body.fault as KmsFault, body.keyId)
        break
      case '/kms/keys':
        answer = { keyId: kms.createKey({ keySpec: body.keySpec as 'ECC_SECG_P256K1' | 'ECC_NIST_P256' }) }
        break
      case '/vault/seal':
        vault.seal()
        break
      case '/vault/unseal':
        vault.unseal()
        break
      case '/http/fault':
        http.fault = body.fault as typeof http.fault
        break
      case '/http/format':
        http.format = body.format as typeof http.format
        break
      case '/reset':
        kms.setFault('none')
        vault.unseal()
        http.fault = 'none'
        http.format = 'hex65'
        break
      default:
        response.writeHead(404).end()
        return
    }
    response.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(answer))
  })
  control.on('connection', (socket) => {
    sockets.add(socket)
    socket.on('close', () => sockets.delete(socket))
  })
  await new Promise<void>((resolve) => control.listen(18614, '127.0.0.1', resolve))

  project.provide('backendServers', {
    address: privateKeyToAddress(key),
    kms: { url: kms.url, keyId: kmsKeyId, ...kms.credentials },
    vault: { url: vault.url, token: vault.rootToken },
    http: { url: http.url, token: http.token, keyId: http.keyId },
    controlUrl: 'http://127.0.0.1:18614',
  })

  return async () => {
    for (const socket of sockets) socket.destroy()
    await new Promise((resolve) => control.close(resolve))
    await Promise.all([kms.stop(), vault.stop(), http.stop()])
  }
}
