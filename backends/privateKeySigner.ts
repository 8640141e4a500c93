import type { Address, Hex } from 'viem'
import { privateKeyToAddress, sign } from 'viem/accounts'

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
