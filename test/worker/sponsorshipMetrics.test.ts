import { env } from 'cloudflare:workers'
import { beforeAll, describe, expect, it, vi } from 'vitest'
import { generatePrivateKey, privateKeyToAddress } from 'viem/accounts'
import { app } from '../../worker/app.js'
import { rpcUserOperationV07 } from '../support/userOperations.js'
import { apiKey, entryPoints, postWith, request, seedSignerKey, withPolicy } from './helpers.js'

/** `/metrics`' sponsorship counters, in workerd, for requests that end every way a caller can see. */

const newSender = () => privateKeyToAddress(generatePrivateKey())
const deniedSender = newSender()

/** Bindings with a config (and so services and counters) of their own. */
function freshBindings(extra: Record<string, unknown> = {}) {
  return withPolicy({ quotas: { limits: [{ per: 'sender', windowSeconds: 3_600, maxOperations: 2 }] }, senders: { deny: [deniedSender] } }, extra)
}

async function metricsText(workerBindings: Record<string, unknown>): Promise<string> {
  const response = await app.fetch(new Request('http://paymaster.test/metrics', { headers: { 'x-api-key': apiKey } }), workerBindings)
  expect(response.status).toBe(200)
  return response.text()
}

async function sponsorshipLines(workerBindings: Record<string, unknown>): Promise<string[]> {
  return (await metricsText(workerBindings)).split('\n').filter((line) => line.startsWith('paymaster_spons')).sort()
}

const erc7677 = (method: string, sender: string, chainId = '0x7a69') => request(method, [rpcUserOperationV07({ sender }), entryPoints['0.7'], chainId, null])

async function rpcAnswer(workerBindings: Record<string, unknown>, body: unknown) {
  return (await postWith(workerBindings, '/rpc', body)).json()
}

beforeAll(async () => {
  await seedSignerKey()
})

describe('sponsorship metrics', () => {
  it('count stub data, dry runs and signatures by chain, outcome and reason, and the maximum cost signed', async () => {
    const workerBindings = freshBindings()
    const sender = newSender()
    const body = { userOperation: rpcUserOperationV07({ sender }), entryPoint: entryPoints['0.7'], chainId: 31337 }
    const dryRun = (await (await postWith(workerBindings, '/api/v1/paymaster/process', body)).json()) as { maxCostWei: string }
    const cost = BigInt(dryRun.maxCostWei)

    expect(await rpcAnswer(workerBindings, erc7677('pm_getPaymasterStubData', sender))).toHaveProperty('result')
    const log = vi.spyOn(console, 'log')
    try {
      for (let i = 0; i < 2; i++) expect(await rpcAnswer(workerBindings, erc7677('pm_getPaymasterData', sender))).toHaveProperty('result')
      // Each sponsorship's log line carries what it put at stake, for sums over the fleet's logs.
      const lines = log.mock.calls.map(([line]) => JSON.parse(String(line)) as Record<string, unknown>).filter((line) => line.event === 'sponsorship')
      expect(lines).toEqual([expect.objectContaining({ sender, maxCostWei: String(cost) }), expect.objectContaining({ sender, maxCostWei: String(cost) })])
    } finally {
      log.mockRestore()
    }
    // Declined by the quota: signing, stub data and the dry run.
    expect(await rpcAnswer(workerBindings, erc7677('pm_getPaymasterData', sender))).toMatchObject({ error: { code: -32002 } })
    expect(await rpcAnswer(workerBindings, erc7677('pm_getPaymasterStubData', sender))).toMatchObject({ error: { code: -32002 } })
    expect(await (await postWith(workerBindings, '/api/v1/paymaster/process', body)).json()).toMatchObject({ decision: 'decline' })
    // Declined by policy.
    expect(await rpcAnswer(workerBindings, erc7677('pm_getPaymasterData', deniedSender))).toMatchObject({ error: { data: { reason: 'sender_denied' } } })
    // A UserOperation that is not one for its EntryPoint.
    const malformed = request('pm_getPaymasterData', [{ ...rpcUserOperationV07({ sender }), nonce: 'none' }, entryPoints['0.7'], '0x7a69', null])
    expect(await rpcAnswer(workerBindings, malformed)).toMatchObject({ error: { code: -32602 } })
    // A chain not served is counted as `other`, whatever its id: callers do not grow the label space.
    for (const chainId of ['0x5', '0x6']) {
      expect(await rpcAnswer(workerBindings, erc7677('pm_getPaymasterData', sender, chainId))).toMatchObject({ error: { code: -32602 } })
    }
    // Params that do not parse never become a sponsorship request.
    expect(await rpcAnswer(workerBindings, request('pm_getPaymasterData', ['not an operation']))).toMatchObject({ error: { code: -32602 } })

    expect(await sponsorshipLines(workerBindings)).toEqual(
      [
        'paymaster_sponsorship_requests_total{request="dry_run",chain_id="31337",outcome="sponsored"} 1',
        'paymaster_sponsorship_requests_total{request="dry_run",chain_id="31337",outcome="declined",reason="quota_exceeded"} 1',
        'paymaster_sponsorship_requests_total{request="stub",chain_id="31337",outcome="sponsored"} 1',
        'paymaster_sponsorship_requests_total{request="stub",chain_id="31337",outcome="declined",reason="quota_exceeded"} 1',
        'paymaster_sponsorship_requests_total{request="sign",chain_id="31337",outcome="sponsored"} 2',
        'paymaster_sponsorship_requests_total{request="sign",chain_id="31337",outcome="declined",reason="quota_exceeded"} 1',
        'paymaster_sponsorship_requests_total{request="sign",chain_id="31337",outcome="declined",reason="sender_denied"} 1',
        'paymaster_sponsorship_requests_total{request="sign",chain_id="31337",outcome="error",reason="invalid_params"} 1',
        'paymaster_sponsorship_requests_total{request="sign",chain_id="other",outcome="error",reason="unsupported_chain"} 2',
        `paymaster_sponsored_max_cost_wei_total{chain_id="31337"} ${cost * 2n}`,
      ].sort(),
    )
  })

  it('count a signer that fails as an error, and nothing as spent, in well-formed exposition text', async () => {
    const workerBindings = freshBindings({ PAYMASTER_KEY: (env as unknown as Record<string, unknown>).NEVER_CREATED_KEY })
    expect(await rpcAnswer(workerBindings, erc7677('pm_getPaymasterData', newSender()))).toMatchObject({ error: { code: -32003 } })
    const text = await metricsText(workerBindings)
    // Every family has its HELP and TYPE lines, and the text is lines ending in a newline, none empty.
    expect(text.endsWith('\n')).toBe(true)
    const lines = text.slice(0, -1).split('\n')
    expect(lines.every((line) => line.length > 0)).toBe(true)
    const families = lines.filter((line) => line.startsWith('# TYPE ')).map((line) => line.split(' ')[2])
    expect(families).toEqual([
      'paymaster_signer_requests_total',
      'paymaster_signer_latency_ms_sum',
      'paymaster_sponsorship_requests_total',
      'paymaster_sponsored_max_cost_wei_total',
    ])
    expect(lines.filter((line) => line.startsWith('# HELP ')).map((line) => line.split(' ')[2])).toEqual(families)
    expect(lines.filter((line) => line.startsWith('paymaster_spons'))).toEqual([
      'paymaster_sponsorship_requests_total{request="sign",chain_id="31337",outcome="error",reason="signer_unavailable"} 1',
    ])
  })
})
