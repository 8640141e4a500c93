import { env } from 'cloudflare:workers'
import { beforeAll, describe, expect, it, vi } from 'vitest'
import { generatePrivateKey, privateKeyToAddress } from 'viem/accounts'
import { app } from '../../worker/app.js'
import { rpcUserOperationV07 } from '../support/userOperations.js'
import { apiKey, entryPoints, postWith, request, seedSignerKey } from './helpers.js'

/** `/metrics`' sponsorship counters, in workerd, for requests that end every way a caller can see. */

const bindings = env as unknown as Record<string, unknown> & { PAYMASTER_CONFIG: string }
const baseConfig = JSON.parse(bindings.PAYMASTER_CONFIG) as { policy: Record<string, unknown> }

/** Bindings with a config (and so services and counters) of their own. */
function freshBindings(extra: Record<string, unknown> = {}) {
  const quotas = { limits: [{ per: 'sender', windowSeconds: 3_600, maxOperations: 2 }] }
  return { ...bindings, ...extra, PAYMASTER_CONFIG: JSON.stringify({ ...baseConfig, policy: { ...baseConfig.policy, quotas } }) }
}

async function metricsOf(workerBindings: Record<string, unknown>): Promise<string[]> {
  const response = await app.fetch(new Request('http://paymaster.test/metrics', { headers: { 'x-api-key': apiKey } }), workerBindings)
  expect(response.status).toBe(200)
  return (await response.text()).split('\n').filter((line) => line.startsWith('paymaster_spons'))
}

const erc7677 = (method: string, sender: string, chainId = '0x7a69') => request(method, [rpcUserOperationV07({ sender }), entryPoints['0.7'], chainId, null])

beforeAll(async () => {
  await seedSignerKey()
})

describe('sponsorship metrics', () => {
  it('count stub data, dry runs and signatures by chain and outcome, and the maximum cost signed', async () => {
    const workerBindings = freshBindings()
    const sender = privateKeyToAddress(generatePrivateKey())
    const body = { userOperation: rpcUserOperationV07({ sender }), entryPoint: entryPoints['0.7'], chainId: 31337 }
    const dryRun = (await (await postWith(workerBindings, '/api/v1/paymaster/process', body)).json()) as { maxCostWei: string }
    const cost = BigInt(dryRun.maxCostWei)

    expect(await (await postWith(workerBindings, '/rpc', erc7677('pm_getPaymasterStubData', sender))).json()).toHaveProperty('result')
    const log = vi.spyOn(console, 'log')
    try {
      for (let i = 0; i < 2; i++) expect(await (await postWith(workerBindings, '/rpc', erc7677('pm_getPaymasterData', sender))).json()).toHaveProperty('result')
      // Each sponsorship's log line carries what it put at stake, for sums over the fleet's logs.
      const lines = log.mock.calls.map(([line]) => JSON.parse(String(line)) as Record<string, unknown>).filter((line) => line.event === 'sponsorship')
      expect(lines).toEqual([expect.objectContaining({ sender, maxCostWei: String(cost) }), expect.objectContaining({ sender, maxCostWei: String(cost) })])
    } finally {
      log.mockRestore()
    }
    // Declined by the quota, at signing and then at stub data.
    expect(await (await postWith(workerBindings, '/rpc', erc7677('pm_getPaymasterData', sender))).json()).toMatchObject({ error: { code: -32002 } })
    expect(await (await postWith(workerBindings, '/rpc', erc7677('pm_getPaymasterStubData', sender))).json()).toMatchObject({ error: { code: -32002 } })
    // A chain not served is counted as `other`, whatever its id: callers do not grow the label space.
    for (const chainId of ['0x5', '0x6']) {
      expect(await (await postWith(workerBindings, '/rpc', erc7677('pm_getPaymasterData', sender, chainId))).json()).toMatchObject({ error: { code: -32602 } })
    }
    // A request that does not parse never becomes a sponsorship request.
    expect((await postWith(workerBindings, '/rpc', request('pm_getPaymasterData', ['not an operation']))).status).toBe(200)

    expect((await metricsOf(workerBindings)).sort()).toEqual(
      [
        'paymaster_sponsorship_requests_total{request="dry_run",chain_id="31337",outcome="sponsored"} 1',
        'paymaster_sponsorship_requests_total{request="stub",chain_id="31337",outcome="sponsored"} 1',
        'paymaster_sponsorship_requests_total{request="sign",chain_id="31337",outcome="sponsored"} 2',
        'paymaster_sponsorship_requests_total{request="sign",chain_id="31337",outcome="declined",reason="quota_exceeded"} 1',
        'paymaster_sponsorship_requests_total{request="stub",chain_id="31337",outcome="declined",reason="quota_exceeded"} 1',
        'paymaster_sponsorship_requests_total{request="sign",chain_id="other",outcome="error",reason="unsupported_chain"} 2',
        `paymaster_sponsored_max_cost_wei_total{chain_id="31337"} ${cost * 2n}`,
      ].sort(),
    )
  })

  it('count a signer that fails as an error, and nothing as spent', async () => {
    const workerBindings = freshBindings({ PAYMASTER_KEY: bindings.NEVER_CREATED_KEY })
    const sender = privateKeyToAddress(generatePrivateKey())
    expect(await (await postWith(workerBindings, '/rpc', erc7677('pm_getPaymasterData', sender))).json()).toMatchObject({ error: { code: -32003 } })
    expect(await metricsOf(workerBindings)).toEqual([
      'paymaster_sponsorship_requests_total{request="sign",chain_id="31337",outcome="error",reason="signer_unavailable"} 1',
    ])
  })
})
