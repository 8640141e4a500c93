import { getAddress, type Address } from 'viem'
import type { ChainConfig, EntryPointVersion } from '../../config/schema.js'
import { UnsupportedError } from '../errors.js'

/** The canonical deployments; a chain's config may add others (forks, test deployments). */
export const canonicalEntryPoints: Record<EntryPointVersion, Address> = {
  '0.6': '0x5FF137D4b0FDCD49DcA30c7CF57E578a026d2789',
  '0.7': '0x0000000071727De22E5E9d8BAf0edAc6f37da032',
  '0.8': '0x4337084D9E255Ff0702461CF8895CE9E3b5Ff108',
}

export type EntryPoint = { address: Address; version: EntryPointVersion }

const supportedByChain = new WeakMap<ChainConfig, EntryPoint[]>()

/** The entry points we sponsor for on a chain: those whose version has a paymaster configured. Computed once per chain config. */
export function supportedEntryPoints(chain: ChainConfig): EntryPoint[] {
  let supported = supportedByChain.get(chain)
  if (!supported) {
    const versions = new Set(chain.paymasters.map((p) => p.entryPointVersion))
    const canonical = Object.entries(canonicalEntryPoints).map(([version, address]) => ({
      address,
      version: version as EntryPointVersion,
    }))
    const unique = new Map([...canonical, ...chain.entryPoints].filter((ep) => versions.has(ep.version)).map((ep) => [ep.address, ep]))
    supported = [...unique.values()]
    supportedByChain.set(chain, supported)
  }
  return supported
}

/** Detects the EntryPoint version by address, or says which entry points this chain does support. */
export function resolveEntryPoint(chain: ChainConfig, address: Address): EntryPoint {
  const supported = supportedEntryPoints(chain)
  const wanted = getAddress(address)
  const found = supported.find((ep) => ep.address === wanted)
  if (!found) {
    throw new UnsupportedError(
      `entry point ${wanted} is not supported on chain ${chain.chainId}; supported: ${supported.map((ep) => `${ep.address} (v${ep.version})`).join(', ')}`,
      { reason: 'unsupported_entry_point', supported: supported.map((ep) => ep.address) },
    )
  }
  return found
}
