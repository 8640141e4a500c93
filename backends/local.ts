import type { Hex } from 'viem'
import { generatePrivateKey } from 'viem/accounts'
import { parsePrivateKey } from './privateKey.js'
import { KeyHoldingSigner, PrivateKeySigning } from './privateKeySigner.js'
import { SignerError, type SignerDescription } from './signer.js'

export type LocalSignerOptions = {
  name: string
  /** The secret's value, or undefined when the secret is not set. */
  privateKey: string | undefined
  /** Name of the Worker secret, for error messages. */
  secretName: string
  /** Development only: with no secret, sign with a key made up for this isolate. */
  allowEphemeral: boolean
  log?: (line: string) => void
}

/** A key from a Worker secret; in development, optionally an ephemeral key. */
export class LocalSigner extends KeyHoldingSigner {
  private readonly signingKey: PrivateKeySigning | undefined
  private readonly error: SignerError | undefined
  private readonly ephemeral: boolean

  constructor(private readonly options: LocalSignerOptions) {
    super()
    this.ephemeral = options.privateKey === undefined && options.allowEphemeral
    try {
      const key: Hex = this.ephemeral
        ? generatePrivateKey()
        : parsePrivateKey(requireValue(options), `secret ${options.secretName}`)
      this.signingKey = new PrivateKeySigning(key)
    } catch (error) {
      this.error = error instanceof SignerError ? error : new SignerError(`secret ${options.secretName} is unusable`)
    }
    if (this.ephemeral && this.signingKey) {
      ;(options.log ?? console.warn)(
        `[signer ${options.name}] DEVELOPMENT ONLY: secret ${options.secretName} is not set, so this isolate signs with an ephemeral key ${this.signingKey.address} that is lost on restart. Set the secret for anything but local development.`,
      )
    }
  }

  protected async signing(): Promise<PrivateKeySigning> {
    if (!this.signingKey) throw this.error ?? new SignerError(`secret ${this.options.secretName} is unusable`)
    return this.signingKey
  }

  describe(): SignerDescription {
    return { kind: 'local', name: this.options.name, securityLevel: this.ephemeral ? 'ephemeral' : 'software' }
  }
}

function requireValue(options: LocalSignerOptions): string {
  if (options.privateKey === undefined) {
    throw new SignerError(`secret ${options.secretName} is not set`)
  }
  return options.privateKey
}
