import type { Abi, AbiFunction, AbiParameter, Address, Hex } from 'viem'
import { entryPoint06Abi, entryPoint07Abi } from 'viem/account-abstraction'
import type { EntryPointVersion, PaymasterContract } from '../../../config/schema.js'
import type { ValidityWindow } from '../policy.js'
import type { UserOperationV06, UserOperationV07 } from '../userOperation.js'

/**
 * One paymaster contract family at one EntryPoint version. An adapter computes
 * off-chain exactly what the deployed contract's `getHash` computes, and lays
 * out the paymaster data the contract parses. It never touches the network.
 */
export type PaymasterAdapter<Op = UserOperationV06 | UserOperationV07> = {
  contract: PaymasterContract
  entryPointVersion: EntryPointVersion
  /** Paymaster gas limits used when neither the caller nor the config sets them (v0.7+). */
  defaultGas: { verificationGasLimit: bigint; postOpGasLimit: bigint }
  /**
   * The paymaster data after the paymaster address (v0.6) or after its two gas
   * limits (v0.7+), ending with `signature`.
   */
  paymasterData(args: { window: ValidityWindow; signature: Hex }): Hex
  /**
   * The contract's hash for `op`, whose paymaster fields (address and gas
   * limits) are already those that will be sent.
   */
  hash(args: { op: Op; chainId: number; paymaster: Address; window: ValidityWindow }): Hex
  /** The deployed contract's own `getHash` for the same arguments, as a call to make over the chain's RPC (see `/health`). */
  getHashCall(args: { op: Op; window: ValidityWindow }): { abi: Abi; functionName: 'getHash'; args: readonly unknown[] }
}

/** The UserOperation parameter of an EntryPoint's `getUserOpHash`, as viem's ABI has it: paymasters' getHash takes the same. */
function userOperationParameter(abi: Abi): AbiParameter {
  return (abi.find((item) => item.type === 'function' && item.name === 'getUserOpHash') as AbiFunction).inputs[0]!
}

/** EntryPoint v0.6's UserOperation. */
export const userOperationV06Parameter = userOperationParameter(entryPoint06Abi)
/** EntryPoint v0.7/v0.8's PackedUserOperation. */
export const packedUserOperationParameter = userOperationParameter(entryPoint07Abi)

/**
 * A stand-in signature for stub data: a real secp256k1 signature (from a
 * discarded key) so contracts that recover it do not revert during gas
 * estimation, 65 bytes long and with no zero byte, so calldata gas estimated
 * with the stub is never less than with the final signature.
 */
export const stubSignature: Hex =
  '0xcd70d026041cfb9abc0e6baff2b5afca15130f8b10c77becf836ee36d75c5a5e5c313ac56fdfa990920e020274ec6c465ae43e9258e5eedda152aef2e18d04d21b'
