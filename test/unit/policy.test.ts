import { describe, expect, it } from 'vitest'
import { loadConfig } from '../../config/load.js'
import { SponsorshipDeclinedError } from '../../worker/errors.js'
import { canonicalEntryPoints } from '../../worker/sponsor/entryPoints.js'
import { checkGas, checkSender, maxCostWei, validityWindow, type SponsoredGas } from '../../worker/sponsor/policy.js'
import { evaluate } from '../../worker/sponsor/sponsor.js'
import { rpcUserOperationV07 } from '../support/userOperations.js'

const policyOf = (policy: Record<string, unknown>) =>
  loadConfig({
    PAYMASTER_CONFIG: {
      chains: [{ chainId: 1, paymasters: [{ entryPointVersion: '0.7', contract: 'pimlico-singleton', address: '0xd8A5406E24dcDc93656c1eF20E491a1FcF43b558' }] }],
      policy,
    },
  }).policy

const gas: SponsoredGas = {
  callGasLimit: 100n,
  verificationGasLimit: 200n,
  preVerificationGas: 10n,
  paymasterVerificationGasLimit: 30n,
  paymasterPostOpGasLimit: 5n,
  maxFeePerGas: 7n,
  maxPriorityFeePerGas: 1n,
}

function declineOf(check: () => void) {
  try {
    check()
  } catch (error) {
    if (error instanceof SponsorshipDeclinedError) return error.data
    throw error
  }
  return undefined
}

describe('policy', () => {
  it('signs for validForSeconds from now, valid from a skew before now', () => {
    expect(validityWindow(policyOf({ validity: { validForSeconds: 120, validAfterSkewSeconds: 30 } }), 1_000_000)).toEqual({
      validUntil: 1_000_120,
      validAfter: 999_970,
    })
  })

  it('declines denied senders, and senders off the allow list when there is one', () => {
    const allowed = '0x1111111111111111111111111111111111111111'
    const denied = '0x2222222222222222222222222222222222222222'
    const policy = policyOf({ senders: { allow: [allowed], deny: [denied] } })
    expect(declineOf(() => checkSender(policy, allowed))).toBeUndefined()
    expect(declineOf(() => checkSender(policy, denied))?.reason).toBe('sender_denied')
    expect(declineOf(() => checkSender(policy, '0x3333333333333333333333333333333333333333'))?.reason).toBe('sender_not_allowed')
    expect(declineOf(() => checkSender(policyOf({}), denied))).toBeUndefined()
  })

  it('prices the prefund as each EntryPoint does: v0.6 triples verification gas, v0.7+ adds paymaster limits', () => {
    expect(maxCostWei('0.6', gas)).toBe((100n + 3n * 200n + 10n) * 7n)
    expect(maxCostWei('0.7', gas)).toBe((100n + 200n + 10n + 30n + 5n) * 7n)
  })

  it('declines each capped field above its cap, and the total cost above its cap', () => {
    expect(declineOf(() => checkGas(policyOf({ gas: { maxPaymasterVerificationGasLimit: 29 } }), '0.7', gas))).toEqual({
      reason: 'gas_limit_exceeded',
      field: 'paymasterVerificationGasLimit',
      limit: '29',
      value: '30',
    })
    expect(declineOf(() => checkGas(policyOf({ gas: { maxFeePerGas: '7' } }), '0.7', gas))).toBeUndefined()
    expect(declineOf(() => checkGas(policyOf({ gas: { maxTotalCostWei: '2414' } }), '0.7', gas))?.reason).toBe('max_cost_exceeded')
    expect(declineOf(() => checkGas(policyOf({ gas: { maxTotalCostWei: '2415' } }), '0.7', gas))).toBeUndefined()
  })

  it('caps the postOp gas limit at the paymaster\u2019s own unless maxPaymasterPostOpGasLimit says otherwise', async () => {
    const evaluated = async (paymaster: Record<string, unknown>, policy: Record<string, unknown>) => {
      const config = loadConfig({
        PAYMASTER_CONFIG: {
          chains: [{ chainId: 1, paymasters: [{ entryPointVersion: '0.7', contract: 'pimlico-singleton', address: '0xd8A5406E24dcDc93656c1eF20E491a1FcF43b558', ...paymaster }] }],
          policy,
        },
      })
      const deps = { config, signerFor: () => expect.unreachable('a dry run signs nothing'), now: () => 1_000_000, log: () => undefined }
      const request = { chainId: 1, entryPoint: canonicalEntryPoints['0.7'], userOperation: rpcUserOperationV07({ paymasterPostOpGasLimit: '0x64' }) }
      return evaluate(deps, request).then(
        (evaluation) => evaluation.fields.paymasterPostOpGasLimit,
        (error: unknown) => declineOf(() => { throw error }),
      )
    }
    // The adapter's own (1), the config's, or the policy's cap when it sets one, above the paymaster's or below.
    expect(await evaluated({}, {})).toEqual({ reason: 'gas_limit_exceeded', field: 'paymasterPostOpGasLimit', limit: '1', value: '100' })
    expect(await evaluated({ postOpGasLimit: '99' }, {})).toMatchObject({ limit: '99' })
    expect(await evaluated({ postOpGasLimit: '100' }, {})).toBe(100n)
    expect(await evaluated({}, { gas: { maxPaymasterPostOpGasLimit: '100' } })).toBe(100n)
    expect(await evaluated({ postOpGasLimit: '500' }, { gas: { maxPaymasterPostOpGasLimit: '99' } })).toMatchObject({ limit: '99' })
  })
})
