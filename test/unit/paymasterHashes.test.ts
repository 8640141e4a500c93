import { describe, expect, it } from 'vitest'
import { concat, encodeAbiParameters, keccak256, zeroHash, type Hex } from 'viem'
import vectors from '../vectors/paymasterHashes.json' with { type: 'json' }
import type { EntryPointVersion, PaymasterContract } from '../../config/schema.js'
import { pimlicoSingletonV8 } from '../../worker/sponsor/adapters/pimlicoSingleton.js'
import { adapterFor } from '../../worker/sponsor/adapters/registry.js'
import { InvalidParamsError } from '../../worker/errors.js'
import { eip7702AuthMissing } from '../../worker/sponsor/userOperation.js'
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

/**
 * Pimlico's V8 as its current sources build it: no npm package ships that bytecode, so its getHash is checked by
 * parts. The V7 hash inside is the mock V8's, read from the deployed contract (the vectors above); the override is
 * what the v0.8 EntryPoint hashes for an EIP-7702 initCode (checked against the EntryPoint on anvil, in
 * test/e2e/hashVectors.test.ts); the wrapping is `keccak256(abi.encode(v7Hash, override))`.
 */
describe('pimlico-singleton-7702', () => {
  const wrapped = (v7Hash: Hex, override: Hex) => keccak256(encodeAbiParameters([{ type: 'bytes32' }, { type: 'bytes32' }], [v7Hash, override]))
  const adapter = adapterFor('pimlico-singleton-7702', '0.8')
  const v08Vectors = vectors.filter((v) => v.contract === 'pimlico-singleton' && v.entryPointVersion === '0.8')

  it('has the deployed V8 vectors to build on', () => {
    expect(v08Vectors.map((v) => v.name)).toEqual(['pimlico-singleton v0.8 plain', 'pimlico-singleton v0.8 with factory', 'pimlico-singleton v0.8 large values'])
  })

  it.each(v08Vectors)('wraps the deployed V8 getHash of "$name" with a zero override', (vector) => {
    const op = operationOf(vector.userOperation)
    const hash = adapter.hash({ op: op as never, chainId: vector.chainId, paymaster: vector.paymaster as Hex, window: vector.window })
    expect(hash).toBe(wrapped(vector.paymasterHash as Hex, zeroHash))
  })

  // The override restated: this pins its wiring (which delegate, which bytes). That it is the EntryPoint's own is
  // checked against getUserOpHash on anvil.
  it('wraps it with keccak256(delegate ‖ factoryData) for an EIP-7702 initCode, the delegate named by eip7702Auth', () => {
    const vector = v08Vectors[0]!
    const delegate = '0xe6Cae83BdE06E4c305530e199D7217f42808555B'
    const authorization = { address: delegate, chainId: 31337, nonce: 0, r: `0x${'11'.repeat(32)}`, s: `0x${'22'.repeat(32)}`, yParity: 1 }
    const hashOf = (fields: Record<string, unknown>) =>
      adapter.hash({ op: { ...operationOf(vector.userOperation), authorization, ...fields } as never, chainId: vector.chainId, paymaster: vector.paymaster as Hex, window: vector.window })
    const v7Hash = (fields: Record<string, unknown>) => pimlicoSingletonV8.hash({ op: { ...operationOf(vector.userOperation), ...fields } as never, chainId: vector.chainId, paymaster: vector.paymaster as Hex, window: vector.window })
    const full = '0x7702000000000000000000000000000000000000'
    const cases: Array<{ factory: string; factoryData?: Hex }> = [{ factory: '0x7702' }, { factory: full }, { factory: full, factoryData: '0xabcdef' }]
    for (const initCode of cases) {
      expect(hashOf(initCode), initCode.factory).toBe(wrapped(v7Hash(initCode), keccak256(concat([delegate, initCode.factoryData ?? '0x']))))
    }
    // Without its delegate there is nothing to hash: signing refuses such an operation before it comes here, in the same words.
    expect(() => adapter.hash({ op: { ...operationOf(vector.userOperation), factory: '0x7702' } as never, chainId: 1, paymaster: vector.paymaster as Hex, window: vector.window })).toThrow(
      new InvalidParamsError(eip7702AuthMissing),
    )
  })
})
