import { encodeFunctionData, type Address, type Hex, type LocalAccount, type PublicClient } from 'viem'
import { getUserOperationHash, toSmartAccount, type UserOperation } from 'viem/account-abstraction'
import type { EntryPointVersion } from '../../config/schema.js'
import { canonicalEntryPoints } from '../../worker/sponsor/entryPoints.js'
import { artifact, entryPointAbis } from './artifacts.js'

/**
 * eth-infinitism's SimpleAccount as a viem smart account (viem ships no
 * SimpleAccount of its own): deployed by SimpleAccountFactory.createAccount,
 * executing single calls, signing the userOpHash with EIP-191 on v0.6/v0.7
 * and the raw EIP-712 hash on v0.8, as the contracts verify.
 */

/** 65 bytes that the account's ECDSA.recover parses without reverting, for gas estimation. */
const stubSignature: Hex =
  '0xfffffffffffffffffffffffffffffff0000000000000000000000000000000007aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa1c'

export async function toSimpleAccount(options: {
  client: PublicClient
  version: EntryPointVersion
  owner: LocalAccount
  factory: Address
}) {
  const { client, version, owner, factory } = options
  const factoryAbi = artifact(version, 'SimpleAccountFactory').abi
  const accountAbi = artifact(version, 'SimpleAccount').abi
  const entryPointAddress = canonicalEntryPoints[version]
  const address = (await client.readContract({
    address: factory,
    abi: factoryAbi,
    functionName: 'getAddress',
    args: [owner.address, 0n],
  })) as Address
  const hashOf = (userOperation: UserOperation, chainId: number) =>
    getUserOperationHash({ userOperation, chainId, entryPointAddress, entryPointVersion: version })

  return toSmartAccount({
    client,
    entryPoint: { abi: entryPointAbis[version], address: entryPointAddress, version } as never,
    getAddress: async () => address,
    getFactoryArgs: async () => ({
      factory,
      factoryData: encodeFunctionData({ abi: factoryAbi, functionName: 'createAccount', args: [owner.address, 0n] }),
    }),
    getNonce: async () =>
      client.readContract({ address: entryPointAddress, abi: entryPointAbis['0.7'], functionName: 'getNonce', args: [address, 0n] }),
    encodeCalls: async (calls) => {
      if (calls.length !== 1) throw new Error('this test account executes one call at a time')
      const [call] = calls
      return encodeFunctionData({ abi: accountAbi, functionName: 'execute', args: [call!.to, call!.value ?? 0n, call!.data ?? '0x'] })
    },
    getStubSignature: async () => stubSignature,
    signMessage: async ({ message }) => owner.signMessage({ message }),
    signTypedData: async (typedData) => owner.signTypedData(typedData as never),
    signUserOperation: async ({ chainId, ...userOperation }) => {
      const hash = hashOf({ ...userOperation, sender: address } as UserOperation, chainId ?? client.chain!.id)
      return version === '0.8' ? owner.sign!({ hash }) : owner.signMessage({ message: { raw: hash } })
    },
  })
}
