/**
 * Operator tooling for the enclave's preload mode (see enclave/preload.ts):
 * make the age identity the unlock will deliver, and seal the share file for
 * its recipient. Runs on an operator's machine, never in the enclave; the
 * files it writes are interoperable with the `age` CLI.
 */
import { Encrypter, generateIdentity, identityToRecipient } from 'age-encryption'
import { parseShareEntries, PreloadedKeys } from './enclave/preload.js'
import { zero } from './enclave/sealing.js'

export type ShareFileEntry = { account_id: string; share: string }

/** A fresh X25519 age identity (`AGE-SECRET-KEY-1…`, secret) and its recipient (`age1…`, public). */
export async function generatePreloadIdentity(): Promise<{ identity: string; recipient: string }> {
  const identity = await generateIdentity()
  return { identity, recipient: await identityToRecipient(identity) }
}

/**
 * Age-encrypts `[{account_id, share}]` for `recipient`. The entries are checked
 * first with the enclave's own rules, so a file the enclave would refuse at
 * start is refused here, naming the entry (throws `PreloadError`).
 */
export async function sealShareFile(options: { entries: ShareFileEntry[]; recipient: string }): Promise<Uint8Array> {
  new PreloadedKeys(parseShareEntries(options.entries)).clear()
  const encrypter = new Encrypter()
  try {
    encrypter.addRecipient(options.recipient)
  } catch {
    throw new Error('the recipient is not an age recipient (expected age1…)')
  }
  // Only the two known fields: nothing else an entry carries ends up in the file.
  const json = JSON.stringify(options.entries.map(({ account_id, share }) => ({ account_id, share })))
  const plaintext = new TextEncoder().encode(json)
  try {
    return await encrypter.encrypt(plaintext)
  } finally {
    zero(plaintext)
  }
}
