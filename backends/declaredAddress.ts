import { getAddress, type Address, type Hex } from 'viem'
import { SignerError, signerErrorMessage, type SignedDigest, type Signer, type SignerDescription, type SignerHealth, type SignOptions } from './signer.js'

/**
 * A signer held to the address its config declares. A backend that reaches
 * another key than meant (a mistyped key id naming another origin key, the
 * wrong secret) would otherwise sign, and report, as that key; the paymaster
 * would reject its signatures, and in a fallback chain it could even define
 * the chain's address.
 */
export class DeclaredAddressSigner implements Signer {
  private readonly declared: Address

  constructor(private readonly options: { signer: Signer; declared: Address }) {
    this.declared = getAddress(options.declared)
  }

  async address(): Promise<Address> {
    return this.checked(await this.options.signer.address())
  }

  async signDigest(digest: Hex, options?: SignOptions): Promise<SignedDigest> {
    const signed = await this.options.signer.signDigest(digest, options)
    this.checked(signed.address)
    return signed
  }

  async health(): Promise<SignerHealth> {
    const health = await this.options.signer.health()
    if (!health.ok) return health
    try {
      this.checked(health.address)
      return health
    } catch (error) {
      return { ok: false, error: signerErrorMessage(error) }
    }
  }

  describe(): SignerDescription {
    return this.options.signer.describe()
  }

  private checked(actual: Address): Address {
    if (getAddress(actual) !== this.declared) {
      throw new SignerError(`signer ${this.describe().name}: its key has address ${actual}, but its config declares ${this.declared}`)
    }
    return actual
  }
}
