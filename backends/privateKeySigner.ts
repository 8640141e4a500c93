import type { Address, Hex } from 'viem'
import { privateKeyToAddress, sign } from 'viem/accounts'
import { healthOf, type SignedDigest, type Signer, type SignerDescription, type SignOptions } from './signer.js'

/** Signs with a private key held in this isolate's memory (noble secp256k1, RFC 6979, low-s). */
export class PrivateKeySigning {
  readonly address: Address
  constructor(private readonly privateKey: Hex) {
    this.address = privateKeyToAddress(privateKey)
  }

  signDigest(digest: Hex): Promise<Hex> {
    return sign({ hash: digest, privateKey: this.privateKey, to: 'hex' })
  }
}

/**
 * A backend that signs with a key it holds in this isolate (from a secret,
 * Secrets Store or Vault): it only says how to get the key; signing, address
 * and health follow from that.
 */
export abstract class KeyHoldingSigner implements Signer {
  /**
   * The key, loaded or cached; rejects with a SignerError that says why it is unavailable. `signal`: the caller stops
   * waiting for a load when it aborts (the load itself goes on, shared).
   */
  protected abstract signing(signal?: AbortSignal): Promise<PrivateKeySigning>
  abstract describe(): SignerDescription

  async address(): Promise<Address> {
    return (await this.signing()).address
  }

  async signDigest(digest: Hex, options?: SignOptions): Promise<SignedDigest> {
    const signing = await this.signing(options?.signal)
    return { signature: await signing.signDigest(digest), signedBy: this.describe().name, address: signing.address }
  }

  health() {
    return healthOf(this)
  }
}
