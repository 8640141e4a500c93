import { concat, type Address, type Hex } from 'viem'
import { getUserOperationHash, type UserOperation } from 'viem/account-abstraction'
import type { z } from 'zod'
import type { EntryPointVersion } from '../../config/schema.js'
import type { SponsoredGas } from './policy.js'
import {
  eip7702SigningRefusal,
  missingSignedField,
  toUserOperationV06,
  toUserOperationV07,
  userOperationV06Schema,
  userOperationV07OnlySchema,
  userOperationV07Schema,
  userOperationV08Schema,
  type SignedGasField,
  type UserOperationV06,
  type UserOperationV07,
} from './userOperation.js'

/**
 * What differs between EntryPoint versions, behind one shape, so the sponsor
 * flow is written once: how a UserOperation is parsed, which gas it burns,
 * where the paymaster fields go, and how the EntryPoint hashes it.
 */

/** The paymaster's part of a UserOperation: v0.6 concatenates it into paymasterAndData. */
export type PaymasterFields = {
  paymaster: Address
  paymasterData: Hex
  paymasterVerificationGasLimit: bigint
  paymasterPostOpGasLimit: bigint
}

export type OperationModel<Op> = {
  schema: z.ZodType
  fromInput(input: never): Op
  /** The first signed field the raw input leaves out (checked before signing). */
  missingField(input: never): SignedGasField | undefined
  /** Why this version will not sign the input although it is well formed, naming the field; checked before signing. */
  signingRefusal?(input: never): string | undefined
  /** Paymaster gas limits the caller already chose (v0.7+), taken over unchanged when present. */
  requestedPaymasterGas(op: Op): { verificationGasLimit?: bigint; postOpGasLimit?: bigint }
  withPaymaster(op: Op, fields: PaymasterFields): Op
  gas(op: Op, fields: Pick<PaymasterFields, 'paymasterVerificationGasLimit' | 'paymasterPostOpGasLimit'>): SponsoredGas
  userOpHash(args: { op: Op; chainId: number; entryPoint: Address }): Hex
}

const v06: OperationModel<UserOperationV06> = {
  schema: userOperationV06Schema,
  fromInput: (input: z.infer<typeof userOperationV06Schema>) => toUserOperationV06(input),
  missingField: (input: z.infer<typeof userOperationV06Schema>) => missingSignedField(input),
  requestedPaymasterGas: () => ({}),
  withPaymaster: (op, fields) => ({ ...op, paymasterAndData: concat([fields.paymaster, fields.paymasterData]) }),
  gas: (op) => ({ ...gasOf(op), paymasterVerificationGasLimit: 0n, paymasterPostOpGasLimit: 0n }),
  userOpHash: ({ op, chainId, entryPoint }) =>
    getUserOperationHash({
      userOperation: op as UserOperation<'0.6'>,
      chainId,
      entryPointAddress: entryPoint,
      entryPointVersion: '0.6',
    }),
}

function v07Model(version: '0.7' | '0.8'): OperationModel<UserOperationV07> {
  return {
    schema: version === '0.7' ? userOperationV07OnlySchema : userOperationV08Schema,
    fromInput: (input: z.infer<typeof userOperationV07Schema>) => toUserOperationV07(input),
    missingField: (input: z.infer<typeof userOperationV07Schema>) => missingSignedField(input),
    ...(version === '0.8' ? { signingRefusal: eip7702SigningRefusal } : {}),
    requestedPaymasterGas: (op) => ({
      verificationGasLimit: op.paymasterVerificationGasLimit,
      postOpGasLimit: op.paymasterPostOpGasLimit,
    }),
    withPaymaster: (op, fields) => ({ ...op, ...fields }),
    gas: (op, fields) => ({ ...gasOf(op), ...fields }),
    userOpHash: ({ op, chainId, entryPoint }) =>
      getUserOperationHash({
        userOperation: op as UserOperation<typeof version>,
        chainId,
        entryPointAddress: entryPoint,
        entryPointVersion: version,
      }),
  }
}

function gasOf(op: UserOperationV06 | UserOperationV07) {
  return {
    callGasLimit: op.callGasLimit,
    verificationGasLimit: op.verificationGasLimit,
    preVerificationGas: op.preVerificationGas,
    maxFeePerGas: op.maxFeePerGas,
    maxPriorityFeePerGas: op.maxPriorityFeePerGas,
  }
}

export const operationModels: Record<EntryPointVersion, OperationModel<UserOperationV06> | OperationModel<UserOperationV07>> = {
  '0.6': v06,
  '0.7': v07Model('0.7'),
  '0.8': v07Model('0.8'),
}
