import { z } from 'zod'
import type { Address, Hex } from 'viem'
import { addressSchema, hexBytesSchema, quantitySchema } from './hexSchemas.js'

/**
 * UserOperations in the JSON-RPC form that viem, permissionless and bundlers
 * send: hex quantities, v0.6 with initCode/paymasterAndData, v0.7 and v0.8
 * unpacked (factory/factoryData, separate gas fields, paymaster fields).
 *
 * Gas and fee fields may be absent when a wallet asks for stub data before it
 * has estimated gas; `requireSignedFields` insists on them before anything is
 * signed, because the paymaster signature covers them.
 */

const uint256 = quantitySchema(256)
const uint128 = quantitySchema(128)

export const userOperationV06Schema = z.object({
  sender: addressSchema,
  nonce: uint256,
  initCode: hexBytesSchema.default('0x'),
  callData: hexBytesSchema,
  callGasLimit: uint256.optional(),
  verificationGasLimit: uint256.optional(),
  preVerificationGas: uint256.optional(),
  maxFeePerGas: uint256.optional(),
  maxPriorityFeePerGas: uint256.optional(),
  paymasterAndData: hexBytesSchema.default('0x'),
  signature: hexBytesSchema.default('0x'),
})

const eip7702AuthSchema = z.object({
  address: addressSchema,
  chainId: quantitySchema(64),
  nonce: quantitySchema(64),
  r: hexBytesSchema,
  s: hexBytesSchema,
  yParity: quantitySchema(8),
})

export const userOperationV07Schema = z
  .object({
    sender: addressSchema,
    nonce: uint256,
    factory: addressSchema.or(z.literal('0x7702')).nullish(),
    factoryData: hexBytesSchema.nullish(),
    callData: hexBytesSchema,
    callGasLimit: uint128.optional(),
    verificationGasLimit: uint128.optional(),
    preVerificationGas: uint256.optional(),
    maxFeePerGas: uint128.optional(),
    maxPriorityFeePerGas: uint128.optional(),
    paymaster: addressSchema.nullish(),
    paymasterVerificationGasLimit: uint128.nullish(),
    paymasterPostOpGasLimit: uint128.nullish(),
    paymasterData: hexBytesSchema.nullish(),
    signature: hexBytesSchema.default('0x'),
    eip7702Auth: eip7702AuthSchema.nullish(),
  })
  .refine((op) => !op.factoryData || op.factoryData === '0x' || op.factory, {
    message: 'factoryData is set but factory is missing',
    path: ['factoryData'],
  })

/**
 * The EIP-7702 initCode marker: initCode whose first 20 bytes, zero-padded, are 0x7702. The v0.8 EntryPoint hashes
 * the sender's delegate in its place; the v0.7 one would call it as a factory.
 */
export function isEip7702Marker(factory: string | null | undefined): boolean {
  return factory != null && /^0x7702(0{36})?$/i.test(factory)
}

/**
 * v0.8: initCode is factory ‖ factoryData, and the EntryPoint sees the 7702 marker only in its first 20 bytes,
 * zero-padded, so the short marker takes no factoryData.
 */
export const userOperationV08Schema = userOperationV07Schema.refine((op) => !op.factoryData || op.factoryData === '0x' || op.factory?.toLowerCase() !== '0x7702', {
  message: 'with factoryData, the EIP-7702 marker must be written in full (0x7702 and 36 zeros): the EntryPoint looks for it in the first 20 bytes of 0x7702 ‖ factoryData',
  path: ['factory'],
})

/** v0.7 knows no 7702 marker (an eip7702Auth alone is the bundler's business: it delegates the sender before handleOps). */
export const userOperationV07OnlySchema = userOperationV07Schema.refine((op) => !isEip7702Marker(op.factory), {
  message: 'the EIP-7702 initCode marker (factory 0x7702) needs EntryPoint v0.8; v0.7 would call 0x7702 as a factory',
  path: ['factory'],
})

/** Why an EIP-7702 operation without its authorization is not signed for v0.8 (see `eip7702SigningRefusal`). */
export const eip7702AuthMissing =
  'userOperation.eip7702Auth: an EIP-7702 UserOperation (factory 0x7702) needs eip7702Auth, which names the delegate the EntryPoint hashes in the marker\u2019s place'

/**
 * Why v0.8 will not sign this operation, if it will not: v0.8 puts the sender's delegate in the marker's place when it
 * hashes; without the authorization that names it, the delegate is on chain only, which is not read here, so the
 * userOpHash answered would be wrong. (Stub data carries no userOpHash, and is given.)
 */
export function eip7702SigningRefusal(op: UserOperationV07Input): string | undefined {
  if (!isEip7702Marker(op.factory) || op.eip7702Auth) return undefined
  return eip7702AuthMissing
}

export type UserOperationV06Input = z.infer<typeof userOperationV06Schema>
export type UserOperationV07Input = z.infer<typeof userOperationV07Schema>

/** The plain, fully populated shapes the domain works with (viem's field names). */
export type UserOperationV06 = {
  sender: Address
  nonce: bigint
  initCode: Hex
  callData: Hex
  callGasLimit: bigint
  verificationGasLimit: bigint
  preVerificationGas: bigint
  maxFeePerGas: bigint
  maxPriorityFeePerGas: bigint
  paymasterAndData: Hex
  signature: Hex
}

export type Eip7702Authorization = {
  address: Address
  chainId: number
  nonce: number
  r: Hex
  s: Hex
  yParity: number
}

export type UserOperationV07 = {
  sender: Address
  nonce: bigint
  factory?: Address | '0x7702'
  factoryData?: Hex
  callData: Hex
  callGasLimit: bigint
  verificationGasLimit: bigint
  preVerificationGas: bigint
  maxFeePerGas: bigint
  maxPriorityFeePerGas: bigint
  paymaster?: Address
  paymasterVerificationGasLimit?: bigint
  paymasterPostOpGasLimit?: bigint
  paymasterData?: Hex
  signature: Hex
  authorization?: Eip7702Authorization
}

/** The fields the paymaster signature commits to; each must be present before signing. */
export const signedGasFields = [
  'callGasLimit',
  'verificationGasLimit',
  'preVerificationGas',
  'maxFeePerGas',
  'maxPriorityFeePerGas',
] as const

export type SignedGasField = (typeof signedGasFields)[number]

/** Names the first signed gas field the caller left out, or undefined when all are there. */
export function missingSignedField(op: Partial<Record<SignedGasField, bigint>>): SignedGasField | undefined {
  return signedGasFields.find((field) => op[field] === undefined)
}

/** Gas fields a stub request left out count as 0 (nothing is signed over them then). */
function gasOrZero(op: Partial<Record<SignedGasField, bigint>>): Record<SignedGasField, bigint> {
  return Object.fromEntries(signedGasFields.map((field) => [field, op[field] ?? 0n])) as Record<SignedGasField, bigint>
}

export function toUserOperationV06(input: UserOperationV06Input): UserOperationV06 {
  return { ...input, ...gasOrZero(input) }
}

export function toUserOperationV07(input: UserOperationV07Input): UserOperationV07 {
  const { eip7702Auth, factory, factoryData, paymaster, paymasterData, ...rest } = input
  return {
    ...rest,
    factory: factory ?? undefined,
    factoryData: factoryData ?? undefined,
    paymaster: paymaster ?? undefined,
    paymasterData: paymasterData ?? undefined,
    paymasterVerificationGasLimit: input.paymasterVerificationGasLimit ?? undefined,
    paymasterPostOpGasLimit: input.paymasterPostOpGasLimit ?? undefined,
    ...gasOrZero(input),
    authorization: eip7702Auth
      ? {
          address: eip7702Auth.address,
          chainId: Number(eip7702Auth.chainId),
          nonce: Number(eip7702Auth.nonce),
          r: eip7702Auth.r,
          s: eip7702Auth.s,
          yParity: Number(eip7702Auth.yParity),
        }
      : undefined,
  }
}
