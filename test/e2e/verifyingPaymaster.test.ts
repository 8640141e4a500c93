import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { getAddress, hashMessage, recoverAddress, slice, hexToNumber } from 'viem'
import { toPackedUserOperation } from 'viem/account-abstraction'
import { verifyingPaymasterV07 } from '../../worker/sponsor/adapters/verifyingPaymasterV07.js'
import { artifact } from '../support/artifacts.js'
import { clientsFor, type Devnet } from '../support/devnet.js'
import { observedNonce, prepareSponsored, rejectionOf, signAndSubmit, startDevnetAndWorker } from '../support/e2eFlow.js'
import type { RunningWorker } from '../support/wranglerDev.js'

/** eth-infinitism VerifyingPaymaster (v0.7 artifact) on anvil, sponsored through the Worker under wrangler dev. */

let devnet: Devnet
let worker: RunningWorker
let stop: () => Promise<void>

beforeAll(async () => {
  ;({ devnet, worker, stop } = await startDevnetAndWorker({ anvilPort: 18546, workerPort: 18797, family: 'eth-infinitism-verifying' }))
})

afterAll(async () => {
  await stop?.()
})

describe('eth-infinitism VerifyingPaymaster on EntryPoint v0.7', () => {
  it('sponsors a 0-ETH SimpleAccount that is created and executes a call', async () => {
    const { publicClient } = clientsFor(devnet.rpcUrl)
    const { account, prepared } = await prepareSponsored({ devnet, workerUrl: worker.url, version: '0.7' })
    expect(prepared.paymaster).toBe(devnet.verifyingPaymasterV07)
    const { event } = await signAndSubmit({ devnet, version: '0.7', account, userOperation: prepared })
    expect(event.args).toMatchObject({ sender: account.address, paymaster: getAddress(devnet.verifyingPaymasterV07), success: true })
    expect(await observedNonce(publicClient, '0.7', account.address)).toBe(1n)
    expect(await publicClient.getBalance({ address: account.address })).toBe(0n)
  })

  it('computes off-chain exactly the getHash of the deployed contract, and the Worker signs it', async () => {
    const { publicClient } = clientsFor(devnet.rpcUrl)
    const { prepared } = await prepareSponsored({ devnet, workerUrl: worker.url, version: '0.7' })
    const window = { validUntil: hexToNumber(slice(prepared.paymasterData!, 0, 32)), validAfter: hexToNumber(slice(prepared.paymasterData!, 32, 64)) }
    const onChain = await publicClient.readContract({
      address: devnet.verifyingPaymasterV07,
      abi: artifact('0.7', 'VerifyingPaymaster').abi,
      functionName: 'getHash',
      args: [toPackedUserOperation(prepared), window.validUntil, window.validAfter],
    })
    expect(verifyingPaymasterV07.hash({ op: prepared as never, chainId: devnet.chainId, paymaster: devnet.verifyingPaymasterV07, window })).toBe(onChain)
    const signature = slice(prepared.paymasterData!, 64)
    expect(await recoverAddress({ hash: hashMessage({ raw: onChain as `0x${string}` }), signature })).toBe(devnet.paymasterSigner)
  })

  it('a tampered field after sponsorship is rejected by the contract (AA34)', async () => {
    const { account, prepared } = await prepareSponsored({ devnet, workerUrl: worker.url, version: '0.7' })
    const tampered = { ...prepared, preVerificationGas: prepared.preVerificationGas + 1n }
    expect(await rejectionOf(signAndSubmit({ devnet, version: '0.7', account, userOperation: tampered }))).toContain('AA34')
  })
})
