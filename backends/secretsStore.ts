import { parsePrivateKey } from './privateKey.js'
import { KeyHoldingSigner, PrivateKeySigning } from './privateKeySigner.js'
import { SharedLoad } from './sharedLoad.js'
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
  /** The key, read once; a read is shared by the calls made while it runs (and abandoned if it never settles). */
  private readonly loaded: SharedLoad<PrivateKeySigning>
  /** The last read's failure and when it came, answered until `retryAfterMs` has passed. */
  private failed: { error: unknown; at: number } | undefined

  constructor(private readonly options: SecretsStoreSignerOptions) {
    super()
    this.loaded = new SharedLoad({ load: () => this.read(), abandonAfterMs: 5_000, keepMs: Infinity, what: `Secrets Store binding ${options.bindingName}`, now: options.now })
  }

  protected signing(signal?: AbortSignal): Promise<PrivateKeySigning> {
    const now = (this.options.now ?? Date.now)()
    if (this.failed && now - this.failed.at < (this.options.retryAfterMs ?? 30_000)) return Promise.reject(this.failed.error)
    this.failed = undefined
    return this.loaded.get(signal).catch((error: unknown) => {
      // A read's own failure; not a wait given up (on a read that never settled, or by a caller out of time).
      if (!(error instanceof SignerError && error.options.retryable)) this.failed = { error, at: now }
      throw error
    })
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
