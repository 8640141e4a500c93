import type { Hex } from 'viem'
import { privateKeyToAddress } from 'viem/accounts'
import type { KeyServerInfo } from './backendConfig.js'
import { startHttpSignerServer, type HttpSignerServer } from './httpSignerServer.js'
import { startLocalKms, type LocalKms } from './kmsServer.js'
import { startLocalVault } from './vaultServer.js'

export type KeyServers = {
  servers: KeyServerInfo
  /** For injecting faults. */
  kms: LocalKms
  http: HttpSignerServer
  stop(): Promise<void>
}

/** The local KMS, Vault and HTTP key servers on 127.0.0.1, all holding `privateKey` ("imported key material" for KMS). */
export async function startKeyServers(options: { privateKey: Hex; ports: { kms: number; vault: number; http: number } }): Promise<KeyServers> {
  const started: Array<{ stop(): Promise<void> }> = []
  const track = <T extends { stop(): Promise<void> }>(server: T) => (started.push(server), server)
  const stop = async () => void (await Promise.all(started.map((server) => server.stop())))
  try {
    const kms = track(await startLocalKms({ port: options.ports.kms }))
    const vault = track(await startLocalVault({ port: options.ports.vault }))
    const http = track(await startHttpSignerServer({ port: options.ports.http, privateKey: options.privateKey }))
    const kmsKeyId = kms.createKey({ privateKey: options.privateKey })
    vault.putSecret('secret/paymaster/signer', { private_key: options.privateKey })
    return {
      servers: {
        address: privateKeyToAddress(options.privateKey),
        kms: { url: kms.url, keyId: kmsKeyId, ...kms.credentials },
        vault: { url: vault.url, token: vault.rootToken },
        http: { url: http.url, token: http.token, keyId: http.keyId },
      },
      kms,
      http,
      stop,
    }
  } catch (error) {
    // A server that did start would otherwise hold its port for the rest of the run.
    await stop()
    throw error
  }
}
