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
  /**
   * Resolves only once the record is durable (fsynced); a crash after that
   * never loses it. A put of a stored key must carry the state it has
   * (states change with `setState`): a put with another serves while the
   * store runs, but the disk store, reopened before its next compaction,
   * keeps the more restrictive of it and the last `setState`. A put over an archived key stores it archived.
   */
  put(record: SealedKeyRecord): Promise<void>
  get(keyId: string): Promise<SealedKeyRecord | undefined>
  /** Every stored record (latest version per key), for loading enclaves at start. */
  list(): AsyncIterable<SealedKeyRecord>
  /** Durable like `put`; rejects for a key that was never put, and (KeyArchivedError) for an archived one's other states. */
  setState(keyId: string, state: KeyState): Promise<void>
  /**
   * Durable like `put`: replaces the stored DEK (and its `retiring` one, if any), but only if the store holds
   * `replacing` (undefined: none), the one the caller read and decided on; otherwise rejects with
   * WrappedDekChangedError and writes nothing. A DEK written meanwhile (a rotation's step that was given up on and
   * landed after all, say) may have sealed keys, and must not be lost to a write that never saw it.
   */
  putWrappedDek(dek: WrappedDek, replacing: WrappedDek | undefined): Promise<void>
  getWrappedDek(): Promise<WrappedDek | undefined>
  /** Waits for queued writes to become durable, then releases the store. */
  close(): Promise<void>
  /** Why the store takes no more writes until it is reopened, if that is so (a store without such a state leaves this out). */
  writeFailure?(): string | undefined
}


// ---------------------------------------------------------------- rules every store keeps

/** Position is the disk log's code for a state: append new states, never reorder. */
export const keyStates: readonly KeyState[] = ['active', 'frozen', 'archived']

/** The stored wrapped DEK is not the one a `putWrappedDek` was based on. */
export class WrappedDekChangedError extends Error {
  constructor() {
    super('the stored wrapped data key changed since it was read (a write given up on that landed after all?); nothing was written: read it again and start over')
  }
}

/** Whether two wrapped DEKs are the same (both undefined: none). */
export function sameWrappedDek(a: WrappedDek | undefined, b: WrappedDek | undefined): boolean {
  return a === undefined || b === undefined ? a === b : a.keyId === b.keyId && Buffer.from(a.ciphertext).equals(b.ciphertext) && sameWrappedDek(a.retiring, b.retiring)
}

/** Throws WrappedDekChangedError unless `stored` is the DEK `expected` names (undefined: none). */
export function assertWrappedDekIs(stored: WrappedDek | undefined, expected: WrappedDek | undefined): void {
  if (!sameWrappedDek(stored, expected)) throw new WrappedDekChangedError()
}

/** Archiving is final: a state change of an archived key to any other state. */
export class KeyArchivedError extends Error {
  constructor(keyId: string) {
    super(`key ${keyId} is archived, which is final: its state cannot change`)
  }
}

/**
 * The state a put stores over a key stored in `stored`: an archived key stays archived. A put made from a read taken
 * before the archiving landed (a re-seal during a rotation, say) would otherwise bring it back to signing.
 */
export function stateToStore(incoming: KeyState, stored: KeyState | undefined): KeyState {
  return stored === 'archived' ? 'archived' : incoming
}

export function assertStateMayChange(keyId: string, stored: KeyState, next: KeyState): void {
  if (stored === 'archived' && next !== 'archived') throw new KeyArchivedError(keyId)
}

/** A state change or lookup for a key that was never put. */
export class KeyNotStoredError extends Error {
  constructor(keyId: string) {
    super(`key ${keyId} is not stored`)
  }
}

export function validateKeyId(keyId: string): void {
  if (typeof keyId !== 'string' || keyId.length === 0) throw new TypeError('keyId must be a non-empty string')
  // Stored as UTF-8: a lone surrogate would come back as U+FFFD, another key's id perhaps.
  if (/\p{Cs}/u.test(keyId)) throw new TypeError('keyId must be well-formed Unicode (it holds a lone surrogate)')
  // The disk log's limit; every store keeps it, so records move between stores unchanged.
  if (Buffer.byteLength(keyId, 'utf8') > 0xffff) throw new RangeError('keyId is longer than 65535 bytes')
}

export function isValidVersion(version: number): boolean {
  return Number.isInteger(version) && version >= 0 && version <= 0xffffffff
}

export function validateState(state: KeyState): void {
  if (!keyStates.includes(state)) throw new TypeError(`unknown key state ${String(state)}`)
}

export function validateRecord(record: SealedKeyRecord): void {
  validateKeyId(record.keyId)
  if (!isValidVersion(record.version)) throw new RangeError(`key ${record.keyId}: version must be an integer in [0, 2^32)`)
  validateState(record.state)
  if (!(record.publicKey instanceof Uint8Array) || !(record.sealed instanceof Uint8Array)) {
    throw new TypeError(`key ${record.keyId}: publicKey and sealed must be Uint8Arrays`)
  }
}

/** A record may replace a stored one of the same or an older version, never a newer one. */
export function assertNotOlder(record: SealedKeyRecord, storedVersion: number | undefined): void {
  if (storedVersion !== undefined && record.version < storedVersion) {
    throw new Error(`key ${record.keyId}: version ${record.version} is older than the stored version ${storedVersion}`)
  }
}

export function validateDek(dek: WrappedDek): void {
  for (const each of dek.retiring ? [dek, dek.retiring] : [dek]) {
    validateKeyId(each.keyId)
    if (!(each.ciphertext instanceof Uint8Array)) throw new TypeError('ciphertext must be a Uint8Array')
  }
}

/** Callers get and give copies, so mutating a record never changes what the store holds. */
export function copyRecord(record: SealedKeyRecord): SealedKeyRecord {
  return {
    keyId: record.keyId,
    version: record.version,
    state: record.state,
    publicKey: new Uint8Array(record.publicKey),
    sealed: new Uint8Array(record.sealed),
  }
}

export function copyDek(dek: WrappedDek): WrappedDek {
  const copy: WrappedDek = { keyId: dek.keyId, ciphertext: new Uint8Array(dek.ciphertext) }
  if (dek.retiring) copy.retiring = { keyId: dek.retiring.keyId, ciphertext: new Uint8Array(dek.retiring.ciphertext) }
  return copy
}
