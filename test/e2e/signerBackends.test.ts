import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { getAddress } from 'viem'
import { generatePrivateKey, privateKeyToAddress } from 'viem/accounts'
import { anvilWellKnownKeys } from '../support/anvilKeys.js'
import type { Anvil } from '../support/anvil.js'
import { backendConfig } from '../support/backendConfig.js'
import { devnetChainConfig, startDevnet, type Devnet } from '../support/devnet.js'
import { prepareSponsored, signAndSubmit } from '../support/e2eFlow.js'
import { startHttpSignerServer } from '../support/httpSignerServer.js'
import { startKeyServers, type KeyServers } from '../support/keyServers.js'
import { startWorker } from '../support/wranglerDev.js'
import { healthReport } from '../../worker/health.js'

/**
 * Signatures from the KMS, Vault and HTTP backends, made by the Worker under
 * wrangler dev against the local key servers, accepted on chain by the
 * Pimlico SingletonPaymaster. Every server holds anvil's well-known key #1,
 * which the devnet authorises ("imported key material" for KMS).
 */

let anvil: Anvil
let devnet: Devnet
let stopDevnet: () => Promise<void>
let keyServers: KeyServers
let backends: Record<string, Record<string, unknown>>
let secrets: Record<string, string>

beforeAll(async () => {
  ;({ anvil, devnet, stop: stopDevnet } = await startDevnet({ port: 18548 }))
  keyServers = await startKeyServers({ privateKey: anvilWellKnownKeys.paymasterSigner, ports: { kms: 18641, vault: 18642, http: 18643 } })
  ;({ backends, secrets } = backendConfig(keyServers.servers))
})

afterAll(async () => {
  await keyServers?.stop()
  await stopDevnet?.()
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
    keyServers.kms.setFault('internal-error')
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
      keyServers.kms.setFault('none')
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

it('/health compares each paymaster\u2019s on-chain getHash with the hash it signs, and is degraded when they differ', async () => {
  type Health = { status: string; chains: Array<{ paymasterHashes: unknown[] }> }
  const paymasters = [...devnetChainConfig(devnet, 'pimlico-singleton').paymasters, ...devnetChainConfig(devnet, 'eth-infinitism-verifying').paymasters].filter(
    (p) => p.contract === 'eth-infinitism-verifying' || p.entryPointVersion !== '0.7',
  )
  const agreeing = paymasters.map(({ entryPointVersion, contract, address }) => ({ paymaster: address, entryPointVersion, contract, agrees: true }))
  // The chain's own id, then another: the id is in every hash, so each deployed getHash now differs from ours.
  const chains = [devnet.chainId, 1].map((chainId) => ({ chainId, name: 'anvil', paymasters, rpcUrl: anvil.rpcUrl, signer: 'primary' }))
  // And paymasters that are not there: an address with no code, and a contract without getHash (the EntryPoint).
  const nowhere = '0x000000000000000000000000000000000000dEaD'
  const entryPoint = '0x0000000071727De22E5E9d8BAf0edAc6f37da032'
  const missing = {
    chainId: 5,
    name: 'anvil',
    paymasters: [
      { entryPointVersion: '0.7', contract: 'pimlico-singleton', address: nowhere },
      { entryPointVersion: '0.8', contract: 'pimlico-singleton', address: entryPoint },
    ],
    rpcUrl: anvil.rpcUrl,
    signer: 'primary',
  }
  await withWorker(18861, { chains: [...chains, missing], signers: { primary: backends.kms } }, async (workerUrl) => {
    const health = (await (await fetch(`${workerUrl}/health`)).json()) as Health
    expect(health.chains[0]!.paymasterHashes).toEqual(agreeing)
    expect(health.chains[1]!.paymasterHashes).toEqual(
      agreeing.map(({ contract, ...rest }) => ({ ...rest, contract, agrees: false, error: `its getHash is not the hash signed for ${contract} on chain 1: signatures would fail (AA34)` })),
    )
    expect(health.chains[2]!.paymasterHashes).toEqual([
      {
        paymaster: nowhere,
        entryPointVersion: '0.7',
        contract: 'pimlico-singleton',
        agrees: null,
        error: "getHash returned nothing (no code there, or a contract without it): no pimlico-singleton paymaster for v0.7 at this address on the RPC's chain",
      },
      { paymaster: entryPoint, entryPointVersion: '0.8', contract: 'pimlico-singleton', agrees: null, error: "getHash reverted: no pimlico-singleton paymaster for v0.8 at this address on the RPC's chain" },
    ])
    expect(health.status).toBe('degraded')
  })
  await withWorker(18862, { chains: chains.slice(0, 1), signers: { primary: backends.kms } }, async (workerUrl) => {
    expect(((await (await fetch(`${workerUrl}/health`)).json()) as Health).status).toBe('ok')
  })
})

it('/health names the paymaster family whose hash a deployed getHash matches, when it is not the configured one', async () => {
  // The devnet's V8 is the one @pimlico/mock-paymaster ships (pimlico-singleton), configured here as the other build.
  const paymaster = devnet.singletonPaymasters['0.8']
  const chain = { chainId: devnet.chainId, rpcUrl: anvil.rpcUrl, paymasters: [{ entryPointVersion: '0.8', contract: 'pimlico-singleton-7702', address: paymaster }] }
  const report = await healthReport({ PROFILE: 'development', PAYMASTER_CONFIG: { chains: [chain], signers: { primary: backends.kms } }, ...secrets })
  expect(report.chains![0]!.paymasterHashes).toEqual([
    {
      paymaster,
      entryPointVersion: '0.8',
      contract: 'pimlico-singleton-7702',
      agrees: false,
      error: `its getHash is not the hash signed for pimlico-singleton-7702 on chain ${devnet.chainId}: signatures would fail (AA34); it hashes as pimlico-singleton does at v0.8: if that is the contract there, configure it so`,
    },
  ])
  // It keeps a set of signers, as every Pimlico build does: the signer's place in it is checked too.
  expect(report.chains![0]!.signerAuthorisation).toEqual([{ paymaster, backend: 'primary', address: devnet.paymasterSigner, authorised: true }])
})
