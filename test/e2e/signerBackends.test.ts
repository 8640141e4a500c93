import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { getAddress } from 'viem'
import { generatePrivateKey, privateKeyToAddress } from 'viem/accounts'
import { anvilWellKnownKeys } from '../support/anvilKeys.js'
import { startAnvil, type Anvil } from '../support/anvil.js'
import { deployDevnet, devnetChainConfig, type Devnet } from '../support/devnet.js'
import { prepareSponsored, signAndSubmit } from '../support/e2eFlow.js'
import { startHttpSignerServer, type HttpSignerServer } from '../support/httpSignerServer.js'
import { startLocalKms, type LocalKms } from '../support/kmsServer.js'
import { startLocalVault, type LocalVault } from '../support/vaultServer.js'
import { startWorker } from '../support/wranglerDev.js'

/**
 * Signatures from the KMS, Vault and HTTP backends, made by the Worker under
 * wrangler dev against the local key servers, accepted on chain by the
 * Pimlico SingletonPaymaster. Every server holds anvil's well-known key #1,
 * which the devnet authorises ("imported key material" for KMS).
 */

let anvil: Anvil
let devnet: Devnet
let kms: LocalKms
let vault: LocalVault
let http: HttpSignerServer
let backends: Record<string, Record<string, unknown>>
let secrets: Record<string, string>

beforeAll(async () => {
  anvil = await startAnvil({ port: 18548 })
  devnet = await deployDevnet({ rpcUrl: anvil.rpcUrl, paymasterSigner: privateKeyToAddress(anvilWellKnownKeys.paymasterSigner) })
  kms = await startLocalKms({ port: 18641 })
  vault = await startLocalVault({ port: 18642 })
  vault.putSecret('secret/paymaster/signer', { private_key: anvilWellKnownKeys.paymasterSigner })
  http = await startHttpSignerServer({ port: 18643, privateKey: anvilWellKnownKeys.paymasterSigner })
  backends = {
    kms: { kind: 'aws-kms', keyId: kms.createKey({ privateKey: anvilWellKnownKeys.paymasterSigner }), region: kms.credentials.region, endpoint: kms.url },
    vault: { kind: 'vault', url: vault.url, path: 'paymaster/signer' },
    http: { kind: 'http', url: http.url, keyId: http.keyId, address: privateKeyToAddress(anvilWellKnownKeys.paymasterSigner) },
  }
  secrets = {
    AWS_ACCESS_KEY_ID: kms.credentials.accessKeyId,
    AWS_SECRET_ACCESS_KEY: kms.credentials.secretAccessKey,
    VAULT_TOKEN: vault.rootToken,
    SIGNER_TOKEN: http.token,
  }
})

afterAll(async () => {
  await Promise.all([kms?.stop(), vault?.stop(), http?.stop()])
  await anvil?.stop()
})

async function withWorker<T>(port: number, config: Record<string, unknown>, use: (url: string) => Promise<T>): Promise<T> {
  const worker = await startWorker({ port, vars: { ...secrets, PAYMASTER_CONFIG: JSON.stringify(config) } })
  try {
    return await use(worker.url)
  } finally {
    await worker.stop()
  }
}

describe('sponsorships signed by each backend are accepted by handleOps', () => {
  it.each([
    ['kms', 18811],
    ['vault', 18821],
    ['http', 18831],
  ])('%s', async (name, port) => {
    const config = { chains: [devnetChainConfig(devnet, 'pimlico-singleton')], signers: { primary: backends[name] } }
    await withWorker(port, config, async (workerUrl) => {
      const { account, prepared } = await prepareSponsored({ devnet, workerUrl, version: '0.7' })
      const { event } = await signAndSubmit({ devnet, version: '0.7', account, userOperation: prepared })
      expect(event.args).toMatchObject({ success: true, paymaster: getAddress(devnet.singletonPaymasters['0.7']) })
    })
  })

  it('a dead KMS primary: the Vault backup signs and the chain accepts it', async () => {
    kms.setFault('internal-error')
    try {
      const config = {
        chains: [devnetChainConfig(devnet, 'eth-infinitism-verifying')],
        signers: { primary: { kind: 'fallback', members: ['kms', 'vault'] }, kms: { ...backends.kms, maxAttempts: 1 }, vault: backends.vault },
      }
      await withWorker(18841, config, async (workerUrl) => {
        const { account, prepared } = await prepareSponsored({ devnet, workerUrl, version: '0.7' })
        const { event } = await signAndSubmit({ devnet, version: '0.7', account, userOperation: prepared })
        expect(event.args).toMatchObject({ success: true, paymaster: getAddress(devnet.verifyingPaymasterV07) })
      })
    } finally {
      kms.setFault('none')
    }
  })
})

it('/health reads each backend address from the Singleton paymaster signers() over the chain RPC', async () => {
  const rogue = await startHttpSignerServer({ port: 18644, privateKey: generatePrivateKey() })
  try {
    const rogueAddress = privateKeyToAddress(generatePrivateKey())
    const config = {
      chains: [{ ...devnetChainConfig(devnet, 'pimlico-singleton'), rpcUrl: anvil.rpcUrl }],
      signers: {
        primary: { kind: 'fallback', members: ['kms', 'rogue'] },
        kms: backends.kms,
        rogue: { kind: 'http', url: rogue.url, keyId: rogue.keyId, address: rogueAddress, tokenSecret: 'ROGUE_TOKEN' },
      },
    }
    secrets.ROGUE_TOKEN = rogue.token
    await withWorker(18851, config, async (workerUrl) => {
      const health = (await (await fetch(`${workerUrl}/health`)).json()) as { status: string; chains: Array<{ signerAuthorisation: unknown[] }> }
      expect(health.status).toBe('degraded')
      const authorisation = health.chains[0]!.signerAuthorisation
      expect(authorisation).toHaveLength(6)
      expect(authorisation).toContainEqual({ paymaster: devnet.singletonPaymasters['0.7'], backend: 'kms', address: devnet.paymasterSigner, authorised: true })
      expect(authorisation).toContainEqual({ paymaster: devnet.singletonPaymasters['0.8'], backend: 'rogue', address: rogueAddress, authorised: false })
    })
  } finally {
    await rogue.stop()
  }
})
