import { env } from 'cloudflare:workers'
import { beforeAll, describe, expect, it, vi } from 'vitest'
import { recoverMessageAddress, slice, type Address } from 'viem'
import { app } from '../../worker/app.js'
import { rpcUserOperationV06, rpcUserOperationV07 } from '../support/userOperations.js'
import { apiKey, call, entryPoints, operatorKey, paymasters, seedSignerKey } from './helpers.js'

let signer: Address
beforeAll(async () => {
  signer = await seedSignerKey()
})

function post(path: string, body: unknown, headers: Record<string, string> = { 'x-api-key': apiKey }) {
  return call(path, { method: 'POST', headers: { 'content-type': 'application/json', ...headers }, body: JSON.stringify(body) })
}

describe('REST API', () => {
  it('POST /api/v1/paymaster/sponsor signs and returns hashes, window and signer', async () => {
    const response = await post('/api/v1/paymaster/sponsor', { userOperation: rpcUserOperationV07(), entryPoint: entryPoints['0.7'], chainId: 31337 })
    expect(response.status).toBe(200)
    const body = (await response.json()) as { validUntil: number; validAfter: number }
    expect(body).toMatchObject({ chainId: 31337, entryPointVersion: '0.7', paymaster: paymasters['0.7'], signer })
    expect(body.validUntil).toBeGreaterThan(body.validAfter)
    // A null context, as the RPC methods take it.
    const withNullContext = await post('/api/v1/paymaster/sponsor', { userOperation: rpcUserOperationV07(), entryPoint: entryPoints['0.7'], chainId: 31337, context: null })
    expect(withNullContext.status).toBe(200)
  })

  it('POST /api/v1/paymaster/process evaluates without signing, and reports a decline as a decision', async () => {
    const sponsored = await post('/api/v1/paymaster/process', { userOperation: rpcUserOperationV06(), entryPoint: entryPoints['0.6'], chainId: '0x7a69' })
    const body = (await sponsored.json()) as Record<string, string>
    expect(body).toMatchObject({ decision: 'sponsor', entryPointVersion: '0.6', maxCostWei: String((100_000n + 3n * 400_000n + 60_000n) * 2_000_000_000n) })
    // The data carries the stand-in signature, never a real one.
    await expect(recoverMessageAddress({ message: { raw: body.paymasterHash as `0x${string}` }, signature: slice(body.paymasterAndData as `0x${string}`, 33) })).resolves.not.toBe(signer)

    const declined = await post('/api/v1/paymaster/process', {
      userOperation: rpcUserOperationV07({ sender: '0x000000000000000000000000000000000000dEaD' }),
      entryPoint: entryPoints['0.7'],
      chainId: 31337,
    })
    expect(declined.status).toBe(200)
    expect(await declined.json()).toMatchObject({ decision: 'decline', reason: 'sender_denied' })
  })

  it('maps errors to HTTP statuses with a JSON body naming the problem', async () => {
    const invalid = await post('/api/v1/paymaster/sponsor', { userOperation: rpcUserOperationV07(), entryPoint: entryPoints['0.7'] })
    expect(invalid.status).toBe(400)
    expect(await invalid.json()).toMatchObject({ error: { code: 'invalid_params', message: expect.stringContaining('chainId') } })

    const declined = await post('/api/v1/paymaster/sponsor', {
      userOperation: rpcUserOperationV07({ callGasLimit: '0x4c4b41' }),
      entryPoint: entryPoints['0.7'],
      chainId: 31337,
    })
    expect(declined.status).toBe(403)
    expect(await declined.json()).toMatchObject({ error: { code: 'declined', data: { reason: 'gas_limit_exceeded' } } })
    // A postOp limit above the paymaster's own, as over JSON-RPC.
    const postOp = await post('/api/v1/paymaster/sponsor', { userOperation: rpcUserOperationV07({ paymasterPostOpGasLimit: '0x2' }), entryPoint: entryPoints['0.7'], chainId: 31337 })
    expect(postOp.status).toBe(403)
    expect(await postOp.json()).toMatchObject({ error: { code: 'declined', data: { reason: 'gas_limit_exceeded', field: 'paymasterPostOpGasLimit', limit: '1' } } })

    const unauthorised = await post('/api/v1/paymaster/sponsor', {}, {})
    expect(unauthorised.status).toBe(401)

    const notJson = await call('/api/v1/paymaster/sponsor', { method: 'POST', headers: { 'x-api-key': apiKey }, body: 'nope' })
    expect(notJson.status).toBe(400)
    expect(await notJson.json()).toMatchObject({ error: { code: 'parse_error' } })

    const unknown = await call('/api/v1/nothing', { headers: { 'x-api-key': apiKey } })
    expect(unknown.status).toBe(404)
  })

  it('GET /api/v1/paymaster/signer names the address and backend per chain', async () => {
    const response = await call('/api/v1/paymaster/signer?chainId=31337', { headers: { 'x-api-key': apiKey } })
    expect(await response.json()).toEqual({
      signers: [{ chainId: 31337, kind: 'secrets-store', name: 'primary', securityLevel: 'edge-secret', address: signer }],
    })
    const unknown = await call('/api/v1/paymaster/signer?chainId=abc', { headers: { 'x-api-key': apiKey } })
    expect(unknown.status).toBe(400)
  })

  it('GET /health reports the profile and signers to an operator key, and only the status to anyone else, API key holders included', async () => {
    const response = await call('/health', { headers: { 'x-api-key': operatorKey } })
    expect(response.status).toBe(200)
    expect(await response.json()).toMatchObject({
      status: 'ok',
      profile: 'testing',
      signers: [{ kind: 'secrets-store', ok: true, address: signer }],
    })
    for (const headers of [{}, { 'x-api-key': 'not-a-key' }, { 'x-api-key': apiKey }] as Array<Record<string, string>>) {
      const anonymous = await call('/health', { headers })
      expect(anonymous.status).toBe(200)
      expect(await anonymous.json()).toEqual({ status: 'ok' })
    }
  })

  it('GET /openapi.json documents every REST route with schemas from the zod definitions', async () => {
    const document = (await (await call('/openapi.json')).json()) as {
      openapi: string
      paths: Record<string, Record<string, { requestBody?: { content: Record<string, { schema: { properties: Record<string, unknown> } }> } }>>
    }
    expect(document.openapi).toBe('3.1.0')
    expect(Object.keys(document.paths).sort()).toEqual(['/api/v1/paymaster/process', '/api/v1/paymaster/signer', '/api/v1/paymaster/sponsor', '/health'])
    const body = document.paths['/api/v1/paymaster/sponsor']!.post!.requestBody!.content['application/json']!.schema
    expect(Object.keys(body.properties)).toEqual(['userOperation', 'entryPoint', 'chainId', 'context'])
    expect(JSON.stringify(body.properties.userOperation)).toContain('paymasterVerificationGasLimit')
  })
})

describe('configuration and secrets failures', () => {
  const fetchWith = (overrides: Record<string, unknown>, path = '/health', init: RequestInit = {}) =>
    app.fetch(new Request(`http://paymaster.test${path}`, init), { ...env, ...overrides })

  it('an invalid config answers every request with the field path and reason, and /health says misconfigured', async () => {
    const config = JSON.stringify({
      chains: [{ chainId: 31337, paymasters: [{ entryPointVersion: '0.7', contract: 'pimlico-singleton', address: '0x12' }] }],
      policy: { gas: { maxTotalCostWei: '1' } },
    })
    const health = await fetchWith({ PAYMASTER_CONFIG: config })
    expect(health.status).toBe(503)
    expect(await health.json()).toEqual({
      status: 'misconfigured',
      error: 'configuration invalid: chains.0.paymasters.0.address: expected a 20-byte hex address (0x followed by 40 hex digits)',
    })
    const rpcResponse = await fetchWith({ PAYMASTER_CONFIG: config }, '/rpc', { method: 'POST', body: '{}' })
    expect(rpcResponse.status).toBe(500)
    expect(((await rpcResponse.json()) as { error: { message: string } }).error.message).toContain('chains.0.paymasters.0.address')
  })

  it('a production profile with no chains fails clearly, and so does a required API key secret that is empty', async () => {
    const production = await fetchWith({ PROFILE: 'production', PAYMASTER_CONFIG: undefined })
    expect(((await production.json()) as { error: string }).error).toContain('chains: ')
    const noKeys = await fetchWith({ API_KEYS: undefined })
    expect(((await noKeys.json()) as { error: string }).error).toContain('secret API_KEYS holds no keys')
  })

  it('an operator key that is also an API key is a configuration error, not a key to /health\u2019s details for every dapp', async () => {
    const config = JSON.parse((env as unknown as { PAYMASTER_CONFIG: string }).PAYMASTER_CONFIG) as { policy: Record<string, unknown> }
    const keyless = JSON.stringify({ ...config, policy: { ...config.policy, apiKeys: { required: false } } })
    // Also while no API key is required: the keys in API_KEYS may have been handed out.
    for (const overrides of [{}, { PAYMASTER_CONFIG: keyless }]) {
      const shared = await fetchWith({ ...overrides, OPERATOR_KEYS: `another-operator-key, ${apiKey}` }, '/health', { headers: { 'x-api-key': apiKey } })
      expect(shared.status).toBe(503)
      const { error } = (await shared.json()) as { error: string }
      expect(error).toContain('secret OPERATOR_KEYS holds a key that secret API_KEYS holds too')
      expect(error).not.toContain(apiKey)
    }
  })

  it('a missing Secrets Store secret is a clear error on /health and on requests, never a crash', async () => {
    const overrides = { PAYMASTER_KEY: (env as unknown as Record<string, unknown>).NEVER_CREATED_KEY }
    const health = await fetchWith(overrides, '/health', { headers: { 'x-api-key': operatorKey } })
    expect(health.status).toBe(503)
    expect(await health.json()).toMatchObject({
      status: 'unavailable',
      signers: [{ ok: false, error: 'Secrets Store secret behind binding PAYMASTER_KEY could not be read (missing, or no access)' }],
    })
    const sponsorResponse = await fetchWith(overrides, '/rpc', {
      method: 'POST',
      headers: { 'x-api-key': apiKey },
      body: JSON.stringify({ jsonrpc: '2.0', id: 1, method: 'pm_getPaymasterData', params: [rpcUserOperationV07(), entryPoints['0.7'], '0x7a69'] }),
    })
    expect(sponsorResponse.status).toBe(200)
    expect(await sponsorResponse.json()).toMatchObject({ error: { code: -32003, data: { reason: 'signer_unavailable' } } })
    // The signer route tells an API key holder the signer cannot sign, not why.
    const signerResponse = await fetchWith(overrides, '/api/v1/paymaster/signer', { headers: { 'x-api-key': apiKey } })
    expect(await signerResponse.json()).toEqual({ signers: [{ chainId: 31337, kind: 'secrets-store', name: 'primary', securityLevel: 'edge-secret', address: null }] })
    // REST: the caller learns which signer failed; the binding's name and why are in the Worker's log only.
    const log = vi.spyOn(console, 'log')
    const restResponse = await fetchWith(overrides, '/api/v1/paymaster/sponsor', {
      method: 'POST',
      headers: { 'x-api-key': apiKey, 'content-type': 'application/json' },
      body: JSON.stringify({ userOperation: rpcUserOperationV07(), entryPoint: entryPoints['0.7'], chainId: 31337 }),
    })
    expect(restResponse.status).toBe(503)
    expect(await restResponse.json()).toEqual({
      error: { code: 'signer_unavailable', message: 'signer unavailable: signer primary could not sign', data: { reason: 'signer_unavailable', signer: 'primary', retryable: false } },
    })
    const logged = log.mock.calls.map(([line]) => JSON.parse(String(line)) as Record<string, unknown>).find((entry) => entry.event === 'request_failed')
    expect(logged).toMatchObject({ path: '/api/v1/paymaster/sponsor', errorKind: 'signer_unavailable', detail: 'Secrets Store secret behind binding PAYMASTER_KEY could not be read (missing, or no access)' })
    log.mockRestore()
  })

  it('with no OPERATOR_KEYS set, no one reads /health\u2019s details over HTTP; nor with an operator key in the query, nor without API keys outside development', async () => {
    for (const key of [operatorKey, apiKey]) {
      const health = await fetchWith({ OPERATOR_KEYS: undefined }, '/health', { headers: { 'x-api-key': key } })
      expect(await health.json()).toEqual({ status: 'ok' })
    }
    expect(await (await fetchWith({}, `/health?apiKey=${operatorKey}`)).json()).toEqual({ status: 'ok' })
    const config = JSON.parse((env as unknown as { PAYMASTER_CONFIG: string }).PAYMASTER_CONFIG) as { policy: Record<string, unknown> }
    const keyless = JSON.stringify({ ...config, policy: { ...config.policy, apiKeys: { required: false } } })
    expect(await (await fetchWith({ PAYMASTER_CONFIG: keyless })).json()).toEqual({ status: 'ok' })
    expect(await (await fetchWith({ PAYMASTER_CONFIG: keyless }, '/health', { headers: { 'x-api-key': operatorKey } })).json()).toMatchObject({ status: 'ok', signers: [{ ok: true }] })
  })

  it('a malformed secret is reported without echoing its value', async () => {
    const health = await fetchWith({ PAYMASTER_KEY: { get: async () => 'hunter2-not-a-key' } }, '/health', { headers: { 'x-api-key': operatorKey } })
    const text = await health.text()
    expect(text).toContain('is not a 32-byte hex private key')
    expect(text).not.toContain('hunter2')
  })
})
