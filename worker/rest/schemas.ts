import { z } from 'zod'
import { addressSchema, chainIdSchema } from '../sponsor/hexSchemas.js'
import { userOperationV06Schema, userOperationV07Schema } from '../sponsor/userOperation.js'

/**
 * REST bodies and answers. The request schema validates; the UserOperation
 * inside is validated by the sponsor domain once the entry point says which
 * version it is. The OpenAPI document shows the per-version schemas instead.
 */

export const sponsorRequestSchema = z.object({
  userOperation: z.record(z.string(), z.unknown(), { error: 'expected a UserOperation object' }),
  entryPoint: addressSchema,
  chainId: chainIdSchema,
  // null as ERC-7677's RPC takes it, so the same body works on both.
  context: z.record(z.string(), z.unknown()).nullish(),
})

export const sponsorRequestDocSchema = sponsorRequestSchema.extend({
  userOperation: z.union([userOperationV06Schema, userOperationV07Schema]),
})

const hex = z.string().regex(/^0x[0-9a-f]*$/i)
const paymasterFieldsDoc = {
  paymasterAndData: hex.optional().describe('EntryPoint v0.6 only'),
  paymaster: hex.optional().describe('EntryPoint v0.7 and v0.8'),
  paymasterData: hex.optional(),
  paymasterVerificationGasLimit: hex.optional(),
  paymasterPostOpGasLimit: hex.optional(),
}

export const sponsorResponseSchema = z.object({
  chainId: z.number(),
  entryPoint: hex,
  entryPointVersion: z.enum(['0.6', '0.7', '0.8']),
  ...paymasterFieldsDoc,
  userOpHash: hex,
  validUntil: z.number(),
  validAfter: z.number(),
  signer: hex,
})

export const processResponseSchema = z.union([
  z.object({
    decision: z.literal('sponsor'),
    chainId: z.number(),
    entryPoint: hex,
    entryPointVersion: z.enum(['0.6', '0.7', '0.8']),
    ...paymasterFieldsDoc,
    userOpHash: hex,
    paymasterHash: hex,
    maxCostWei: z.string(),
    validUntil: z.number(),
    validAfter: z.number(),
  }),
  z.object({ decision: z.literal('decline'), reason: z.string(), message: z.string(), data: z.record(z.string(), z.unknown()) }),
])

export const signerResponseSchema = z.object({
  signers: z.array(
    z.object({
      chainId: z.number(),
      name: z.string(),
      kind: z.string(),
      securityLevel: z.string(),
      address: hex.nullable().describe('null while the signer cannot sign'),
    }),
  ),
})

export const healthResponseSchema = z.object({
  status: z.enum(['ok', 'degraded', 'unavailable', 'misconfigured']),
  profile: z.string().optional(),
  error: z.string().optional(),
  signers: z
    .array(
      z.object({
        name: z.string(),
        kind: z.string(),
        securityLevel: z.string(),
        ok: z.boolean(),
        address: hex.optional(),
        error: z.string().optional(),
        members: z.array(z.record(z.string(), z.unknown())).optional().describe('a fallback: each member, its breaker state, address and last error'),
      }),
    )
    .optional(),
  chains: z.array(z.record(z.string(), z.unknown())).optional(),
})

export const errorResponseSchema = z.object({
  error: z.object({ code: z.string(), message: z.string(), data: z.record(z.string(), z.unknown()).optional() }),
})
