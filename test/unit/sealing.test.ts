import { randomBytes } from 'node:crypto'
import { describe, expect, it } from 'vitest'
import { SealingError, sealedLength, sealPrivateKey, unsealPrivateKey, zero } from '../../enclave-origin/enclave/sealing.js'

const privateKey = new Uint8Array(randomBytes(32))
const dek = new Uint8Array(randomBytes(32))
const keyId = 'paymaster-key-1'
const version = 3
const sealed = sealPrivateKey({ privateKey, dek, keyId, version })

describe('sealPrivateKey / unsealPrivateKey', () => {
  it('opens what it sealed, given the same DEK, key id and version', () => {
    expect(unsealPrivateKey({ sealed, dek, keyId, version })).toEqual(privateKey)
  })

  it('lays the blob out as iv (12) ‖ ciphertext (32) ‖ tag (16), the key nowhere in clear', () => {
    expect(sealed.length).toBe(60)
    expect(sealedLength).toBe(sealed.length) // what a LOAD must carry
    expect(Buffer.from(sealed).includes(Buffer.from(privateKey))).toBe(false)
  })

  it('uses a fresh IV each time, so sealing one key twice gives different blobs that both open', () => {
    const again = sealPrivateKey({ privateKey, dek, keyId, version })
    expect(again.subarray(0, 12)).not.toEqual(sealed.subarray(0, 12))
    expect(unsealPrivateKey({ sealed: again, dek, keyId, version })).toEqual(privateKey)
  })

  it('rejects the wrong DEK', () => {
    const otherDek = new Uint8Array(randomBytes(32))
    expect(() => unsealPrivateKey({ sealed, dek: otherDek, keyId, version })).toThrow(SealingError)
  })

  it('rejects a blob presented as another key (the key id is authenticated)', () => {
    expect(() => unsealPrivateKey({ sealed, dek, keyId: 'paymaster-key-2', version })).toThrow(SealingError)
  })

  it('rejects a blob presented at another version (no rollback to an older seal)', () => {
    expect(() => unsealPrivateKey({ sealed, dek, keyId, version: version - 1 })).toThrow(SealingError)
    expect(() => unsealPrivateKey({ sealed, dek, keyId, version: version + 1 })).toThrow(SealingError)
  })

  it.each([
    ['the IV', 0],
    ['the ciphertext', 20],
    ['the tag', 59],
  ])('rejects a blob with a flipped bit in %s', (_, index) => {
    const tampered = new Uint8Array(sealed)
    tampered[index]! ^= 0x01
    expect(() => unsealPrivateKey({ sealed: tampered, dek, keyId, version })).toThrow(SealingError)
  })

  it('rejects a truncated blob and a DEK of the wrong size', () => {
    expect(() => unsealPrivateKey({ sealed: sealed.subarray(0, 59), dek, keyId, version })).toThrow(SealingError)
    expect(() => unsealPrivateKey({ sealed, dek: dek.subarray(0, 16), keyId, version })).toThrow(SealingError)
    expect(() => sealPrivateKey({ privateKey: privateKey.subarray(0, 31), dek, keyId, version })).toThrow(SealingError)
  })

  it('keeps the key id and version apart in the associated data ("key1" v23 does not open as "key12" v3)', () => {
    const blob = sealPrivateKey({ privateKey, dek, keyId: 'key1', version: 23 })
    expect(() => unsealPrivateKey({ sealed: blob, dek, keyId: 'key12', version: 3 })).toThrow(SealingError)
  })
})

describe('zero', () => {
  it('overwrites every byte', () => {
    const secret = new Uint8Array(randomBytes(32))
    zero(secret)
    expect(secret).toEqual(new Uint8Array(32))
  })
})
