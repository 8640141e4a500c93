import { parsePrivateKey } from './privateKey.js'
import { KeyHoldingSigner, PrivateKeySigning } from './privateKeySigner.js'
import { SignerError, type SignerDescription } from './signer.js'

/** The shape of a Cloudflare Secrets Store binding (`[[secrets_store_secrets]]`). */
export type SecretsStoreSecret = { get(): Promise<string> }

export type SecretsStoreSignerOptions = {
  name: string
  bindingName: string
  binding: SecretsStoreSecret | undefined
  /** After a failed read, how long to answer with that failure before reading again. */
  retryAfterMs?: number
  now?: () => number
}

/**
 * A key held in Cloudflare Secrets Store. The secret is read once per isolate;
 * a failed read is remembered briefly (so a missing secret costs one read per
 * `retryAfterMs`, not one per request) and then tried again, so an operator
 * who fixes the secret does not have to redeploy.
 */
export class SecretsStoreSigner extends KeyHoldingSigner {
  private loaded: Promise<PrivateKeySigning> | undefined
  /** When the cached read failed; undefined while it has not. */
  private failedAt: number | undefined

  constructor(private readonly options: SecretsStoreSignerOptions) {
    super()
  }

  protected signing(): Promise<PrivateKeySigning> {
    const now = (this.options.now ?? Date.now)()
    if (this.failedAt !== undefined && now - this.failedAt >= (this.options.retryAfterMs ?? 30_000)) {
      this.loaded = undefined
      this.failedAt = undefined
    }
    this.loaded ??= this.read().catch((error: unknown) => {
      this.failedAt = now
      throw error
    })
    return this.loaded
  }

  private async read(): Promise<PrivateKeySigning> {
    const { binding, bindingName } = this.options
    if (!binding || typeof binding.get !== 'function') {
      throw new SignerError(`Secrets Store binding ${bindingName} is not bound to this Worker`)
    }
    let value: string
    try {
      value = await binding.get()
    } catch {
      throw new SignerError(`Secrets Store secret behind binding ${bindingName} could not be read (missing, or no access)`)
    }
    return new PrivateKeySigning(parsePrivateKey(value, `Secrets Store secret behind binding ${bindingName}`))
  }




  describe(): SignerDescription {
    return { kind: 'secrets-store', name: this.options.name, securityLevel: 'edge-secret' }
  }
}
