import { generateKeyPair, type KeyObject } from 'node:crypto'
import { promisify } from 'node:util'
import { DecryptCommand, GenerateDataKeyCommand, type KMSClient } from '@aws-sdk/client-kms'
import type { WrappedDek } from '../types.js'
import { openRecipientCiphertext } from './cms.js'

/**
 * Supplies the attestation document KMS needs to release a data key to this
 * enclave only (the Decrypt/GenerateDataKey `Recipient`). In a Nitro Enclave
 * it comes from the NSM device and binds `publicKey`, the enclave's ephemeral
 * RSA key; KMS then encrypts the answer to that key. Elsewhere there is none,
 * and the development provider says so rather than pretending.
 */
export interface AttestationProvider {
  readonly kind: 'nitro' | 'none'
  /** A document binding `publicKey` (DER SubjectPublicKeyInfo); undefined when this provider has no attestation. */
  attestationDocument(options: { publicKey: Uint8Array }): Promise<Uint8Array | undefined>
}

/** `arn:aws:kms:REGION:ACCOUNT:key/ID` (any partition): names one key in one account, unlike an alias or a bare id. */
export function isKmsKeyArn(keyId: string): boolean {
  return /^arn:aws[a-z-]*:kms:[a-z0-9-]+:\d{12}:key\/[A-Za-z0-9-]+$/.test(keyId)
}

export const developmentAttestation: AttestationProvider = {
  kind: 'none',
  attestationDocument: async () => undefined,
}

type Recipient = { field: { AttestationDocument: Uint8Array; KeyEncryptionAlgorithm: 'RSAES_OAEP_SHA_256' }; privateKey: KeyObject }

type RecipientKey = { privateKey: KeyObject; publicKey: Uint8Array }

async function newRecipientKey(): Promise<RecipientKey> {
  const { privateKey, publicKey } = await promisify(generateKeyPair)('rsa', { modulusLength: 2048 })
  return { privateKey, publicKey: publicKey.export({ type: 'spki', format: 'der' }) }
}

/**
 * The data-encryption key (DEK) that seals every private key: generated once
 * by KMS GenerateDataKey (the parent keeps only the wrapped form) and unwrapped
 * with Decrypt when the enclave unlocks. Never called on the signing path.
 *
 * With an attestation provider, every call carries a `Recipient`: KMS answers
 * with `CiphertextForRecipient`, which only this process's RSA key opens, and
 * the plaintext DEK never crosses the wire (nor the parent that proxies it).
 */
export class KmsDataKeys {
  private recipientKey: Promise<RecipientKey> | undefined

  constructor(
    private readonly options: {
      client: KMSClient
      kmsKeyId: string
      attestation: AttestationProvider
      /** Makes the RSA pair KMS encrypts to; default a new RSA-2048 pair (tests give one that fails once). */
      makeRecipientKey?: () => Promise<RecipientKey>
      /**
       * How long one call may take in all, its attempts included. The client's own limits bound each wait for
       * bytes, not the whole: an answer trickled a byte at a time (by a relay: the parent carries every KMS
       * connection) would hold an UNLOCK, and every UNLOCK queued behind it, for as long as it trickles.
       */
      callTimeoutMs?: number
    },
  ) {}

  /** `call`, given up after `callTimeoutMs` in all. */
  private async bounded<T>(operation: string, call: (options: { abortSignal?: AbortSignal }) => Promise<T>): Promise<T> {
    const { callTimeoutMs } = this.options
    const signal = callTimeoutMs === undefined ? undefined : AbortSignal.timeout(callTimeoutMs)
    try {
      return await call({ abortSignal: signal })
    } catch (error) {
      if (signal?.aborted) throw new Error(`KMS ${operation} took over ${callTimeoutMs} ms in all, and was given up`)
      throw error
    }
  }

  private async recipient(): Promise<Recipient | undefined> {
    if (this.options.attestation.kind === 'none') return undefined
    // One RSA-2048 pair per process, made off the event loop on first use; it never leaves memory.
    const made = (this.recipientKey ??= (this.options.makeRecipientKey ?? newRecipientKey)())
    // A failure is not kept: the next KMS call tries again rather than failing for the life of the process.
    made.catch(() => {
      if (this.recipientKey === made) this.recipientKey = undefined
    })
    const { privateKey, publicKey } = await made
    const document = await this.options.attestation.attestationDocument({ publicKey })
    if (!document) throw new Error('the attestation provider returned no document')
    return { field: { AttestationDocument: document, KeyEncryptionAlgorithm: 'RSAES_OAEP_SHA_256' }, privateKey }
  }

  /** The 32-byte DEK from an answer: opened from CiphertextForRecipient when attested, else the plaintext. */
  private dataKeyOf(operation: string, answer: { KeyId?: string; Plaintext?: Uint8Array; CiphertextForRecipient?: Uint8Array }, recipient: Recipient | undefined): Uint8Array {
    const { kmsKeyId } = this.options
    // A key ARN names the account too; an answer from any other key (the credentials' account, say) is not ours.
    if (isKmsKeyArn(kmsKeyId) && answer.KeyId !== kmsKeyId) {
      answer.Plaintext?.fill(0)
      throw new Error(`KMS ${operation} answered with key ${answer.KeyId ?? '(none)'}, not ${kmsKeyId}`)
    }
    let dek = answer.Plaintext
    if (recipient) {
      // KMS leaves Plaintext out of an attested answer; should one appear anyway, it is not trusted or kept.
      answer.Plaintext?.fill(0)
      if (!answer.CiphertextForRecipient) throw new Error(`KMS ${operation} returned no CiphertextForRecipient for an attested request`)
      dek = openRecipientCiphertext(answer.CiphertextForRecipient, recipient.privateKey)
    }
    if (!dek || dek.length !== 32) {
      dek?.fill(0)
      throw new Error(`KMS ${operation} returned no 32-byte data key`)
    }
    return dek
  }

  async generate(): Promise<{ dek: Uint8Array; wrapped: WrappedDek }> {
    const recipient = await this.recipient()
    const answer = await this.bounded('GenerateDataKey', (options) =>
      this.options.client.send(new GenerateDataKeyCommand({ KeyId: this.options.kmsKeyId, KeySpec: 'AES_256', ...(recipient && { Recipient: recipient.field }) }), options),
    )
    const dek = this.dataKeyOf('GenerateDataKey', answer, recipient)
    if (!answer.CiphertextBlob) {
      dek.fill(0)
      throw new Error('KMS GenerateDataKey returned no wrapped key')
    }
    return { dek, wrapped: { keyId: this.options.kmsKeyId, ciphertext: answer.CiphertextBlob } }
  }

  async unwrap(wrapped: WrappedDek): Promise<Uint8Array> {
    const recipient = await this.recipient()
    const answer = await this.bounded('Decrypt', (options) =>
      this.options.client.send(new DecryptCommand({ KeyId: wrapped.keyId, CiphertextBlob: wrapped.ciphertext, ...(recipient && { Recipient: recipient.field }) }), options),
    )
    return this.dataKeyOf('Decrypt', answer, recipient)
  }
}
