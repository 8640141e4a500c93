import { afterAll, beforeAll, expect, it } from 'vitest'
import { concat } from 'viem'
import { toPackedUserOperation, type UserOperation } from 'viem/account-abstraction'
import { canonicalEntryPoints } from '../../worker/sponsor/entryPoints.js'
import { operationModels } from '../../worker/sponsor/operationModels.js'
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
  for (const initCode of cases) {
    const op = model.fromInput(model.schema.parse(rpcUserOperationV07({ sender, ...initCode, eip7702Auth: authorization })) as never)
    const onChain = await publicClient.readContract({
      address: canonicalEntryPoints['0.8'],
      abi: entryPointAbis['0.8'],
      functionName: 'getUserOpHash',
      args: [toPackedUserOperation(op as UserOperation)],
    })
    expect(model.userOpHash({ op: op as never, chainId: devnet.chainId, entryPoint: canonicalEntryPoints['0.8'] })).toBe(onChain)
  }
})
