import { createCipheriv, createDecipheriv, randomBytes } from 'node:crypto'

/**
 * Seals a private key under the DEK for the parent to store, and unseals it
 * again inside the enclave. AES-256-GCM with the key's id and version as
 * associated data, so a blob only opens as the key (and version) it was sealed
 * for: the parent cannot swap blobs between keys, nor pass one off as another
 * version. It can hand back an older version of a key's own record (the
 * enclave keeps no versions across restarts); a re-seal keeps the same secret,
 * so that is the same key, and a Worker checks each signature against the
 * address it was given at creation.
 *
 * Layout: iv (12) ‖ ciphertext (32) ‖ tag (16).
 */

const ivLength = 12
const tagLength = 16
const secretLength = 32
/** A sealed private key's length: what a LOAD must carry. */
export const sealedLength = ivLength + secretLength + tagLength
const maxVersion = 0xffff_ffff
const utf8 = new TextEncoder()

/** A blob did not open (wrong DEK, keyId or version, or altered bytes), or the inputs were malformed. */
export class SealingError extends Error {
  override name = 'SealingError'
}

export type SealPrivateKeyInput = { privateKey: Uint8Array; dek: Uint8Array; keyId: string; version: number }

export type UnsealPrivateKeyInput = { sealed: Uint8Array; dek: Uint8Array; keyId: string; version: number }

export function sealPrivateKey({ privateKey, dek, keyId, version }: SealPrivateKeyInput): Uint8Array {
  requireLength('private key', privateKey, secretLength)
  requireLength('DEK', dek, secretLength)
  const iv = randomBytes(ivLength)
  const cipher = createCipheriv('aes-256-gcm', dek, iv, { authTagLength: tagLength })
  cipher.setAAD(associatedData(keyId, version))
  const ciphertext = cipher.update(privateKey)
  const finalBlock = cipher.final()
  const sealed = new Uint8Array(sealedLength)
  sealed.set(iv, 0)
  sealed.set(ciphertext, ivLength)
  sealed.set(finalBlock, ivLength + ciphertext.length)
  sealed.set(cipher.getAuthTag(), ivLength + secretLength)
  return sealed
}

/** The 32-byte private key; the caller owns it and should `zero` it when done. */
export function unsealPrivateKey({ sealed, dek, keyId, version }: UnsealPrivateKeyInput): Uint8Array {
  requireLength('sealed key', sealed, sealedLength)
  requireLength('DEK', dek, secretLength)
  const aad = associatedData(keyId, version)
  const decipher = createDecipheriv('aes-256-gcm', dek, sealed.subarray(0, ivLength), { authTagLength: tagLength })
  decipher.setAAD(aad)
  decipher.setAuthTag(sealed.subarray(ivLength + secretLength))
  // GCM hands out plaintext before the tag is checked: it must not outlive a failed check.
  const opened = decipher.update(sealed.subarray(ivLength, ivLength + secretLength))
  try {
    decipher.final()
  } catch {
    zero(opened)
    throw new SealingError(`sealed key ${keyId} v${version} did not open: wrong DEK, key id or version, or altered bytes`)
  }
  // Copy out of Node's buffer (possibly a slice of a shared pool) into memory only the caller holds.
  const privateKey = secretBytes(secretLength)
  privateKey.set(opened)
  zero(opened)
  return privateKey
}

/**
 * Zeroed bytes for a secret, off the V8 heap. A typed array of 64 bytes or
 * fewer made on its own (`new Uint8Array(32)`) lives on the heap, where the
 * garbage collector moves it and a native call copies it out, each time
 * leaving a copy of the secret that `zero` cannot reach.
 */
export function secretBytes(length: number): Uint8Array {
  return new Uint8Array(new ArrayBuffer(length))
}

/** Overwrites a buffer that held secret bytes, so dropping it leaves nothing behind. */
export function zero(buffer: Uint8Array): void {
  buffer.fill(0)
}

/** UTF-8 keyId ‖ 0x00 ‖ u32 BE version. The fixed-width tail keeps the encoding unambiguous. */
function associatedData(keyId: string, version: number): Uint8Array {
  if (!Number.isInteger(version) || version < 0 || version > maxVersion) {
    throw new SealingError(`key version must be a u32, got ${version}`)
  }
  const id = utf8.encode(keyId)
  const aad = new Uint8Array(id.length + 5)
  aad.set(id, 0)
  new DataView(aad.buffer).setUint32(id.length + 1, version, false)
  return aad
}

function requireLength(what: string, bytes: Uint8Array, length: number): void {
  if (bytes.length !== length) throw new SealingError(`${what} must be ${length} bytes, got ${bytes.length}`)
}
