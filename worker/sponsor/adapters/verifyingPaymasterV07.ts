import { concat, encodeAbiParameters, keccak256, slice, type Abi, type Hex } from 'viem'
import { toPackedUserOperation, type UserOperation } from 'viem/account-abstraction'
import type { ValidityWindow } from '../policy.js'
import type { UserOperationV07 } from '../userOperation.js'
import { packedUserOperationParameter, type PaymasterAdapter } from './paymasterAdapter.js'

/** `getHash(PackedUserOperation userOp, uint48 validUntil, uint48 validAfter)`. */
const getHashAbi: Abi = [
  {
    type: 'function',
    name: 'getHash',
    stateMutability: 'view',
    inputs: [{ ...packedUserOperationParameter, name: 'userOp' }, { name: 'validUntil', type: 'uint48' }, { name: 'validAfter', type: 'uint48' }],
    outputs: [{ type: 'bytes32' }],
  },
]

/**
 * eth-infinitism VerifyingPaymaster from @account-abstraction/contracts@0.7.0
 * (samples/VerifyingPaymaster.sol). Paymaster data after the two gas limits:
 *
 *   [0:64]   abi.encode(uint48 validUntil, uint48 validAfter)
 *   [64:129] EIP-191 signature (r ‖ s ‖ v)
 *
 * getHash = keccak256(abi.encode(sender, nonce, keccak(initCode),
 *   keccak(callData), accountGasLimits, uint256(paymasterAndData[20:52]),
 *   preVerificationGas, gasFees, block.chainid, address(this), validUntil,
 *   validAfter)): the paymaster's address enters as `address(this)` and its
 *   two gas limits as one 32-byte word.
 */

export function verifyingPaymasterData({ window, signature }: { window: ValidityWindow; signature: Hex }): Hex {
  return concat([
    encodeAbiParameters([{ type: 'uint48' }, { type: 'uint48' }], [window.validUntil, window.validAfter]),
    signature,
  ])
}

export const verifyingPaymasterV07: PaymasterAdapter<UserOperationV07> = {
  contract: 'eth-infinitism-verifying',
  entryPointVersion: '0.7',
  // Validation is one ecrecover plus hashing; no postOp (empty context).
  defaultGas: { verificationGasLimit: 60_000n, postOpGasLimit: 1n },
  paymasterData: verifyingPaymasterData,
  hash: ({ op, chainId, paymaster, window }) => {
    const packed = toPackedUserOperation(op as UserOperation<'0.7'>)
    return keccak256(
      encodeAbiParameters(
        [
          { type: 'address' },
          { type: 'uint256' },
          { type: 'bytes32' },
          { type: 'bytes32' },
          { type: 'bytes32' },
          { type: 'uint256' },
          { type: 'uint256' },
          { type: 'bytes32' },
          { type: 'uint256' },
          { type: 'address' },
          { type: 'uint48' },
          { type: 'uint48' },
        ],
        [
          packed.sender,
          packed.nonce,
          keccak256(packed.initCode),
          keccak256(packed.callData),
          packed.accountGasLimits,
          BigInt(slice(packed.paymasterAndData, 20, 52)),
          packed.preVerificationGas,
          packed.gasFees,
          BigInt(chainId),
          paymaster,
          window.validUntil,
          window.validAfter,
        ],
      ),
    )
  },
  getHashCall: ({ op, window }) => ({
    abi: getHashAbi,
    functionName: 'getHash',
    args: [toPackedUserOperation(op as UserOperation<'0.7'>), window.validUntil, window.validAfter],
  }),
}
