import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { concat, encodeFunctionData, getAddress, hashMessage, recoverAddress, toHex, type Address, type Hex } from 'viem'
import { getUserOperationHash, toPackedUserOperation, type UserOperation } from 'viem/account-abstraction'
import type { EntryPointVersion } from '../../config/schema.js'
import { pimlicoSingletonV6, pimlicoSingletonV7, pimlicoSingletonV8 } from '../../worker/sponsor/adapters/pimlicoSingleton.js'
import { canonicalEntryPoints } from '../../worker/sponsor/entryPoints.js'
import { anvilWellKnownKeys } from '../support/anvilKeys.js'
import { clientsFor, devnetChainConfig, entryPointVersions, type Devnet } from '../support/devnet.js'
import { artifact, entryPointAbis, singletonGetHashAbi } from '../support/artifacts.js'
import { gasForTests, incrementNonceCall, observedNonce, prepareSponsored, rejectionOf, signAndSubmit, startDevnetAndWorker, submit, toRpcUserOperation } from '../support/e2eFlow.js'
import { loadConfig } from '../../config/load.js'
import { LocalSigner } from '../../backends/local.js'
import { sponsor, type SponsorDeps } from '../../worker/sponsor/sponsor.js'
import { generatePrivateKey, privateKeyToAccount } from 'viem/accounts'
import type { RunningWorker } from '../support/wranglerDev.js'

/**
 * Pimlico SingletonPaymaster V6/V7/V8 on a real anvil chain, sponsored through
 * the Worker running under wrangler dev with the well-known anvil key #1 as
 * its local signer (authorised on the paymasters by the devnet deploy).
 */

let devnet: Devnet
let worker: RunningWorker
let stop: () => Promise<void>

beforeAll(async () => {
  ;({ devnet, worker, stop } = await startDevnetAndWorker({ anvilPort: 18545, workerPort: 18787, family: 'pimlico-singleton' }))
})

afterAll(async () => {
  await stop?.()
})

const adapters = { '0.6': pimlicoSingletonV6, '0.7': pimlicoSingletonV7, '0.8': pimlicoSingletonV8 }

describe.each(entryPointVersions)('Pimlico SingletonPaymaster on EntryPoint v%s', (version: EntryPointVersion) => {
  it('sponsors a 0-ETH SimpleAccount that is created and executes a call, driven by viem clients', async () => {
    const { publicClient } = clientsFor(devnet.rpcUrl)
    const paymaster = devnet.singletonPaymasters[version]
    const depositBefore = await publicClient.getBalance({ address: canonicalEntryPoints[version] })
    const { account, prepared } = await prepareSponsored({ devnet, workerUrl: worker.url, version })
    expect(await publicClient.getBalance({ address: account.address })).toBe(0n)
    expect(await publicClient.getCode({ address: account.address })).toBeUndefined()

    // Our off-chain hash is the contract's getHash, and the userOpHash is the EntryPoint's.
    const packed = version === '0.6' ? prepared : toPackedUserOperation(prepared)
    const onChainUserOpHash = await publicClient.readContract({
      address: canonicalEntryPoints[version],
      abi: entryPointAbis[version] as typeof entryPointAbis['0.7'],
      functionName: 'getUserOpHash',
      args: [packed as never],
    })
    expect(getUserOperationHash({ userOperation: prepared, chainId: devnet.chainId, entryPointAddress: canonicalEntryPoints[version], entryPointVersion: version })).toBe(onChainUserOpHash)

    const { event, receipt } = await signAndSubmit({ devnet, version, account, userOperation: prepared })
    expect(receipt.status).toBe('success')
    expect(event.args).toMatchObject({ sender: account.address, paymaster: getAddress(paymaster), success: true, userOpHash: onChainUserOpHash })
    expect(await observedNonce(publicClient, version, account.address)).toBe(1n)
    expect(await publicClient.getBalance({ address: account.address })).toBe(0n)
    // The paymaster's EntryPoint deposit paid for it.
    expect(await publicClient.getBalance({ address: canonicalEntryPoints[version] })).toBeLessThan(depositBefore)
  })

  it('computes off-chain exactly the hash the deployed contract computes, and the Worker signs it', async () => {
    const { publicClient } = clientsFor(devnet.rpcUrl)
    const { prepared } = await prepareSponsored({ devnet, workerUrl: worker.url, version })
    const isV6 = version === '0.6'
    const unsigned = isV6
      ? { ...prepared, paymasterAndData: prepared.paymasterAndData!.slice(0, 2 + 2 * 33) }
      : { ...prepared, paymasterData: prepared.paymasterData!.slice(0, 2 + 2 * 13) }
    const onChain = (await publicClient.readContract({
      address: devnet.singletonPaymasters[version],
      abi: singletonGetHashAbi(version),
      functionName: 'getHash',
      args: [0, (isV6 ? unsigned : toPackedUserOperation(unsigned as UserOperation)) as never],
    } as never)) as `0x${string}`
    const data = isV6 ? prepared.paymasterAndData! : prepared.paymasterData!
    const configStart = isV6 ? 20 : 0
    const window = {
      validUntil: Number(BigInt(`0x${data.slice(2 + 2 * (configStart + 1), 2 + 2 * (configStart + 7))}`)),
      validAfter: Number(BigInt(`0x${data.slice(2 + 2 * (configStart + 7), 2 + 2 * (configStart + 13))}`)),
    }
    const offChain = adapters[version].hash({ op: unsigned as never, chainId: devnet.chainId, paymaster: devnet.singletonPaymasters[version], window })
    expect(offChain).toBe(onChain)
    const signature = `0x${data.slice(2 + 2 * (configStart + 13))}` as const
    expect(await recoverAddress({ hash: hashMessage({ raw: onChain }), signature })).toBe(devnet.paymasterSigner)
  })

  /** The Worker's sponsor flow, run here with a signer and clock of the test's choosing. */
  async function sponsorWith(options: { privateKey: `0x${string}`; now: number }) {
    const config = loadConfig({ PROFILE: 'development', PAYMASTER_CONFIG: { chains: [devnetChainConfig(devnet, 'pimlico-singleton')] } })
    const signer = new LocalSigner({ name: 'test', privateKey: options.privateKey, secretName: 'TEST', allowEphemeral: false })
    const deps: SponsorDeps = { config, signerFor: () => signer, now: () => options.now, log: () => {} }
    const { account, prepared } = await prepareSponsored({ devnet, workerUrl: worker.url, version })
    const { paymasterAndData, paymaster, paymasterData, ...unsponsored } = prepared
    const sponsorship = await sponsor(deps, {
      chainId: devnet.chainId,
      entryPoint: canonicalEntryPoints[version],
      userOperation: toRpcUserOperation(unsponsored as UserOperation),
    })
    return { account, userOperation: sponsorship.userOperation as UserOperation }
  }

  it('a signature from a key the paymaster does not authorise is rejected by the contract (AA34)', async () => {
    const { account, userOperation } = await sponsorWith({ privateKey: generatePrivateKey(), now: Math.floor(Date.now() / 1000) })
    expect(await rejectionOf(signAndSubmit({ devnet, version, account, userOperation }))).toContain('AA34')
  })

  it('a sponsorship whose validity window has passed is rejected by the contract (AA32)', async () => {
    const twoHoursAgo = Math.floor(Date.now() / 1000) - 7_200
    const { account, userOperation } = await sponsorWith({ privateKey: anvilWellKnownKeys.paymasterSigner, now: twoHoursAgo })
    expect(await rejectionOf(signAndSubmit({ devnet, version, account, userOperation }))).toContain('AA32')
  })

  it('a tampered gas field after sponsorship is rejected by the contract (AA34)', async () => {
    const { account, prepared } = await prepareSponsored({ devnet, workerUrl: worker.url, version })
    const tampered = { ...prepared, callGasLimit: prepared.callGasLimit + 1n }
    expect(await rejectionOf(signAndSubmit({ devnet, version, account, userOperation: tampered }))).toContain('AA34')
  })
})

describe('EIP-7702 on EntryPoint v0.8', () => {
  it('sponsors an EOA with 0 ETH that delegates to Simple7702Account, its authorization applied in the handleOps transaction', async () => {
    const { publicClient, deployer } = clientsFor(devnet.rpcUrl)
    const simple7702 = artifact('0.8', 'Simple7702Account')
    const deployed = await publicClient.waitForTransactionReceipt({ hash: await deployer.deployContract({ abi: simple7702.abi, bytecode: simple7702.bytecode }) })
    const delegate = deployed.contractAddress!
    // A fresh EOA: it has sent no transaction, so its authorization takes nonce 0; the bundler's transaction carries it.
    const eoa = privateKeyToAccount(generatePrivateKey())
    const authorization = await eoa.signAuthorization({ contractAddress: delegate, chainId: devnet.chainId, nonce: 0 })
    const unsponsored = {
      sender: eoa.address,
      nonce: 0n,
      factory: '0x7702',
      factoryData: '0x',
      callData: encodeFunctionData({ abi: simple7702.abi, functionName: 'execute', args: [canonicalEntryPoints['0.8'], 0n, incrementNonceCall('0.8').data] }),
      ...gasForTests,
      signature: '0x',
      authorization,
    } as unknown as UserOperation<'0.8'>
    const response = await fetch(`${worker.url}/rpc`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ jsonrpc: '2.0', id: 1, method: 'pm_getPaymasterData', params: [toRpcUserOperation(unsponsored as UserOperation), canonicalEntryPoints['0.8'], toHex(devnet.chainId), {}] }),
    })
    const { result } = (await response.json()) as { result: { paymaster: Address; paymasterData: Hex; paymasterVerificationGasLimit: Hex; paymasterPostOpGasLimit: Hex; userOpHash: Hex } }
    const sponsored = {
      ...unsponsored,
      paymaster: result.paymaster,
      paymasterData: result.paymasterData,
      paymasterVerificationGasLimit: BigInt(result.paymasterVerificationGasLimit),
      paymasterPostOpGasLimit: BigInt(result.paymasterPostOpGasLimit),
    }
    // Simple7702Account takes a plain ECDSA signature of the userOpHash by the EOA itself.
    const userOperation = { ...sponsored, signature: await eoa.sign({ hash: result.userOpHash }) } as UserOperation
    const { receipt, event } = await submit({ devnet, version: '0.8', userOperation, authorizationList: [authorization] })
    expect(receipt.status).toBe('success')
    expect(event.args).toMatchObject({ sender: eoa.address, paymaster: getAddress(devnet.singletonPaymasters['0.8']), success: true, userOpHash: result.userOpHash })
    expect(await publicClient.getCode({ address: eoa.address })).toBe(concat(['0xef0100', delegate.toLowerCase() as Hex]))
    expect(await observedNonce(publicClient, '0.8', eoa.address)).toBe(1n)
    expect(await publicClient.getBalance({ address: eoa.address })).toBe(0n)
  })
})
