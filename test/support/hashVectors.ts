import { concat, encodePacked, encodeAbiParameters, type Address, type Hex } from 'viem'
import { toPackedUserOperation, type UserOperation } from 'viem/account-abstraction'
import type { EntryPointVersion, PaymasterContract } from '../../config/schema.js'
import { canonicalEntryPoints } from '../../worker/sponsor/entryPoints.js'
import { artifact, entryPointAbis, singletonGetHashAbi } from './artifacts.js'
import { clientsFor, type Devnet } from './devnet.js'

/**
 * Hash vectors read from the deployed contracts: for varied UserOperations,
 * the paymaster's own getHash and the EntryPoint's getUserOpHash. They are
 * committed (test/vectors/paymasterHashes.json) for the unit tests, and an
 * end-to-end test recomputes them on anvil so they stay true.
 */

export type HashVector = {
  name: string
  contract: PaymasterContract
  entryPointVersion: EntryPointVersion
  chainId: number
  paymaster: Address
  window: { validUntil: number; validAfter: number }
  /** Domain form, quantities as decimal strings; paymaster fields without the signature. */
  userOperation: Record<string, string>
  paymasterHash: Hex
  userOpHash: Hex
}

const sender: Address = '0x8ba1f109551bD432803012645Ac136ddd64DBA72'
const variants = [
  { name: 'plain', nonce: 0n, initCode: false, callData: '0xb61d27f6' as Hex, gas: [21_000n, 100_000n, 50_000n, 1n, 1n] },
  { name: 'with factory', nonce: 7n, initCode: true, callData: `0x${'ab'.repeat(133)}` as Hex, gas: [250_000n, 1_000_000n, 90_000n, 30_000_000_000n, 2_000_000_000n] },
  { name: 'large values', nonce: (123n << 64n) | 9n, initCode: false, callData: '0x' as Hex, gas: [(1n << 120n) - 1n, (1n << 100n) + 3n, (1n << 200n) + 1n, (1n << 127n) + 5n, (1n << 64n) + 1n] },
]

const targets: Array<{ contract: PaymasterContract; version: EntryPointVersion }> = [
  { contract: 'pimlico-singleton', version: '0.6' },
  { contract: 'pimlico-singleton', version: '0.7' },
  { contract: 'pimlico-singleton', version: '0.8' },
  { contract: 'eth-infinitism-verifying', version: '0.7' },
]

function paymasterDataOf(contract: PaymasterContract, window: HashVector['window']): Hex {
  return contract === 'pimlico-singleton'
    ? encodePacked(['uint8', 'uint48', 'uint48'], [1, window.validUntil, window.validAfter])
    : encodeAbiParameters([{ type: 'uint48' }, { type: 'uint48' }], [window.validUntil, window.validAfter])
}

function operationFor(version: EntryPointVersion, variant: (typeof variants)[number], devnet: Devnet, paymaster: Address, data: Hex) {
  const [callGasLimit, verificationGasLimit, preVerificationGas, maxFeePerGas, maxPriorityFeePerGas] = variant.gas as [bigint, bigint, bigint, bigint, bigint]
  const factory = devnet.simpleAccountFactories[version]
  const factoryData: Hex = `0x5fbfb9cf${'11'.repeat(64)}`
  const base = { sender, nonce: variant.nonce, callData: variant.callData, callGasLimit, verificationGasLimit, preVerificationGas, maxFeePerGas, maxPriorityFeePerGas, signature: '0x' as Hex }
  if (version === '0.6') {
    return { ...base, initCode: variant.initCode ? concat([factory, factoryData]) : ('0x' as Hex), paymasterAndData: concat([paymaster, data]) }
  }
  return {
    ...base,
    ...(variant.initCode ? { factory, factoryData } : {}),
    paymaster,
    paymasterVerificationGasLimit: variant.name === 'large values' ? (1n << 127n) + 11n : 60_000n,
    paymasterPostOpGasLimit: variant.name === 'plain' ? 0n : 1n,
    paymasterData: data,
  }
}

export async function readHashVectors(devnet: Devnet): Promise<HashVector[]> {
  const { publicClient } = clientsFor(devnet.rpcUrl)
  const window = { validUntil: 1_900_000_000, validAfter: 1_700_000_000 }
  const vectors: HashVector[] = []
  for (const { contract, version } of targets) {
    const paymaster = contract === 'pimlico-singleton' ? devnet.singletonPaymasters[version] : devnet.verifyingPaymasterV07
    for (const variant of variants) {
      const op = operationFor(version, variant, devnet, paymaster, paymasterDataOf(contract, window))
      const onChainOp = version === '0.6' ? op : toPackedUserOperation(op as UserOperation)
      const paymasterHash = (await publicClient.readContract(
        (contract === 'pimlico-singleton'
          ? { address: paymaster, abi: singletonGetHashAbi(version), functionName: 'getHash', args: [0, onChainOp] }
          : { address: paymaster, abi: artifact('0.7', 'VerifyingPaymaster').abi, functionName: 'getHash', args: [onChainOp, window.validUntil, window.validAfter] }) as never,
      )) as Hex
      const userOpHash = (await publicClient.readContract({
        address: canonicalEntryPoints[version],
        abi: entryPointAbis[version] as (typeof entryPointAbis)['0.7'],
        functionName: 'getUserOpHash',
        args: [onChainOp as never],
      })) as Hex
      vectors.push({
        name: `${contract} v${version} ${variant.name}`,
        contract,
        entryPointVersion: version,
        chainId: devnet.chainId,
        paymaster,
        window,
        userOperation: Object.fromEntries(Object.entries(op).map(([key, value]) => [key, typeof value === 'bigint' ? value.toString() : value])),
        paymasterHash,
        userOpHash,
      })
    }
  }
  return vectors
}
