import { wranglerProfileConfigs } from '../support/wranglerProfiles.js'
import { describe, expect, it } from 'vitest'
import { ConfigError, loadConfig } from '../../config/load.js'
import { entryPointVersions, paymasterContracts, type EntryPointVersion, type PaymasterContract } from '../../config/schema.js'
import { adapterFor } from '../../worker/sponsor/adapters/registry.js'

const chain = {
  chainId: 8453,
  paymasters: [{ entryPointVersion: '0.7', contract: 'pimlico-singleton', address: '0xd8a5406e24dcdc93656c1ef20e491a1fcf43b558' }],
}

/** The per-operation cost cap every profile but development requires. */
const costCap = { gas: { maxTotalCostWei: '10000000000000000' } }

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
    const config = loadConfig({
      PROFILE: 'production',
      PAYMASTER_CONFIG: JSON.stringify({
        chains: [chain],
        signers: { kms: { keyId: 'alias/paymaster', region: 'us-east-1' } },
        policy: { validity: { validForSeconds: 300 }, ...costCap },
      }),
    })
    expect(config.profile).toBe('production')
    expect(config.signers.primary).toMatchObject({ kind: 'fallback', members: ['kms', 'edge'], timeoutMs: 2_000, failureThreshold: 3, coolDownSeconds: 30 })
    expect(config.signers.kms).toMatchObject({ kind: 'aws-kms', keyId: 'alias/paymaster', accessKeyIdSecret: 'AWS_ACCESS_KEY_ID', deadlineMs: 3_000, maxAttempts: 3 })
    expect(config.signers.edge).toEqual({ kind: 'secrets-store', binding: 'PAYMASTER_KEY' })
    expect(config.policy.validity).toEqual({ validForSeconds: 300, validAfterSkewSeconds: 60 })
    expect(config.policy.apiKeys.required).toBe(true)
    expect(config.chains[0]!.paymasters[0]!.address).toBe('0xd8A5406E24dcDc93656c1eF20E491a1FcF43b558')
    expect(config.limits).toEqual({ maxBodyBytes: 262_144, maxBatchSize: 32 })
  })

  it('the production preset insists on naming its KMS key, and null removes a preset entry', () => {
    expect(configError({ PROFILE: 'production', PAYMASTER_CONFIG: { chains: [chain], policy: costCap } })).toContain('signers.kms.keyId')
    const edgeOnly = { chains: [chain], signers: { primary: { kind: 'secrets-store', binding: 'KEY' }, kms: null, edge: null }, policy: costCap }
    expect(Object.keys(loadConfig({ PROFILE: 'production', PAYMASTER_CONFIG: edgeOnly }).signers)).toEqual(['primary'])
  })

  it('checks fallback members: they exist, are not fallbacks, and for a single-signer paymaster declare one address', () => {
    const withSigners = (signers: Record<string, unknown>, paymaster = chain.paymasters[0]) => ({
      PAYMASTER_CONFIG: { chains: [{ ...chain, paymasters: [paymaster] }], signers },
    })
    expect(configError(withSigners({ primary: { kind: 'fallback', members: ['missing'] } }))).toContain('signers.primary.members.0: no signer named "missing"')
    expect(configError(withSigners({ primary: { kind: 'fallback', members: ['inner'] }, inner: { kind: 'fallback', members: ['primary'] } }))).toContain(
      'cannot itself be a fallback',
    )
    const differing = {
      primary: { kind: 'fallback', members: ['a', 'b'] },
      a: { kind: 'local', address: '0x1111111111111111111111111111111111111111' },
      b: { kind: 'local', address: '0x2222222222222222222222222222222222222222' },
    }
    const verifying = { entryPointVersion: '0.7', contract: 'eth-infinitism-verifying', address: chain.paymasters[0]!.address }
    expect(configError(withSigners(differing, verifying))).toContain('accepts a single signer')
    expect(loadConfig(withSigners(differing)).signers.a).toMatchObject({ kind: 'local' })
  })

  it('refuses keyless key ids that URL normalisation would change, and accepts the origin\'s others', () => {
    const keyless = (keyId: string) => ({ PAYMASTER_CONFIG: { chains: [chain], signers: { primary: { kind: 'keyless', url: 'https://origin.internal:8443', keyId, address: '0x1111111111111111111111111111111111111111' } } } })
    for (const keyId of ['.', '..']) expect(configError(keyless(keyId))).toContain('signers.primary.keyId')
    for (const keyId of ['1b4e28ba-2fa1-11d2-883f-0016d3cca427', 'tenant/a b?#%é', '...', '.k']) {
      expect(loadConfig(keyless(keyId)).signers.primary).toMatchObject({ kind: 'keyless', keyId })
    }
  })

  it('takes a keyless hmacKeyId as the parent takes key ids: visible ASCII but "," and ":"', () => {
    const keyless = (hmacKeyId: string) => ({ PAYMASTER_CONFIG: { chains: [chain], signers: { primary: { kind: 'keyless', url: 'https://origin.internal:8443', keyId: 'k1', address: '0x1111111111111111111111111111111111111111', hmacKeyId } } } })
    for (const hmacKeyId of ['worker', 'edge-eu_1.2', '!~']) expect(loadConfig(keyless(hmacKeyId)).signers.primary).toMatchObject({ hmacKeyId })
    for (const hmacKeyId of ['', ' worker', 'worker\n', 'edge eu', 'worker:1', 'a,b', 'wörker']) expect(configError(keyless(hmacKeyId))).toContain('signers.primary.hmacKeyId')
  })

  it('takes a keyless clientCertificate as a binding name, and refuses anything else', () => {
    const keyless = (clientCertificate: string) => ({ PAYMASTER_CONFIG: { chains: [chain], signers: { primary: { kind: 'keyless', url: 'https://origin.internal:8443', keyId: 'k1', address: '0x1111111111111111111111111111111111111111', clientCertificate } } } })
    expect(loadConfig(keyless('ORIGIN_CLIENT_CERT')).signers.primary).toMatchObject({ clientCertificate: 'ORIGIN_CLIENT_CERT' })
    expect(configError(keyless('origin client cert'))).toContain('signers.primary.clientCertificate')
    const overHttp = keyless('ORIGIN_CLIENT_CERT')
    ;(overHttp.PAYMASTER_CONFIG.signers.primary as { url: string }).url = 'http://origin.internal:8443'
    expect(configError(overHttp)).toContain('signers.primary.clientCertificate: a client certificate is presented over TLS only')
  })

  it('refuses a signer base URL with a query or fragment, which would end up in front of the paths the signer appends', () => {
    const withUrl = (signer: Record<string, unknown>) => ({ PAYMASTER_CONFIG: { chains: [chain], signers: { primary: signer } } })
    const address = '0x1111111111111111111111111111111111111111'
    const signers = (url: string) => [
      { kind: 'keyless', url, keyId: 'k1', address },
      { kind: 'http', url, keyId: 'k1', address },
      { kind: 'vault', url, path: 'paymaster', auth: { method: 'token' } },
    ]
    for (const url of ['https://origin.internal:8443?x=1', 'https://origin.internal:8443/#top', 'https://origin.internal:8443?']) {
      for (const signer of signers(url)) expect(configError(withUrl(signer))).toContain('a base URL takes no query (?…) or fragment (#…)')
    }
    for (const signer of signers('https://origin.internal:8443/prefix/')) expect(loadConfig(withUrl(signer)).signers.primary).toMatchObject({ kind: signer.kind })
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

  it('refuses at load what could not be signed: a paymaster gas limit past uint128, a validAfter of now (v0.8 wants it past)', () => {
    const withGasLimit = (limit: string) => ({ ...chain, paymasters: [{ ...chain.paymasters[0], postOpGasLimit: limit }] })
    expect(configError({ PAYMASTER_CONFIG: { chains: [withGasLimit((2n ** 128n).toString())] } })).toContain(
      'chains.0.paymasters.0.postOpGasLimit: expected at most 2^128 − 1',
    )
    expect(loadConfig({ PAYMASTER_CONFIG: { chains: [withGasLimit((2n ** 128n - 1n).toString())] } }).chains[0]!.paymasters[0]!.postOpGasLimit).toBe(2n ** 128n - 1n)
    expect(configError({ PAYMASTER_CONFIG: { chains: [chain], policy: { validity: { validAfterSkewSeconds: 0 } } } })).toContain('policy.validity.validAfterSkewSeconds: Too small')
    expect(loadConfig({ PAYMASTER_CONFIG: { chains: [chain], policy: { validity: { validAfterSkewSeconds: 1 } } } }).policy.validity.validAfterSkewSeconds).toBe(1)
  })

  it('takes a sponsor icon only as an image data URI, as ERC-7677 asks', () => {
    const sponsorOf = (icon: string) => ({ PAYMASTER_CONFIG: { chains: [chain], sponsor: { name: 'Dapp', icon } } })
    const icon = 'data:image/png;base64,iVBORw0KGgo='
    expect(loadConfig(sponsorOf(icon)).sponsor.icon).toBe(icon)
    const accepted = [
      'data:image/svg+xml,%3Csvg%2F%3E',
      "data:image/svg+xml;utf8,<svg xmlns='http://www.w3.org/2000/svg' width='96'/>",
      'data:image/png;BASE64,iVBO Rw0K\nGgo=',
      'data:image/png; base64,iVBORw0KGgo=',
      'data:image/png;base64,iVBORw0KGgo%3D',
    ]
    for (const icon of accepted) expect(loadConfig(sponsorOf(icon)).sponsor.icon).toBe(icon)
    const refused = [
      'https://dapp.example/icon.png',
      'data:text/html,<script>',
      'data:image/png;base64,',
      'data:image/png;base64,!!!',
      'data:image/png;base64,A',
    ]
    for (const icon of refused) expect(configError(sponsorOf(icon)), icon).toContain('sponsor.icon: expected an image as a data URI (RFC 2397)')
    expect(configError(sponsorOf(`data:image/png;base64,${'A'.repeat(32_768)}`))).toContain('sponsor.icon: at most 32 KiB')
    expect(configError(sponsorOf("data:image/svg+xml,<svg fill='#fff'/>"))).toBe('configuration invalid: sponsor.icon: a raw # cuts a data URI off in browsers (an SVG colour, say): write it as %23')
    expect(loadConfig(sponsorOf("data:image/svg+xml,<svg fill='%23fff'/>")).sponsor.icon).toBe("data:image/svg+xml,<svg fill='%23fff'/>")
  })

  it('takes exactly the family and version pairs that have an adapter, and names the versions of a family refused', () => {
    const on = (contract: string, entryPointVersion: string) => ({ PAYMASTER_CONFIG: { chains: [{ ...chain, paymasters: [{ ...chain.paymasters[0], entryPointVersion, contract }] }] } })
    const adapterOf = (contract: PaymasterContract, version: EntryPointVersion) => {
      try {
        return adapterFor(contract, version)
      } catch {
        return undefined
      }
    }
    const taken: string[] = []
    for (const contract of paymasterContracts) {
      for (const version of entryPointVersions) {
        const pair = `${contract} at v${version}`
        if (adapterOf(contract, version)) {
          expect(loadConfig(on(contract, version)).chains[0]!.paymasters[0], pair).toMatchObject({ contract, entryPointVersion: version })
          taken.push(pair)
        } else {
          expect(configError(on(contract, version)), pair).toMatch(new RegExp(`^configuration invalid: chains\\.0\\.paymasters\\.0\\.entryPointVersion: ${contract} is supported for EntryPoint [0-9., ]+ only$`))
        }
      }
    }
    expect(taken).toEqual(['pimlico-singleton at v0.6', 'pimlico-singleton at v0.7', 'pimlico-singleton at v0.8', 'pimlico-singleton-7702 at v0.8', 'eth-infinitism-verifying at v0.7'])
    expect(configError(on('pimlico-singleton-7702', '0.7'))).toBe('configuration invalid: chains.0.paymasters.0.entryPointVersion: pimlico-singleton-7702 is supported for EntryPoint 0.8 only')
  })

  it('allows ephemeral keys in development only, and no key in the Worker at all in high-security', () => {
    const ephemeral = { chains: [chain], signers: { primary: { kind: 'local', allowEphemeral: true }, kms: null, edge: null } }
    expect(configError({ PROFILE: 'staging', PAYMASTER_CONFIG: ephemeral })).toContain('signers.primary.allowEphemeral')
    for (const kind of ['local', 'secrets-store']) {
      const inWorker = { chains: [chain], signers: { primary: { kind, binding: 'KEY' }, kms: null, vault: null } }
      expect(configError({ PROFILE: 'high-security', PAYMASTER_CONFIG: inWorker })).toContain('signers.primary.kind: the high-security profile keeps no key in the Worker')
    }
    const highSecurity = {
      chains: [chain],
      policy: costCap,
      signers: { kms: { keyId: 'k', region: 'eu-west-1' }, vault: { url: 'https://vault.internal:8200', path: 'paymaster/signer' } },
    }
    expect(loadConfig({ PROFILE: 'high-security', PAYMASTER_CONFIG: highSecurity }).signers.vault).toMatchObject({
      kind: 'vault',
      auth: { method: 'approle', roleIdSecret: 'VAULT_ROLE_ID', secretIdSecret: 'VAULT_SECRET_ID', mount: 'approle' },
      kvMount: 'secret',
      field: 'private_key',
    })
  })

  it('requires a per-operation cost cap in every profile but development', () => {
    const edgeKey = { primary: { kind: 'secrets-store', binding: 'KEY' }, kms: null, edge: null, origin: null, vault: null }
    for (const profile of ['testing', 'staging', 'production', 'enterprise']) {
      expect(configError({ PROFILE: profile, PAYMASTER_CONFIG: { chains: [chain], signers: edgeKey } })).toBe(
        'configuration invalid: policy.gas.maxTotalCostWei: required outside the development profile: the most one sponsored operation may cost, in wei (its gas limits × maxFeePerGas)',
      )
      expect(loadConfig({ PROFILE: profile, PAYMASTER_CONFIG: { chains: [chain], signers: edgeKey, policy: costCap } }).policy.gas.maxTotalCostWei).toBe(10n ** 16n)
    }
    const highSecurity = { chains: [chain], signers: { kms: { keyId: 'k', region: 'eu-west-1' }, vault: { url: 'https://vault.internal:8200', path: 'p' } } }
    expect(configError({ PROFILE: 'high-security', PAYMASTER_CONFIG: highSecurity })).toContain('policy.gas.maxTotalCostWei: required outside the development profile')
    expect(loadConfig({ PAYMASTER_CONFIG: { chains: [chain] } }).policy.gas.maxTotalCostWei).toBeUndefined()
  })

  it('refuses an operator key secret that is the API keys\u2019 own', () => {
    expect(configError({ PAYMASTER_CONFIG: { chains: [chain], policy: { apiKeys: { operatorSecret: 'API_KEYS' } } } })).toContain(
      'policy.apiKeys.operatorSecret: must name another secret than policy.apiKeys.secret',
    )
  })

  it('every profile in wrangler.toml that names its chains loads', () => {
    const configs = wranglerProfileConfigs()
    expect(configs.map(({ profile }) => profile)).toEqual(['development', 'testing'])
    for (const { profile, config } of configs) {
      expect(loadConfig({ PROFILE: profile, PAYMASTER_CONFIG: config }).chains[0]!.chainId).toBe(31337)
    }
  })
})
