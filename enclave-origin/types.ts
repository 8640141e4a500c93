/**
 * The shapes the enclave origin's parts share. protocol/ encodes them on the
 * wire, enclave/ keeps and signs with keys, parent/ stores sealed blobs and
 * routes requests. Nothing here carries a plaintext key except `KeyMaterial`,
 * which never leaves the enclave process.
 */

/** Lifecycle of a key, set by operators: only active keys sign. */
export type KeyState = 'active' | 'frozen' | 'archived'

/** Where a key stands in the enclave's cache (see enclave/keyCache.ts). */
export type CacheState = 'WARM' | 'COOL' | 'INVALID'

/** What the parent stores durably for each key: no plaintext, only the sealed key. */
export type SealedKeyRecord = {
  keyId: string
  /** Bumped when the key is re-sealed; part of the AEAD associated data. */
  version: number
  state: KeyState
  /** 65-byte uncompressed secp256k1 public key. */
  publicKey: Uint8Array
  /** AES-256-GCM(iv ‖ ciphertext ‖ tag) of the 32-byte private key under the DEK, AAD = keyId ‖ version. */
  sealed: Uint8Array
}

/**
 * The data-encryption key as KMS wraps it (GenerateDataKey CiphertextBlob);
 * the parent stores it, only the enclave unwraps it. During a rotation also
 * `retiring`, the one it replaces, which still opens the records not yet
 * re-sealed.
 */
export type WrappedDek = { keyId: string; ciphertext: Uint8Array; retiring?: { keyId: string; ciphertext: Uint8Array } }

/** A signature as the engine returns it: 64-byte compact r ‖ s (low-s) and the recovery id. */
export type RawSignature = { signature: Uint8Array; recoveryId: number }
