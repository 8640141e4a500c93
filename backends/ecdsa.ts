import { bytesToHex, concat, hexToBigInt, hexToNumber, numberToHex, recoverAddress, size, slice, type Address, type Hex } from 'viem'
import { publicKeyToAddress } from 'viem/accounts'
import { SignerError } from './signer.js'

/**
 * ECDSA plumbing for backends whose service signs in its own format (KMS
 * answers DER; public keys come as SPKI DER): parse, normalise to low-s, and
 * find the Ethereum recovery id against the key we know.
 */

export const secp256k1Order = 0xfffffffffffffffffffffffffffffffebaaedce6af48a03bbfd25e8cd0364141n
const halfOrder = secp256k1Order >> 1n

/**
 * DER ECDSA-Sig-Value: SEQUENCE { r INTEGER, s INTEGER }. Integers are minimal, so shorter than 32 bytes when their
 * top bytes are zero and 33 bytes with a 0x00 sign byte when their top bit is set. Anything BER allows but DER does
 * not (a longer length form, a padded integer) is refused, as it is in SPKI keys: KMS and OpenSSL write DER, and a
 * signer sending other bytes is one to fix, not to guess at.
 */
export function parseDerSignature(der: Uint8Array): { r: bigint; s: bigint } {
  const reader = new DerReader(der)
  const sequence = reader.element(0x30)
  if (!reader.done()) throw new SignerError('DER signature has trailing bytes')
  const inner = new DerReader(sequence)
  const r = inner.integer()
  const s = inner.integer()
  if (!inner.done()) throw new SignerError('DER signature sequence has trailing bytes')
  if (r <= 0n || r >= secp256k1Order || s <= 0n || s >= secp256k1Order) throw new SignerError('DER signature values are out of range')
  return { r, s }
}

/**
 * Hex r ‖ s, or r ‖ s ‖ v. A v of 0/1 or 27/28 becomes a recovery id hint; any other v is ignored,
 * since toEthereumSignature finds v by recovery anyway.
 */
export function parseCompactSignature(hex: Hex): { r: bigint; s: bigint; recoveryIdHint?: number } {
  // An odd digit count would pass as a whole number of bytes (viem's size rounds up) and shift s.
  if (!/^0x(?:[0-9a-fA-F]{2})+$/.test(hex)) throw new SignerError('compact signature is not whole bytes of hex')
  const length = size(hex)
  if (length !== 64 && length !== 65) throw new SignerError('compact signature is not 64 or 65 bytes')
  const r = hexToBigInt(slice(hex, 0, 32))
  const s = hexToBigInt(slice(hex, 32, 64))
  if (r <= 0n || r >= secp256k1Order || s <= 0n || s >= secp256k1Order) throw new SignerError('compact signature values are out of range')
  if (length === 64) return { r, s }
  const v = hexToNumber(slice(hex, 64, 65))
  const recoveryIdHint = v >= 27 ? v - 27 : v
  return recoveryIdHint === 0 || recoveryIdHint === 1 ? { r, s, recoveryIdHint } : { r, s }
}

/** OID 1.3.132.0.10 (secp256k1) as DER content bytes. */
const secp256k1Oid = '2b8104000a'

/** The uncompressed public key (0x04 ‖ x ‖ y) inside an SPKI DER document, which must be for secp256k1. */
function publicKeyFromSpki(spki: Uint8Array): Hex {
  const outer = new DerReader(new DerReader(spki).element(0x30))
  const algorithm = new DerReader(outer.element(0x30))
  algorithm.element(0x06) // id-ecPublicKey
  const curve = bytesToHex(algorithm.element(0x06)).slice(2)
  if (curve !== secp256k1Oid) throw new SignerError('the key is not on secp256k1 (expected key spec ECC_SECG_P256K1)')
  const bits = outer.element(0x03)
  if (bits.length !== 66 || bits[0] !== 0 || bits[1] !== 0x04) throw new SignerError('SPKI public key is not an uncompressed secp256k1 point')
  return bytesToHex(bits.subarray(1))
}

export function addressFromSpki(spki: Uint8Array): Address {
  return publicKeyToAddress(publicKeyFromSpki(spki))
}

/**
 * r and s as a 65-byte Ethereum signature: s folded to the lower half of the
 * order (as Ethereum requires), v (27 or 28) chosen by recovering against the
 * address the key is known to have. A signature that recovers to neither is
 * from another key, and refused.
 */
export async function toEthereumSignature(options: {
  r: bigint
  s: bigint
  digest: Hex
  address: Address
  /** The recovery id the signer reported for (r, s), tried first: one recovery instead of up to two. */
  recoveryIdHint?: number
}): Promise<Hex> {
  const folded = options.s > halfOrder
  const s = folded ? secp256k1Order - options.s : options.s
  const rs = concat([numberToHex(options.r, { size: 32 }), numberToHex(s, { size: 32 })])
  // Folding s to the lower half flips the recovery id.
  const first = 27 + (((options.recoveryIdHint ?? 0) & 1) ^ (folded ? 1 : 0))
  for (const v of [first, first === 27 ? 28 : 27]) {
    const signature = concat([rs, numberToHex(v, { size: 1 })])
    // An r that is no point's x recovers nothing: noble throws, and that is a signature from no key at all.
    const recovered = await recoverAddress({ hash: options.digest, signature }).catch(() => undefined)
    if (recovered === options.address) return signature
  }
  throw new SignerError(`the signature does not recover to the key's address ${options.address}`)
}

class DerReader {
  private offset = 0
  constructor(private readonly bytes: Uint8Array) {}

  done(): boolean {
    return this.offset === this.bytes.length
  }

  element(tag: number): Uint8Array {
    if (this.bytes[this.offset] !== tag) throw new SignerError(`malformed DER: expected tag 0x${tag.toString(16)}`)
    let length = this.bytes[this.offset + 1]
    let start = this.offset + 2
    if (length === undefined) throw new SignerError('malformed DER: truncated')
    if (length & 0x80) {
      const lengthBytes = length & 0x7f
      if (lengthBytes === 0 || lengthBytes > 2) throw new SignerError('malformed DER: bad length')
      if (start + lengthBytes > this.bytes.length) throw new SignerError('malformed DER: truncated')
      length = 0
      for (let i = 0; i < lengthBytes; i++) length = (length << 8) | this.bytes[start + i]!
      start += lengthBytes
      // DER's one encoding: the long form only past 127, in as few bytes as the length needs.
      if (length < 0x80 || length < 1 << (8 * (lengthBytes - 1))) throw new SignerError('malformed DER: length not in its shortest form')
    }
    const end = start + length
    if (end > this.bytes.length) throw new SignerError('malformed DER: truncated')
    this.offset = end
    return this.bytes.subarray(start, end)
  }

  integer(): bigint {
    const content = this.element(0x02)
    if (content.length === 0 || content.length > 33 || (content[0]! & 0x80) !== 0) throw new SignerError('malformed DER integer')
    // A leading 0x00 is there only to keep a set top bit from reading as a sign.
    if (content[0] === 0 && content.length > 1 && (content[1]! & 0x80) === 0) throw new SignerError('malformed DER integer: not in its shortest form')
    return BigInt(bytesToHex(content))
  }
}
