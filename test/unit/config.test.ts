import { readFileSync } from 'node:fs'
import { describe, expect, it } from 'vitest'
import { ConfigError, loadConfig } from '../../config/load.js'

const chain = {
  chainId: 8453,
  paymasters: [{ entryPointVersion: '0.7', contract: 'pimlico-singleton', address: '0xd8a5406e24dcdc93656c1ef20e491a1fcf43b558' }],
}

function configError(vars: Record<string, unknown>): string {
  try {
    loadConfig(vars)
  } catch (error) {
    if (error instanceof ConfigError) return error.message
    throw error
  }
  throw new Error('configuration was accepted')
}

describe('configuration', () => {
  it('merges PAYMASTER_CONFIG over the profile preset and fills defaults', () => {
    const config = loadConfig({ PROFILE: 'production', PAYMASTER_CONFIG: JSON.stringify({ chains: [chain], policy: { validity: { validForSeconds: 300 } } }) })
    expect(config.profile).toBe('production')
    expect(config.signers.primary).toEqual({ kind: 'secrets-store', binding: 'PAYMASTER_KEY' })
    expect(config.policy.validity).toEqual({ validForSeconds: 300, validAfterSkewSeconds: 60 })
    expect(config.policy.apiKeys.required).toBe(true)
    expect(config.chains[0]!.paymasters[0]!.address).toBe('0xd8A5406E24dcDc93656c1eF20E491a1FcF43b558')
    expect(config.limits).toEqual({ maxBodyBytes: 262_144, maxBatchSize: 32 })
  })

  it('accepts PAYMASTER_CONFIG as an object, as wrangler passes TOML tables', () => {
    expect(loadConfig({ PAYMASTER_CONFIG: { chains: [chain] } }).profile).toBe('development')
  })

  it('names the field path and the reason of every invalid value', () => {
    expect(configError({ PROFILE: 'prod' })).toBe(
      'configuration invalid: PROFILE: expected one of development, testing, staging, production, enterprise, high-security',
    )
    expect(configError({ PAYMASTER_CONFIG: '{"chains": [' })).toBe('configuration invalid: PAYMASTER_CONFIG: not valid JSON')
    expect(configError({ PAYMASTER_CONFIG: { chains: [{ ...chain, chainId: -1 }] } })).toContain('chains.0.chainId: Too small')
    expect(configError({ PAYMASTER_CONFIG: { chains: [{ ...chain, paymasters: [{ ...chain.paymasters[0], contract: 'other' }] }] } })).toContain(
      'chains.0.paymasters.0.contract',
    )
    expect(configError({ PAYMASTER_CONFIG: { chains: [chain, chain] } })).toContain('chains.1.chainId: chain 8453 is configured twice')
    expect(configError({ PAYMASTER_CONFIG: { chains: [{ ...chain, signer: 'backup' }] } })).toContain('chains.0.signer: no signer named "backup"')
    expect(configError({ PAYMASTER_CONFIG: { chains: [chain], policy: { validity: { validForSeconds: 999_999 } } } })).toContain(
      'policy.validity.validForSeconds',
    )
    expect(configError({ PAYMASTER_CONFIG: { chains: [chain], policy: { gas: { maxTotalCostWei: '1e18' } } } })).toContain(
      'policy.gas.maxTotalCostWei: expected a decimal integer string',
    )
  })

  it('keeps the VerifyingPaymaster to the EntryPoint version we prove it on', () => {
    const verifyingOnV08 = { ...chain, paymasters: [{ ...chain.paymasters[0], entryPointVersion: '0.8', contract: 'eth-infinitism-verifying' }] }
    expect(configError({ PAYMASTER_CONFIG: { chains: [verifyingOnV08] } })).toContain('supported for EntryPoint 0.7 only')
  })

  it('allows ephemeral keys in development only, and no local key at all in high-security', () => {
    const ephemeral = { chains: [chain], signers: { primary: { kind: 'local', allowEphemeral: true } } }
    expect(configError({ PROFILE: 'staging', PAYMASTER_CONFIG: ephemeral })).toContain('signers.primary.allowEphemeral')
    const local = { chains: [chain], signers: { primary: { kind: 'local' } } }
    expect(configError({ PROFILE: 'high-security', PAYMASTER_CONFIG: local })).toContain('signers.primary.kind')
    expect(loadConfig({ PROFILE: 'production', PAYMASTER_CONFIG: local }).signers.primary).toMatchObject({ kind: 'local', secret: 'PAYMASTER_PRIVATE_KEY' })
  })

  it('every profile in wrangler.toml that names its chains loads', () => {
    const toml = readFileSync('wrangler.toml', 'utf8')
    const configs = [...toml.matchAll(/PROFILE = "([a-z-]+)"\nPAYMASTER_CONFIG = '''([\s\S]*?)'''/g)]
    expect(configs.map(([, profile]) => profile)).toEqual(['development', 'testing'])
    for (const [, profile, json] of configs) {
      expect(loadConfig({ PROFILE: profile, PAYMASTER_CONFIG: json }).chains[0]!.chainId).toBe(31337)
    }
  })
})
