import { ConfigError, loadConfig } from '../config/load.js'
import type { ChainConfig, Config } from '../config/schema.js'
import { createSigners } from '../backends/factory.js'
import { SignerMetrics, type AnalyticsEngineDataset } from '../backends/signerMetrics.js'
import type { Signer } from '../backends/signer.js'
import { ApiKeys } from './apiKeys.js'
import { logEvent } from './log.js'
import { DurableObjectQuotas } from './quotas/durableObjectQuotas.js'
import { SponsorshipMetrics } from './sponsorshipMetrics.js'
import type { SponsorshipQuota } from './quotas/sponsorshipQuota.js'
import type { SponsorDeps } from './sponsor/sponsor.js'

/** The Worker's bindings as this code sees them: vars, secrets and bindings by name. */
export type Env = Record<string, unknown> & { PROFILE?: string; PAYMASTER_CONFIG?: unknown }

/** Everything a request needs, built once per isolate from the env. */
export type Services = {
  config: Config
  signers: ReadonlyMap<string, Signer>
  metrics: SignerMetrics
  sponsorshipMetrics: SponsorshipMetrics
  /** Undefined when the profile's policy does not require API keys. */
  apiKeys: ApiKeys | undefined
  /** The keys that read /health's details; undefined when none are set. */
  operatorKeys: ApiKeys | undefined
  sponsor: SponsorDeps
}

const built = new WeakMap<object, Services | ConfigError>()

/**
 * The services for this env, built on first use. A bad configuration is
 * remembered too, so every request gets the same clear error rather than a
 * re-parse or a crash.
 */
export function servicesFor(env: Env): Services {
  let entry = built.get(env)
  if (!entry) {
    try {
      entry = buildServices(env)
    } catch (error) {
      if (!(error instanceof ConfigError)) throw error
      console.error(JSON.stringify({ level: 'error', event: 'config_invalid', message: error.message }))
      entry = error
    }
    built.set(env, entry)
  }
  if (entry instanceof ConfigError) throw entry
  return entry
}

function buildServices(env: Env): Services {
  const config = loadConfig(env)
  const analytics = config.analyticsEngineBinding ? (env[config.analyticsEngineBinding] as AnalyticsEngineDataset | undefined) : undefined
  const metrics = new SignerMetrics(analytics)
  const signers = createSigners({ config, env, metrics })
  const sponsorshipMetrics = new SponsorshipMetrics(config.chains.map((chain) => chain.chainId))
  const { secret: secretName, operatorSecret: operatorSecretName, required } = config.policy.apiKeys
  const keys = ApiKeys.parse(env[secretName])
  if (required && keys.length === 0) {
    throw new ConfigError(
      `configuration invalid: policy.apiKeys.required is true but secret ${secretName} holds no keys (set it, or set policy.apiKeys.required to false)`,
    )
  }
  const apiKeys = required ? new ApiKeys(keys) : undefined
  const operatorKeys = ApiKeys.parse(env[operatorSecretName])
  if (operatorKeys.some((key) => keys.includes(key))) {
    // The config check compares the secrets' names; this one, their values: an API key ships in dapps' front ends
    // (also one set while the profile needs none: it may have been handed out, or be needed again).
    throw new ConfigError(
      `configuration invalid: secret ${operatorSecretName} holds a key that secret ${secretName} holds too: every holder of that API key would read /health's details`,
    )
  }
  return {
    config,
    signers,
    metrics,
    sponsorshipMetrics,
    apiKeys,
    operatorKeys: operatorKeys.length > 0 ? new ApiKeys(operatorKeys) : undefined,
    sponsor: {
      config,
      signerFor: (chain: ChainConfig) => signers.get(chain.signer)!,
      now: () => Math.floor(Date.now() / 1000),
      log: logEvent,
      quotas: quotasFor(config, env),
      observe: (observation) => sponsorshipMetrics.record(observation),
    },
  }
}

function quotasFor(config: Config, env: Env): DurableObjectQuotas | undefined {
  const { binding, limits } = config.policy.quotas
  if (limits.length === 0) return undefined
  const namespace = env[binding] as Partial<DurableObjectNamespace<SponsorshipQuota>> | undefined
  if (typeof namespace?.idFromName !== 'function' || typeof namespace.get !== 'function') {
    throw new ConfigError(
      `configuration invalid: policy.quotas.binding: ${binding} is not a Durable Object namespace (bind class SponsorshipQuota under that name in wrangler.toml)`,
    )
  }
  return new DurableObjectQuotas({ namespace: namespace as DurableObjectNamespace<SponsorshipQuota>, limits, log: logEvent })
}
