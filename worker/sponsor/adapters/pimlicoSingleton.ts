import { concat, encodeAbiParameters, encodePacked, keccak256, slice, zeroHash, type Abi, type AbiParameter, type Hex } from 'viem'
import { toPackedUserOperation, type UserOperation } from 'viem/account-abstraction'
import type { ValidityWindow } from '../policy.js'
import { InvalidParamsError } from '../../errors.js'
import { eip7702AuthMissing, isEip7702Marker, type UserOperationV06, type UserOperationV07 } from '../userOperation.js'
import { packedUserOperationParameter, userOperationV06Parameter, type PaymasterAdapter } from './paymasterAdapter.js'

/**
 * Pimlico SingletonPaymaster V6, V7 and V8 (pimlicolabs/singleton-paymaster)
 * in verifying mode. Paymaster data, after the address (V6) or the two gas
 * limits (V7/V8):
 *
 *   [0]      (mode << 1) | allowAllBundlers  = 0x01 (verifying, any bundler)
 *   [1:7]    validUntil, uint48 big-endian
 *   [7:13]   validAfter, uint48 big-endian
 *   [13:78]  EIP-191 signature, 65 bytes (OZ ECDSA.recover rejects 64)
 *
 * getHash covers paymasterAndData up to the signature (so the mode byte, the
 * window and, on V7/V8, both paymaster gas limits) plus block.chainid, but not
 * the paymaster's address beyond those bytes. V8 as @pimlico/mock-paymaster
 * deploys it (`pimlico-singleton`) hashes exactly as V7, with the raw initCode
 * even for an EIP-7702 marker. V8 as its current sources build it
 * (`pimlico-singleton-7702`) hashes `abi.encode(v7Hash, override)`, the
 * override being what the v0.8 EntryPoint hashes in place of the initCode of
 * an EIP-7702 operation, and zero for any other.
 *
 * Any bundler is allowed (bit 1): with it clear the contract reads tx.origin,
 * which ERC-7562 forbids during validation, so public bundlers would drop it.
 */

const verifyingModeAnyBundler = 0x01
/** getHash's `_mode` argument: verifying mode (the mode byte's upper bits). */
const verifyingMode = 0

/** `getHash(uint8 _mode, op)`, with the op as the version's EntryPoint takes it. */
function singletonGetHashAbi(op: AbiParameter): Abi {
  return [{ type: 'function', name: 'getHash', stateMutability: 'view', inputs: [{ name: '_mode', type: 'uint8' }, { ...op, name: '_userOp' }], outputs: [{ type: 'bytes32' }] }]
}
/** Mode byte + validUntil + validAfter. */
const signedConfigLength = 13

export function singletonPaymasterData({ window, signature }: { window: ValidityWindow; signature: Hex }): Hex {
  return concat([
    encodePacked(['uint8', 'uint48', 'uint48'], [verifyingModeAnyBundler, window.validUntil, window.validAfter]),
    signature,
  ])
}

// Verifying mode has no postOp (empty context); 1 rather than 0 because some
// SDKs treat a zero limit as "not set" and replace it.
const defaultGas = { verificationGasLimit: 60_000n, postOpGasLimit: 1n }

export const pimlicoSingletonV6: PaymasterAdapter<UserOperationV06> = {
  contract: 'pimlico-singleton',
  entryPointVersion: '0.6',
  defaultGas,
  paymasterData: singletonPaymasterData,
  hash: ({ op, chainId }) => {
    const signedPart = slice(op.paymasterAndData, 0, 20 + signedConfigLength)
    const inner = keccak256(
      encodeAbiParameters(
        [
          { type: 'address' },
          { type: 'uint256' },
          { type: 'uint256' },
          { type: 'uint256' },
          { type: 'uint256' },
          { type: 'uint256' },
          { type: 'uint256' },
          { type: 'bytes32' },
          { type: 'bytes32' },
          { type: 'bytes32' },
        ],
        [
          op.sender,
          op.nonce,
          op.callGasLimit,
          op.verificationGasLimit,
          op.preVerificationGas,
          op.maxFeePerGas,
          op.maxPriorityFeePerGas,
          keccak256(op.callData),
          keccak256(op.initCode),
          keccak256(signedPart),
        ],
      ),
    )
    return keccak256(encodeAbiParameters([{ type: 'bytes32' }, { type: 'uint256' }], [inner, BigInt(chainId)]))
  },
  getHashCall: ({ op }) => ({ abi: singletonGetHashAbi(userOperationV06Parameter), functionName: 'getHash', args: [verifyingMode, op] }),
}

function singletonV07Hash({ op, chainId }: { op: UserOperationV07; chainId: number }): Hex {
  const packed = toPackedUserOperation(op as UserOperation<'0.7'>)
  const signedPart = slice(packed.paymasterAndData, 0, 52 + signedConfigLength)
  const inner = keccak256(
    encodeAbiParameters(
      [
        { type: 'address' },
        { type: 'uint256' },
        { type: 'bytes32' },
        { type: 'uint256' },
        { type: 'bytes32' },
        { type: 'bytes32' },
        { type: 'bytes32' },
        { type: 'bytes32' },
      ],
      [
        packed.sender,
        packed.nonce,
        packed.accountGasLimits,
        packed.preVerificationGas,
        packed.gasFees,
        keccak256(packed.initCode),
        keccak256(packed.callData),
        keccak256(signedPart),
      ],
    ),
  )
  return keccak256(encodeAbiParameters([{ type: 'bytes32' }, { type: 'uint256' }], [inner, BigInt(chainId)]))
}

export const pimlicoSingletonV7: PaymasterAdapter<UserOperationV07> = {
  contract: 'pimlico-singleton',
  entryPointVersion: '0.7',
  defaultGas,
  paymasterData: singletonPaymasterData,
  hash: singletonV07Hash,
  getHashCall: ({ op }) => ({
    abi: singletonGetHashAbi(packedUserOperationParameter),
    functionName: 'getHash',
    args: [verifyingMode, toPackedUserOperation(op as UserOperation<'0.7'>)],
  }),
}

export const pimlicoSingletonV8: PaymasterAdapter<UserOperationV07> = {
  ...pimlicoSingletonV7,
  entryPointVersion: '0.8',
}

/**
 * The v0.8 EntryPoint's `_getEip7702InitCodeHashOverride`: for initCode starting with the 7702 marker,
 * keccak256(delegate ‖ initCode[20:]), where initCode[20:] is the factoryData after the full marker (the short one
 * takes none); zero for any other initCode. The EntryPoint reads the delegate from the sender's code; we take it from
 * the operation's authorization, as its userOpHash does.
 */
export function eip7702InitCodeHashOverride(op: UserOperationV07): Hex {
  if (!isEip7702Marker(op.factory)) return zeroHash
  // Signing refuses such an operation first (eip7702SigningRefusal); this keeps any other caller to the same answer.
  if (!op.authorization) throw new InvalidParamsError(eip7702AuthMissing)
  return keccak256(concat([op.authorization.address, op.factoryData ?? '0x']))
}

export const pimlicoSingletonV8Eip7702: PaymasterAdapter<UserOperationV07> = {
  ...pimlicoSingletonV8,
  contract: 'pimlico-singleton-7702',
  hash: ({ op, chainId }) =>
    keccak256(encodeAbiParameters([{ type: 'bytes32' }, { type: 'bytes32' }], [singletonV07Hash({ op, chainId }), eip7702InitCodeHashOverride(op)])),
}
