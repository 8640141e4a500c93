import { DecryptCommand, GenerateDataKeyCommand, type KMSClient } from '@aws-sdk/client-kms'
import type { WrappedDek } from '../types.js'

/**
 * Supplies the attestation document KMS needs to release a data key to this
 * enclave only (the Decrypt/GenerateDataKey `Recipient`). In a Nitro Enclave
 * it comes from the NSM device; elsewhere there is none, and the development
 * provider says so rather than pretending.
 */
export interface AttestationProvider {
  readonly kind: 'nitro' | 'none'
  attestationDocument(): Promise<Uint8Array | undefined>
}

export const developmentAttestation: AttestationProvider = {
  kind: 'none',
  attestationDocument: async () => undefined,
}

/**
 * The data-encryption key (DEK) that seals every private key: generated once
 * by KMS GenerateDataKey (the parent keeps only the wrapped form) and unwrapped
 * with Decrypt when the enclave unlocks. Never called on the signing path.
 */
export class KmsDataKeys {
  constructor(private readonly options: { client: KMSClient; kmsKeyId: string; attestation: AttestationProvider }) {}

  private async recipient() {
    const document = await this.options.attestation.attestationDocument()
    return document ? { Recipient: { AttestationDocument: document, KeyEncryptionAlgorithm: 'RSAES_OAEP_SHA_256' as const } } : {}
  }

  async generate(): Promise<{ dek: Uint8Array; wrapped: WrappedDek }> {
    const answer = await this.options.client.send(
      new GenerateDataKeyCommand({ KeyId: this.options.kmsKeyId, KeySpec: 'AES_256', ...(await this.recipient()) }),
    )
    if (!answer.Plaintext || !answer.CiphertextBlob) throw new Error('KMS GenerateDataKey returned no key')
    return { dek: answer.Plaintext, wrapped: { keyId: this.options.kmsKeyId, ciphertext: answer.CiphertextBlob } }
  }

  async unwrap(wrapped: WrappedDek): Promise<Uint8Array> {
    const answer = await this.options.client.send(
      new DecryptCommand({ KeyId: wrapped.keyId, CiphertextBlob: wrapped.ciphertext, ...(await this.recipient()) }),
    )
    if (!answer.Plaintext || answer.Plaintext.length !== 32) throw new Error('KMS Decrypt returned no 32-byte data key')
    return answer.Plaintext
  }
}
