import type { Hex } from 'viem'
import { secp256k1Order } from './ecdsa.js'
import { SignerError } from './signer.js'

/**
 * Parses a secp256k1 private key as operators store it (64 hex digits, with or
 * without 0x, surrounding white space ignored). The error names where the
 * key came from and never echoes its value.
 */
export function parsePrivateKey(value: string, source: string): Hex {
  const trimmed = value.trim()
  const digits = trimmed.startsWith('0x') || trimmed.startsWith('0X') ? trimmed.slice(2) : trimmed
  if (!/^[0-9a-fA-F]{64}$/.test(digits)) {
    throw new SignerError(`${source} is not a 32-byte hex private key`)
  }
  const scalar = BigInt(`0x${digits}`)
  if (scalar === 0n || scalar >= secp256k1Order) {
    throw new SignerError(`${source} is outside the secp256k1 key range`)
  }
  return `0x${digits.toLowerCase()}`
}
