import type { Address } from 'viem'
import type { EntryPointVersion, PolicyConfig } from '../../config/schema.js'
import { SponsorshipDeclinedError } from '../errors.js'

/**
 * The sponsorship policy. Every check here runs before anything is signed, and
 * every decline names a machine-readable `reason` plus what the caller can change.
 */

export type ValidityWindow = { validUntil: number; validAfter: number }

/** The window a new signature is valid for on chain, in unix seconds. */
export function validityWindow(policy: PolicyConfig, nowSeconds: number): ValidityWindow {
  return {
    validUntil: nowSeconds + policy.validity.validForSeconds,
    validAfter: Math.max(0, nowSeconds - policy.validity.validAfterSkewSeconds),
  }
}

export function checkSender(policy: PolicyConfig, sender: Address): void {
  const { allow, deny } = policy.senders
  if (deny.includes(sender)) {
    throw new SponsorshipDeclinedError(`sender ${sender} is on the deny list`, { reason: 'sender_denied', sender })
  }
  if (allow && !allow.includes(sender)) {
    throw new SponsorshipDeclinedError(`sender ${sender} is not on the allow list`, { reason: 'sender_not_allowed', sender })
  }
}

/** The gas a sponsored operation may burn, the same for every EntryPoint version. */
export type SponsoredGas = {
  callGasLimit: bigint
  verificationGasLimit: bigint
  preVerificationGas: bigint
  paymasterVerificationGasLimit: bigint
  paymasterPostOpGasLimit: bigint
  maxFeePerGas: bigint
  maxPriorityFeePerGas: bigint
}

const gasCaps = [
  ['callGasLimit', 'maxCallGasLimit'],
  ['verificationGasLimit', 'maxVerificationGasLimit'],
  ['preVerificationGas', 'maxPreVerificationGas'],
  ['paymasterVerificationGasLimit', 'maxPaymasterVerificationGasLimit'],
  ['paymasterPostOpGasLimit', 'maxPaymasterPostOpGasLimit'],
  ['maxFeePerGas', 'maxFeePerGas'],
  ['maxPriorityFeePerGas', 'maxPriorityFeePerGas'],
] as const satisfies ReadonlyArray<readonly [keyof SponsoredGas, keyof PolicyConfig['gas']]>

/**
 * The most the EntryPoint may charge the paymaster: its required prefund.
 * v0.6 multiplies verificationGasLimit by 3 when a paymaster is used (it also
 * bounds postOp); v0.7+ has separate paymaster limits.
 */
export function maxCostWei(version: EntryPointVersion, gas: SponsoredGas): bigint {
  const limits =
    version === '0.6'
      ? gas.callGasLimit + gas.verificationGasLimit * 3n + gas.preVerificationGas
      : gas.callGasLimit +
        gas.verificationGasLimit +
        gas.paymasterVerificationGasLimit +
        gas.paymasterPostOpGasLimit +
        gas.preVerificationGas
  return limits * gas.maxFeePerGas
}

export function checkGas(policy: PolicyConfig, version: EntryPointVersion, gas: SponsoredGas): void {
  for (const [field, capName] of gasCaps) {
    const cap = policy.gas[capName]
    if (cap !== undefined && gas[field] > cap) {
      throw new SponsorshipDeclinedError(`${field} ${gas[field]} exceeds the sponsored maximum ${cap}`, {
        reason: 'gas_limit_exceeded',
        field,
        limit: cap.toString(),
        value: gas[field].toString(),
      })
    }
  }
  const cap = policy.gas.maxTotalCostWei
  const cost = maxCostWei(version, gas)
  if (cap !== undefined && cost > cap) {
    throw new SponsorshipDeclinedError(`the operation may cost up to ${cost} wei, above the sponsored maximum ${cap} wei`, {
      reason: 'max_cost_exceeded',
      limit: cap.toString(),
      value: cost.toString(),
    })
  }
}
