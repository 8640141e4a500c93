import { ConfigError } from '../config/load.js'
import { supportedEntryPoints } from './sponsor/entryPoints.js'
import { servicesFor, type Env } from './services.js'

/** What `/health` reports: configuration state and each signer's health, never a secret. */
export async function healthReport(env: Env) {
  let services
  try {
    services = servicesFor(env)
  } catch (error) {
    if (error instanceof ConfigError) return { status: 'misconfigured' as const, error: error.message }
    throw error
  }
  const signers = await Promise.all(
    [...services.signers].map(async ([, signer]) => ({ ...signer.describe(), ...(await signer.health()) })),
  )
  return {
    status: signers.every((s) => s.ok) ? ('ok' as const) : ('degraded' as const),
    profile: services.config.profile,
    signers,
    chains: services.config.chains.map((chain) => ({
      chainId: chain.chainId,
      signer: chain.signer,
      entryPoints: supportedEntryPoints(chain),
      paymasters: chain.paymasters.map((p) => ({ entryPointVersion: p.entryPointVersion, contract: p.contract, address: p.address })),
    })),
  }
}
