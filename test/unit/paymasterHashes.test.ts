import { describe, expect, it } from 'vitest'
import type { Hex } from 'viem'
import vectors from '../vectors/paymasterHashes.json' with { type: 'json' }
import type { EntryPointVersion, PaymasterContract } from '../../config/schema.js'
import { adapterFor } from '../../worker/sponsor/adapters/registry.js'
import { canonicalEntryPoints } from '../../worker/sponsor/entryPoints.js'
import { operationModels } from '../../worker/sponsor/operationModels.js'

/** Vectors read from the deployed contracts (see test/support/hashVectors.ts, re-checked end to end on anvil). */

const numericFields = new Set([
  'nonce',
  'callGasLimit',
  'verificationGasLimit',
  'preVerificationGas',
  'maxFeePerGas',
  'maxPriorityFeePerGas',
  'paymasterVerificationGasLimit',
  'paymasterPostOpGasLimit',
])

function operationOf(fields: Record<string, string | undefined>) {
  return Object.fromEntries(Object.entries(fields).map(([key, value]) => [key, numericFields.has(key) ? BigInt(value!) : value]))
}

describe.each(vectors)('$name', (vector) => {
  const version = vector.entryPointVersion as EntryPointVersion
  const op = operationOf(vector.userOperation)

  it("equals the contract's getHash", () => {
    const adapter = adapterFor(vector.contract as PaymasterContract, version)
    const hash = adapter.hash({ op: op as never, chainId: vector.chainId, paymaster: vector.paymaster as Hex, window: vector.window })
    expect(hash).toBe(vector.paymasterHash)
  })

  it("equals the EntryPoint's getUserOpHash", () => {
    const hash = operationModels[version].userOpHash({ op: op as never, chainId: vector.chainId, entryPoint: canonicalEntryPoints[version] })
    expect(hash).toBe(vector.userOpHash)
  })

  it('lays out paymaster data the way the contract parsed it', () => {
    const adapter = adapterFor(vector.contract as PaymasterContract, version)
    const signed = version === '0.6' ? vector.userOperation.paymasterAndData!.slice(42) : vector.userOperation.paymasterData!.slice(2)
    expect(adapter.paymasterData({ window: vector.window, signature: '0x' })).toBe(`0x${signed}`)
  })
})
