import type { Hex } from 'viem'

/**
 * The well-known anvil development keys (derived from anvil's public default
 * mnemonic). They hold test ETH on a local anvil chain only and are public
 * knowledge: never use them anywhere real.
 */
export const anvilWellKnownKeys = {
  /** Account #0: deploys contracts and owns the paymasters. */
  deployer: '0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80',
  /** Account #1: the paymaster signer the devnet authorises. */
  paymasterSigner: '0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d',
  /** Account #2: submits handleOps, like a bundler. */
  bundler: '0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a',
} as const satisfies Record<string, Hex>
