import {
  BaseError,
  ContractFunctionRevertedError,
  encodeFunctionData,
  http,
  parseEventLogs,
  type Address,
  type Hex,
  type PublicClient,
  type SignedAuthorizationList,
} from 'viem'
import {
  createBundlerClient,
  createPaymasterClient,
  formatUserOperationRequest,
  toPackedUserOperation,
  type UserOperation,
} from 'viem/account-abstraction'
import { generatePrivateKey, privateKeyToAccount } from 'viem/accounts'
import type { EntryPointVersion } from '../../config/schema.js'
import { canonicalEntryPoints } from '../../worker/sponsor/entryPoints.js'
import { anvilWellKnownKeys } from './anvilKeys.js'
import { clientsFor, devnetChainConfig, startDevnet, type Devnet } from './devnet.js'
import { startWorker } from './wranglerDev.js'
import { entryPointAbis } from './artifacts.js'
import { toSimpleAccount } from './simpleAccount.js'

/**
 * A wallet's sponsored flow on the devnet: a fresh SimpleAccount with 0 ETH
 * asks the Worker (through viem's paymaster client) for stub and final
 * paymaster data, signs, and a bundler account submits handleOps.
 */

/** The observable call the account makes: EntryPoint.incrementNonce(key 1), so the effect can be read back. */
export const observedNonceKey = 1n

export const gasForTests = {
  callGasLimit: 150_000n,
  verificationGasLimit: 600_000n,
  preVerificationGas: 60_000n,
  maxFeePerGas: 3_000_000_000n,
  maxPriorityFeePerGas: 1_000_000_000n,
}

export async function newAccount(devnet: Devnet, version: EntryPointVersion) {
  const { publicClient } = clientsFor(devnet.rpcUrl)
  const owner = privateKeyToAccount(generatePrivateKey())
  return toSimpleAccount({ client: publicClient, version, owner, factory: devnet.simpleAccountFactories[version] })
}

export function incrementNonceCall(version: EntryPointVersion) {
  return {
    to: canonicalEntryPoints[version],
    value: 0n,
    data: encodeFunctionData({ abi: entryPointAbis['0.7'], functionName: 'incrementNonce', args: [observedNonceKey] }),
  }
}

/** Prepares a sponsored UserOperation as a wallet would: viem's bundler client with the Worker as its paymaster. */
export async function prepareSponsored(options: { devnet: Devnet; workerUrl: string; version: EntryPointVersion; apiKey?: string }) {
  const { devnet, workerUrl, version } = options
  const { publicClient, chain } = clientsFor(devnet.rpcUrl)
  const account = await newAccount(devnet, version)
  const paymaster = createPaymasterClient({
    transport: http(`${workerUrl}/rpc`, { fetchOptions: { headers: options.apiKey ? { 'x-api-key': options.apiKey } : {} } }),
  })
  // The bundler transport is never called: every gas field is given, so viem skips estimation.
  const bundlerClient = createBundlerClient({ client: publicClient, chain, transport: http(devnet.rpcUrl), paymaster })
  const prepared = await bundlerClient.prepareUserOperation({ account, calls: [incrementNonceCall(version)], ...gasForTests } as never)
  return { account, prepared: prepared as unknown as UserOperation }
}

export async function signAndSubmit(options: {
  devnet: Devnet
  version: EntryPointVersion
  account: Awaited<ReturnType<typeof newAccount>>
  userOperation: UserOperation
}) {
  const { devnet, version, account } = options
  const userOperation = { ...options.userOperation, signature: await account.signUserOperation(options.userOperation as never) }
  return submit({ devnet, version, userOperation })
}

/** handleOps from the bundler account; with `authorizationList` (EIP-7702), in a transaction that applies it first. */
export async function submit(options: { devnet: Devnet; version: EntryPointVersion; userOperation: UserOperation; authorizationList?: SignedAuthorizationList }) {
  const { devnet, version, userOperation, authorizationList } = options
  const { publicClient, bundler } = clientsFor(devnet.rpcUrl)
  const packed = version === '0.6' ? userOperation : toPackedUserOperation(userOperation)
  const { request } = await publicClient.simulateContract({
    account: bundler.account,
    address: canonicalEntryPoints[version],
    abi: entryPointAbis[version] as typeof entryPointAbis['0.7'],
    functionName: 'handleOps',
    args: [[packed as never], bundler.account.address],
    gas: 5_000_000n,
    ...(authorizationList ? { authorizationList } : {}),
  })
  const receipt = await publicClient.waitForTransactionReceipt({ hash: await bundler.writeContract(request) })
  const [event] = parseEventLogs({ abi: entryPointAbis[version], logs: receipt.logs, eventName: 'UserOperationEvent' })
  return { receipt, event: event as unknown as { args: { userOpHash: Hex; sender: Address; paymaster: Address; success: boolean } } }
}

/** The EntryPoint's revert reason (e.g. "AA34 signature error") when handleOps rejects. */
export async function rejectionOf(promise: Promise<unknown>): Promise<string> {
  try {
    await promise
  } catch (error) {
    if (error instanceof BaseError) {
      const revert = error.walk((e) => e instanceof ContractFunctionRevertedError) as ContractFunctionRevertedError | null
      const args = revert?.data?.args as unknown[] | undefined
      return String(args?.[1] ?? error.shortMessage)
    }
    throw error
  }
  throw new Error('handleOps accepted an operation it should have rejected')
}

/** How many calls the account made through its incrementNonce key (the sequence part of the nonce). */
export async function observedNonce(publicClient: PublicClient, version: EntryPointVersion, sender: Address) {
  const nonce = await publicClient.readContract({
    address: canonicalEntryPoints[version],
    abi: entryPointAbis['0.7'],
    functionName: 'getNonce',
    args: [sender, observedNonceKey],
  })
  return nonce & ((1n << 64n) - 1n)
}

/** A UserOperation in the JSON-RPC form a wallet sends (hex quantities). */
export function toRpcUserOperation(userOperation: UserOperation): Record<string, unknown> {
  return formatUserOperationRequest(userOperation) as Record<string, unknown>
}

/**
 * A fresh anvil devnet and the Worker under wrangler dev, signing with the
 * well-known anvil key #1 that the devnet authorises, for one paymaster family.
 */
export async function startDevnetAndWorker(options: {
  anvilPort: number
  workerPort: number
  family: 'pimlico-singleton' | 'eth-infinitism-verifying'
}) {
  const { devnet, stop: stopDevnet } = await startDevnet({ port: options.anvilPort })
  try {
    const worker = await startWorker({
      port: options.workerPort,
      vars: {
        PAYMASTER_PRIVATE_KEY: anvilWellKnownKeys.paymasterSigner,
        PAYMASTER_CONFIG: JSON.stringify({ chains: [devnetChainConfig(devnet, options.family)] }),
      },
    })
    return {
      devnet,
      worker,
      stop: async () => {
        await worker.stop()
        await stopDevnet()
      },
    }
  } catch (error) {
    await stopDevnet()
    throw error
  }
}
