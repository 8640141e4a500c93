import { z } from 'zod'
import { getAddress, isAddress, type Address, type Hex } from 'viem'

/**
 * Zod primitives for the hex encodings JSON-RPC clients send. Each one names
 * what it expected so a validation error tells the caller what to fix.
 */

export const addressSchema = z
  .string()
  .refine((value) => isAddress(value, { strict: false }), {
    message: 'expected a 20-byte hex address (0x followed by 40 hex digits)',
  })
  .transform((value) => getAddress(value) as Address)

export const hexBytesSchema = z
  .string()
  .regex(/^0x([0-9a-fA-F]{2})*$/, {
    message: 'expected 0x-prefixed hex bytes with an even number of digits',
  })
  .transform((value) => value.toLowerCase() as Hex)

/** An unsigned integer no wider than `bits`, sent as a hex quantity ("0x1a"). */
export function quantitySchema(bits: number) {
  const max = (1n << BigInt(bits)) - 1n
  return z
    .string()
    .regex(/^0x[0-9a-fA-F]{1,64}$/, {
      message: 'expected a hex quantity such as "0x1a"',
    })
    .transform((value) => BigInt(value))
    .refine((value) => value <= max, { message: `exceeds uint${bits}` })
}

/** Chain ids arrive as hex quantities in JSON-RPC and as numbers in REST. */
export const chainIdSchema = z
  .union([z.number().int().positive().max(Number.MAX_SAFE_INTEGER), quantitySchema(53)])
  .transform((value) => Number(value))
  .refine((value) => value > 0, { message: 'chain id must be positive' })
