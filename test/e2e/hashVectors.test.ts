import { afterAll, beforeAll, expect, it } from 'vitest'
import { concat, encodeAbiParameters, keccak256, toHex, type Hex } from 'viem'
import { toPackedUserOperation, type UserOperation } from 'viem/account-abstraction'
import { canonicalEntryPoints } from '../../worker/sponsor/entryPoints.js'
import { eip7702InitCodeHashOverride } from '../../worker/sponsor/adapters/pimlicoSingleton.js'
import { operationModels } from '../../worker/sponsor/operationModels.js'
import type { UserOperationV07 } from '../../worker/sponsor/userOperation.js'
import { entryPointAbis } from '../support/artifacts.js'
import { rpcUserOperationV07 } from '../support/userOperations.js'
import committed from '../vectors/paymasterHashes.json' with { type: 'json' }
import { clientsFor, startDevnet, type Devnet } from '../support/devnet.js'
import { readHashVectors } from '../support/hashVectors.js'

let devnet: Devnet
let stopDevnet: () => Promise<void>

beforeAll(async () => {
  ;({ devnet, stop: stopDevnet } = await startDevnet({ port: 18547 }))
})

afterAll(async () => {
  await stopDevnet?.()
})

it('the committed hash vectors are what the deployed contracts compute today', async () => {
  expect(await readHashVectors(devnet)).toEqual(committed)
})

it('v0.8 EIP-7702 UserOperations hash as the EntryPoint does: the initCode marker stands for the delegate', async () => {
  const { publicClient } = clientsFor(devnet.rpcUrl)
  const sender = '0x7a11ce0000000000000000000000000000000001'
  const delegate = '0xe6Cae83BdE06E4c305530e199D7217f42808555B'
  // An EOA that delegated to `delegate`, as EIP-7702 leaves its code.
  await publicClient.request({ method: 'anvil_setCode', params: [sender, concat(['0xef0100', delegate])] } as never)
  const authorization = { address: delegate, chainId: '0x7a69', nonce: '0x0', r: `0x${'11'.repeat(32)}`, s: `0x${'22'.repeat(32)}`, yParity: '0x1' }
  const cases = [
    { factory: '0x7702', factoryData: '0x' },
    { factory: '0x7702000000000000000000000000000000000000', factoryData: '0x' },
    { factory: '0x7702000000000000000000000000000000000000', factoryData: '0xabcdef' },
  ]
  const model = operationModels['0.8']
  const domainSeparator = await publicClient.readContract({ address: canonicalEntryPoints['0.8'], abi: entryPointAbis['0.8'], functionName: 'getDomainSeparatorV4' })
  for (const initCode of cases) {
    const op = model.fromInput(model.schema.parse(rpcUserOperationV07({ sender, ...initCode, eip7702Auth: authorization })) as never)
    const onChain = await publicClient.readContract({
      address: canonicalEntryPoints['0.8'],
      abi: entryPointAbis['0.8'],
      functionName: 'getUserOpHash',
      args: [toPackedUserOperation(op as UserOperation)],
    })
    expect(model.userOpHash({ op: op as never, chainId: devnet.chainId, entryPoint: canonicalEntryPoints['0.8'] })).toBe(onChain)
    // The override that pimlico-singleton-7702 wraps into its hash is the one the EntryPoint hashes in initCode's place.
    expect(entryPointV08HashWith({ initCodeHash: eip7702InitCodeHashOverride(op as UserOperationV07), op: op as UserOperationV07, domainSeparator })).toBe(onChain)
  }
})

/** EntryPoint v0.8's getUserOpHash (EIP-712 over UserOperationLib.encode) with `initCodeHash` in place of keccak256(initCode). */
function entryPointV08HashWith({ initCodeHash, op, domainSeparator }: { initCodeHash: Hex; op: UserOperationV07; domainSeparator: Hex }): Hex {
  const packed = toPackedUserOperation(op as UserOperation<'0.8'>)
  const typeHash = keccak256(
    toHex('PackedUserOperation(address sender,uint256 nonce,bytes initCode,bytes callData,bytes32 accountGasLimits,uint256 preVerificationGas,bytes32 gasFees,bytes paymasterAndData)'),
  )
  const structHash = keccak256(
    encodeAbiParameters(
      ['bytes32', 'address', 'uint256', 'bytes32', 'bytes32', 'bytes32', 'uint256', 'bytes32', 'bytes32'].map((type) => ({ type })),
      [typeHash, packed.sender, packed.nonce, initCodeHash, keccak256(packed.callData), packed.accountGasLimits, packed.preVerificationGas, packed.gasFees, keccak256(packed.paymasterAndData)],
    ),
  )
  return keccak256(concat(['0x1901', domainSeparator, structHash]))
}
