import { concat, numberToHex, type Hex } from 'viem'
import type { Stub } from './sponsor/sponsor.js'

/** Paymaster fields as JSON, in each EntryPoint version's RPC form (v0.6 concatenates them into paymasterAndData). */
export function paymasterFieldsJson({ fields, entryPoint }: Stub): Record<string, Hex> {
  if (entryPoint.version === '0.6') return { paymasterAndData: concat([fields.paymaster, fields.paymasterData]) }
  return {
    paymaster: fields.paymaster,
    paymasterData: fields.paymasterData,
    paymasterVerificationGasLimit: numberToHex(fields.paymasterVerificationGasLimit),
    paymasterPostOpGasLimit: numberToHex(fields.paymasterPostOpGasLimit),
  }
}
