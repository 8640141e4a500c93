/**
 * Operator tooling for the enclave's preload mode (see enclave/preload.ts):
 * make the age identity the unlock will deliver, seal the share file for its
 * recipient, and seal the identity itself to each enclave it goes to. Runs on
 * an operator's machine, never in the enclave; the files it writes are
 * interoperable with the `age` CLI.
 */
import type { X509Certificate } from 'node:crypto'
import { Encrypter, generateIdentity, identityToRecipient } from 'age-encryption'
import { AttestationDocumentError, verifyAttestationDocument } from './attestationDocument.js'
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

/** What the parent's GET /v1/attestation reports of one enclave. */
export type EnclaveAttestation = { id: string; recipient: string; attestationDocument: Uint8Array | undefined }

/**
 * How to trust an enclave's delivery recipient: its attestation document must
 * chain to one of `roots` (the AWS Nitro root), be of the enclave image
 * `pcr0` and bind that recipient. The image is required: any enclave on the
 * parent's host, the parent's own among them, has documents that chain to
 * the root. `unattested` takes the recipient as the parent reports it, which a
 * parent could have swapped for its own: for development enclaves only.
 */
export type RecipientTrust = { roots: readonly X509Certificate[]; pcr0: Uint8Array } | 'unattested'

/**
 * The preload identity age-encrypted to each enclave's delivery recipient
 * (what POST /v1/unlock takes), once each recipient is trusted as `trust`
 * says. Throws naming the enclave and what failed; seals nothing then.
 */
export async function sealPreloadIdentity(options: { identity: string; enclaves: readonly EnclaveAttestation[]; trust: RecipientTrust }): Promise<Map<string, Uint8Array>> {
  for (const enclave of options.enclaves) checkRecipient(enclave, options.trust)
  const sealed = new Map<string, Uint8Array>()
  for (const enclave of options.enclaves) {
    const encrypter = new Encrypter()
    encrypter.addRecipient(enclave.recipient)
    sealed.set(enclave.id, await encrypter.encrypt(options.identity))
  }
  return sealed
}

function checkRecipient(enclave: EnclaveAttestation, trust: RecipientTrust): void {
  const refuse = (why: string) => new Error(`enclave ${enclave.id}: ${why}`)
  if (!/^age1[02-9ac-hj-np-z]{58}$/.test(enclave.recipient)) throw refuse('its delivery recipient is not an X25519 age recipient')
  if (trust === 'unattested') {
    // An attested enclave is a production one: a development command from a runbook must not seal to whatever recipient
    // the parent reports for it, unchecked.
    if (enclave.attestationDocument && enclave.attestationDocument.length > 0) throw refuse('it presents an attestation document: check it with --nitro-root-file and --pcr0, not --allow-unattested')
    return
  }
  if (!enclave.attestationDocument) throw refuse('no attestation document (a development enclave?); only an unattested unlock can seal to it')
  let attested
  try {
    attested = verifyAttestationDocument(enclave.attestationDocument, { roots: trust.roots })
  } catch (error) {
    throw error instanceof AttestationDocumentError ? refuse(`the attestation document is not valid: ${error.message}`) : error
  }
  if (!attested.publicKey || Buffer.compare(Buffer.from(attested.publicKey), Buffer.from(enclave.recipient)) !== 0) {
    throw refuse('the attestation document binds another recipient than the one reported')
  }
  const pcr0 = attested.pcrs.get(0)
  // A debug-mode enclave reports zeroed PCRs, whatever it runs, and its memory can be read from outside.
  if (!pcr0 || pcr0.every((byte) => byte === 0)) throw refuse('the attestation document has no PCR0 (a debug-mode enclave?)')
  if (!Buffer.from(pcr0).equals(Buffer.from(trust.pcr0))) throw refuse('the attestation document is of another enclave image (PCR0)')
}
