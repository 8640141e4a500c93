import { createPublicClient, http, type Address } from 'viem'
import { ConfigError } from '../config/load.js'
import type { ChainConfig } from '../config/schema.js'
import { SharedLoad } from '../backends/sharedLoad.js'
import { SignerError, type SignerHealth } from '../backends/signer.js'
import { supportedEntryPoints } from './sponsor/entryPoints.js'
import { servicesFor, type Env } from './services.js'

/**
 * What `/health` reports, never a secret:
 * - `ok`: every chain's signer can sign and every backend is healthy;
 * - `degraded`: every chain can still be served, but a backend (say a fallback's backup) is down, or a
 *   Pimlico paymaster does not list one of our addresses as a signer;
 * - `unavailable`: some chain's signer cannot sign; `misconfigured`: the configuration is invalid.
 */
export async function healthReport(env: Env) {
  let services
  try {
    services = servicesFor(env)
  } catch (error) {
    if (error instanceof ConfigError) return { status: 'misconfigured' as const, error: error.message }
    throw error
  }
  // Fallback members are reported inside their fallback, which probes them once, unless a chain uses one directly.
  const chainSigners = new Set(services.config.chains.map((chain) => chain.signer))
  const members = new Set(Object.values(services.config.signers).flatMap((signer) => (signer.kind === 'fallback' ? signer.members : [])))
  const signers = await Promise.all(
    [...services.signers]
      .filter(([name]) => chainSigners.has(name) || !members.has(name))
      .map(async ([, signer]) => ({ ...signer.describe(), ...(await signer.health()) })),
  )
  const healthOf = (name: string) => signers.find((s) => s.name === name)!
  const chains = await Promise.all(
    services.config.chains.map(async (chain) => ({
      chainId: chain.chainId,
      signer: chain.signer,
      entryPoints: supportedEntryPoints(chain),
      paymasters: chain.paymasters.map((p) => ({ entryPointVersion: p.entryPointVersion, contract: p.contract, address: p.address })),
      ...(chain.rpcUrl ? { signerAuthorisation: await signerAuthorisation(chain, healthOf(chain.signer)) } : {}),
    })),
  )
  const chainSignersOk = services.config.chains.every((chain) => healthOf(chain.signer).ok)
  const everythingOk =
    signers.every((s) => s.ok && (s.members ?? []).every((m) => m.ok && m.state === 'closed')) &&
    chains.every((c) => (c.signerAuthorisation ?? []).every((a) => a.authorised === true))
  return {
    status: !chainSignersOk ? ('unavailable' as const) : everythingOk ? ('ok' as const) : ('degraded' as const),
    profile: services.config.profile,
    signers,
    chains,
  }
}

type HealthReport = Awaited<ReturnType<typeof healthReport>>
const recentReports = new WeakMap<object, SharedLoad<HealthReport>>()

/**
 * The status of one report per env at most every 5 s (the answer of `/health` to all but operators), shared while
 * it is made. A report still under way after 2 minutes (past the slowest backend the config allows, a Vault read of
 * three 30 s requests, and the chain check; in workerd it may belong to a request that has gone) is not waited
 * for: the status is then `unavailable`, and the next call makes another.
 */
export async function recentHealthStatus(env: Env): Promise<HealthReport['status'] | 'unavailable'> {
  let reports = recentReports.get(env)
  if (!reports) {
    reports = new SharedLoad({ load: () => healthReport(env), abandonAfterMs: 120_000, keepMs: 5_000, what: 'health report' })
    recentReports.set(env, reports)
  }
  return reports.get().then(
    (report) => report.status,
    (error: unknown) => {
      if (error instanceof SignerError) return 'unavailable' as const
      throw error
    },
  )
}

const signersAbi = [
  { type: 'function', name: 'signers', stateMutability: 'view', inputs: [{ name: 'account', type: 'address' }], outputs: [{ type: 'bool' }] },
] as const

/**
 * A Pimlico SingletonPaymaster keeps a set of signers: each backend's address
 * must be in it, or the backend's signatures fail on chain (AA34). Read over
 * the chain's RPC; only /health pays for it, never a sponsorship.
 */
async function signerAuthorisation(chain: ChainConfig, health: SignerHealth) {
  const members: Array<{ name: string; address?: Address }> = health.members ?? [{ name: chain.signer, address: health.ok ? health.address : undefined }]
  const client = createPublicClient({ transport: http(chain.rpcUrl, { timeout: 3_000, retryCount: 0 }) })
  const singletons = chain.paymasters.filter((p) => p.contract === 'pimlico-singleton')
  return Promise.all(
    singletons.flatMap((paymaster) =>
      members.map(async (member) => {
        const base = { paymaster: paymaster.address, backend: member.name, address: member.address ?? null }
        if (!member.address) return { ...base, authorised: null, error: 'backend address unknown' }
        try {
          const authorised = await client.readContract({ address: paymaster.address, abi: signersAbi, functionName: 'signers', args: [member.address] })
          return { ...base, authorised }
        } catch {
          return { ...base, authorised: null, error: 'could not read signers() over the chain RPC' }
        }
      }),
    ),
  )
}
