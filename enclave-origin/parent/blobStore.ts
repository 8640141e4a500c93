import type { KeyState, SealedKeyRecord, WrappedDek } from '../types.js'

/**
 * Where the parent keeps what the enclave sealed. Nothing here is secret on
 * its own (keys are sealed under the DEK, the DEK is wrapped by KMS), but it
 * must not be lost: a key whose sealed record is gone cannot sign again.
 *
 * Writes resolve only once durable, so the parent may acknowledge a key to
 * its caller as soon as `put` resolves. A rejected write has an unknown
 * outcome: the record may or may not be there after a reopen.
 */
export interface BlobStore {
  /** Resolves only once the record is durable (fsynced); a crash after that never loses it. */
  put(record: SealedKeyRecord): Promise<void>
  get(keyId: string): Promise<SealedKeyRecord | undefined>
  /** Every stored record (latest version per key), for loading enclaves at start. */
  list(): AsyncIterable<SealedKeyRecord>
  /** Durable like `put`; rejects for a key that was never put. */
  setState(keyId: string, state: KeyState): Promise<void>
  /** Durable like `put`; a later call replaces the earlier DEK. */
  putWrappedDek(dek: WrappedDek): Promise<void>
  getWrappedDek(): Promise<WrappedDek | undefined>
  /** Waits for queued writes to become durable, then releases the store. */
  close(): Promise<void>
}
