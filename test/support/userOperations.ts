import { numberToHex, type Address, type Hex } from 'viem'

/** UserOperations in the JSON-RPC form wallets send, for tests. */

const sender: Address = '0x1111111111111111111111111111111111111111'

export const gasFields = {
  callGasLimit: numberToHex(100_000n),
  verificationGasLimit: numberToHex(400_000n),
  preVerificationGas: numberToHex(60_000n),
  maxFeePerGas: numberToHex(2_000_000_000n),
  maxPriorityFeePerGas: numberToHex(1_000_000_000n),
}

export function rpcUserOperationV06(overrides: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    sender,
    nonce: '0x0',
    initCode: '0x',
    callData: '0xb61d27f6' as Hex,
    ...gasFields,
    paymasterAndData: '0x',
    signature: '0x',
    ...overrides,
  }
}

export function rpcUserOperationV07(overrides: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    sender,
    nonce: '0x5',
    factory: '0x91E60e0613810449d098b0b5Ec8b51A0FE8c8985',
    factoryData: '0x5fbfb9cf',
    callData: '0xb61d27f6' as Hex,
    ...gasFields,
    signature: '0x',
    ...overrides,
  }
}

/** Drops the gas fields a wallet has not estimated yet when it asks for stub data. */
export function withoutGas(op: Record<string, unknown>): Record<string, unknown> {
  const { callGasLimit, verificationGasLimit, preVerificationGas, ...rest } = op
  return rest
}
