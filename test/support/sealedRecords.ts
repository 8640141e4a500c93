import type { BlobStore } from '../../enclave-origin/parent/blobStore.js'
import type { SealedKeyRecord } from '../../enclave-origin/types.js'

/** A valid, distinct record per (index, version) for the blob store tests; no real key inside. */
export function sealedRecord(index: number, version = 1): SealedKeyRecord {
  const publicKey = new Uint8Array(65).fill(index % 251)
  publicKey[0] = 4
  return { keyId: `key-${index}`, version, state: 'active', publicKey, sealed: new Uint8Array(60).fill((index + version) % 256) }
}

export async function listAll(store: BlobStore): Promise<SealedKeyRecord[]> {
  const records: SealedKeyRecord[] = []
  for await (const record of store.list()) records.push(record)
  return records
}
