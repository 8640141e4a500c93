import { describe, expect, it } from 'vitest'
import { secp256k1 } from '@noble/curves/secp256k1'
import { bytesToHex, concat, hexToBytes, keccak256, numberToHex, size, toHex, type Hex } from 'viem'
import { generatePrivateKey, privateKeyToAddress, sign } from 'viem/accounts'
import { addressFromSpki, parseDerSignature, secp256k1Order, toEthereumSignature } from '../../backends/ecdsa.js'
import { SignerError } from '../../backends/signer.js'

/** DER ECDSA signatures the way KMS sends them, for digests chosen to hit each edge case. */

const privateKey = generatePrivateKey()
const address = privateKeyToAddress(privateKey)

function kmsStyle(digest: Hex, options: { highS?: boolean } = {}) {
  const signature = secp256k1.sign(hexToBytes(digest), hexToBytes(privateKey), { lowS: true })
  const s = options.highS ? secp256k1Order - signature.s : signature.s
  return { der: new secp256k1.Signature(signature.r, s).toDERRawBytes(), recovery: signature.recovery, r: signature.r, s }
}

/** The first digest whose signature satisfies `wanted`. */
function digestWhere(wanted: (signature: ReturnType<typeof kmsStyle>) => boolean): Hex {
  for (let i = 0; i < 100_000; i++) {
    const digest = keccak256(toHex(`edge case ${i}`))
    if (wanted(kmsStyle(digest))) return digest
  }
  throw new Error('no digest found')
}

async function canonical(digest: Hex): Promise<Hex> {
  return sign({ hash: digest, privateKey, to: 'hex' })
}

describe('DER signatures from KMS become canonical Ethereum signatures', () => {
  it('r with a leading zero byte (a DER integer shorter than 32 bytes)', async () => {
    const digest = digestWhere((s) => s.r < 1n << 248n)
    const { der } = kmsStyle(digest)
    const { r, s } = parseDerSignature(der)
    expect(await toEthereumSignature({ r, s, digest, address })).toBe(await canonical(digest))
  })

  it('s with a leading zero byte', async () => {
    const digest = digestWhere((s) => s.s < 1n << 248n)
    const { r, s } = parseDerSignature(kmsStyle(digest).der)
    expect(await toEthereumSignature({ r, s, digest, address })).toBe(await canonical(digest))
  })

  it('r with its top bit set (a DER integer with a 0x00 sign byte, 33 bytes)', async () => {
    const digest = digestWhere((s) => s.r >= 1n << 255n)
    const { der } = kmsStyle(digest)
    expect(der[3]).toBe(33)
    const { r, s } = parseDerSignature(der)
    expect(await toEthereumSignature({ r, s, digest, address })).toBe(await canonical(digest))
  })

  it('a high s is folded to low s, with v flipped accordingly', async () => {
    const digest = keccak256(toHex('high s'))
    const { der } = kmsStyle(digest, { highS: true })
    const { r, s } = parseDerSignature(der)
    expect(s > secp256k1Order / 2n).toBe(true)
    const signature = await toEthereumSignature({ r, s, digest, address })
    expect(signature).toBe(await canonical(digest))
    expect(BigInt(`0x${signature.slice(66, 130)}`) <= secp256k1Order / 2n).toBe(true)
  })

  it('finds v = 28 when the recovery id is 1, and v = 27 when it is 0', async () => {
    for (const recovery of [0, 1]) {
      const digest = digestWhere((s) => s.recovery === recovery)
      const { r, s } = parseDerSignature(kmsStyle(digest).der)
      const signature = await toEthereumSignature({ r, s, digest, address })
      expect(signature.slice(-2)).toBe(recovery === 1 ? '1c' : '1b')
    }
  })

  it('a recovery id hint, right or wrong, still gives the canonical signature (high s included)', async () => {
    for (const highS of [false, true]) {
      const digest = keccak256(toHex(`hint ${highS}`))
      const { der, recovery } = kmsStyle(digest, { highS })
      const { r, s } = parseDerSignature(der)
      for (const recoveryIdHint of [recovery, 1 - recovery]) {
        expect(await toEthereumSignature({ r, s, digest, address, recoveryIdHint })).toBe(await canonical(digest))
      }
    }
  })

  it('refuses a signature from another key', async () => {
    const digest = keccak256(toHex('wrong key'))
    const { r, s } = parseDerSignature(kmsStyle(digest).der)
    await expect(toEthereumSignature({ r, s, digest, address: privateKeyToAddress(generatePrivateKey()) })).rejects.toThrow(
      'does not recover',
    )
  })

  it('refuses, as a SignerError, an r that is no point on the curve (from a key server gone wrong)', async () => {
    const digest = keccak256(toHex('no point'))
    // x = 5 is on no point of secp256k1 (5^3 + 7 = 132 has no square root mod p); noble throws on it.
    await expect(toEthereumSignature({ r: 5n, s: 1n, digest, address })).rejects.toThrow(SignerError)
    await expect(toEthereumSignature({ r: 5n, s: 1n, digest, address })).rejects.toThrow('does not recover')
  })

  it('rejects malformed DER with a SignerError', () => {
    const { der } = kmsStyle(keccak256(toHex('malformed')))
    for (const bad of [der.subarray(0, der.length - 1), concat([der, '0x00']), new Uint8Array([0x31, ...der.subarray(1)]), new Uint8Array([0x30, 0x00])]) {
      expect(() => parseDerSignature(typeof bad === 'string' ? hexToBytes(bad) : bad)).toThrow(SignerError)
    }
  })

  it('refuses encodings BER allows and DER does not, naming which', () => {
    // r and s of 32 bytes with the top bit clear: DER has them as they are, with neither sign byte nor shortening.
    const full = (value: bigint) => value >= 1n << 248n && value < 1n << 255n
    const { der, r, s } = kmsStyle(digestWhere((signature) => full(signature.r) && full(signature.s)))
    const integer = (value: bigint, pad = 0) => {
      const digits = value.toString(16)
      const bytes = concat([...Array<Hex>(pad).fill('0x00'), `0x${digits.length % 2 ? '0' : ''}${digits}`])
      return concat(['0x02', numberToHex(size(bytes), { size: 1 }), bytes])
    }
    const body = (rPad = 0, sPad = 0) => concat([integer(r, rPad), integer(s, sPad)])
    // The unpadded hand encoding is the library's own, so each variant below differs from valid DER in one way only.
    expect(concat(['0x30', numberToHex(size(body()), { size: 1 }), body()])).toBe(bytesToHex(der))
    for (const padded of [body(1), body(0, 1)]) {
      expect(() => parseDerSignature(hexToBytes(concat(['0x30', numberToHex(size(padded), { size: 1 }), padded])))).toThrow(
        'malformed DER integer: not in its shortest form',
      )
    }
    for (const longLength of [concat(['0x3081', numberToHex(size(body()), { size: 1 })]), concat(['0x3082', numberToHex(size(body()), { size: 2 })])]) {
      expect(() => parseDerSignature(hexToBytes(concat([longLength, body()])))).toThrow('malformed DER: length not in its shortest form')
    }
    // A long-form length whose own bytes are cut off.
    expect(() => parseDerSignature(hexToBytes('0x308201'))).toThrow('malformed DER: truncated')
  })
})

describe('SPKI public keys', () => {
  const point = secp256k1.getPublicKey(hexToBytes(privateKey), false)
  const spki = (curveOid: Hex) =>
    hexToBytes(concat(['0x3056301006072a8648ce3d0201', '0x0605', curveOid, '0x034200', bytesToHex(point)]))

  it('gives the address of a secp256k1 key', () => {
    expect(addressFromSpki(spki('0x2b8104000a'))).toBe(address)
  })

  it('refuses a key on another curve', () => {
    expect(() => addressFromSpki(spki(numberToHex(0x2b8104000bn, { size: 5 })))).toThrow('not on secp256k1')
  })
})
