import { describeZodError } from '../worker/validation.js'
import { configSchema, profileNames, type Config, type ProfileName } from './schema.js'
import { profilePresets } from './profiles.js'

/** The configuration is unusable; the message names the field path and the reason. */
export class ConfigError extends Error {}

/** The Worker vars the loader reads. PAYMASTER_CONFIG may be a JSON string or an object (wrangler passes TOML tables as objects). */
export type ConfigVars = { PROFILE?: unknown; PAYMASTER_CONFIG?: unknown }

export function loadConfig(vars: ConfigVars): Config {
  const profile = parseProfile(vars.PROFILE)
  const overrides = parseOverrides(vars.PAYMASTER_CONFIG)
  const merged = mergeConfig(profilePresets[profile], { ...overrides, profile })
  const result = configSchema.safeParse(merged)
  if (!result.success) throw new ConfigError(`configuration invalid: ${describeZodError(result.error, { maxIssues: 20 })}`)
  return result.data
}

function parseProfile(value: unknown): ProfileName {
  const profile = value ?? 'development'
  if (typeof profile !== 'string' || !(profileNames as readonly string[]).includes(profile)) {
    throw new ConfigError(`configuration invalid: PROFILE: expected one of ${profileNames.join(', ')}`)
  }
  return profile as ProfileName
}

function parseOverrides(value: unknown): Record<string, unknown> {
  if (value === undefined || value === null || value === '') return {}
  let parsed = value
  if (typeof value === 'string') {
    try {
      parsed = JSON.parse(value)
    } catch {
      throw new ConfigError('configuration invalid: PAYMASTER_CONFIG: not valid JSON')
    }
  }
  if (!isPlainObject(parsed)) throw new ConfigError('configuration invalid: PAYMASTER_CONFIG: expected a JSON object')
  return parsed
}

/** Objects merge key by key; arrays and scalars from `override` replace; null removes a preset's entry. */
export function mergeConfig(base: Record<string, unknown>, override: Record<string, unknown>): Record<string, unknown> {
  const merged: Record<string, unknown> = { ...base }
  for (const [key, value] of Object.entries(override)) {
    if (value === undefined) continue
    if (value === null) {
      delete merged[key]
      continue
    }
    const current = merged[key]
    merged[key] = isPlainObject(current) && isPlainObject(value) ? mergeConfig(current, value) : value
  }
  return merged
}

function isPlainObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value)
}
