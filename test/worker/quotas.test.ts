import { env } from 'cloudflare:workers'
import { runDurableObjectAlarm, runInDurableObject } from 'cloudflare:test'
import { beforeAll, describe, expect, it, vi } from 'vitest'
import type { Address } from 'viem'
import { generatePrivateKey, privateKeyToAddress } from 'viem/accounts'
import { app } from '../../worker/app.js'
import { DurableObjectQuotas } from '../../worker/quotas/durableObjectQuotas.js'
import { SponsorshipQuota } from '../../worker/quotas/sponsorshipQuota.js'
import { rpcUserOperationV06, rpcUserOperationV07 } from '../support/userOperations.js'
import { apiKey, entryPoints, operatorKey, postWith, request, seedSignerKey, withPolicy, withQuotas } from './helpers.js'

/**
 * Quotas against the real SponsorshipQuota Durable Object in workerd (SQLite storage). Each test sponsors for senders
 * of its own, so the counts of one test never meet another's.
 */

const bindings = env as unknown as Record<string, unknown> & { PAYMASTER_CONFIG: string; QUOTAS: DurableObjectNamespace<SponsorshipQuota> }

async function getPaymasterData(bindingsWithConfig: Record<string, unknown>, sender: Address, key = apiKey) {
  const response = await postWith(bindingsWithConfig, '/rpc', request('pm_getPaymasterData', [rpcUserOperationV07({ sender }), entryPoints['0.7'], '0x7a69']), key)
  return (await response.json()) as { result?: { paymasterData: string }; error?: { code: number; message: string; data: Record<string, unknown> } }
}

async function stubData(bindingsWithConfig: Record<string, unknown>, sender: Address, key = apiKey) {
  const response = await postWith(bindingsWithConfig, '/rpc', request('pm_getPaymasterStubData', [rpcUserOperationV07({ sender }), entryPoints['0.7'], '0x7a69', null]), key)
  return (await response.json()) as { result?: { paymaster: string }; error?: { code: number; message: string; data: Record<string, unknown> } }
}

/** A namespace whose every object fails, as an overloaded Durable Object does. */
const overloaded = { idFromName: (name: string) => name, get: () => ({ ask: () => Promise.reject(new Error('Durable Object is overloaded')) }) }

const newSender = () => privateKeyToAddress(generatePrivateKey())

function senderQuota(sender: Address) {
  return bindings.QUOTAS.get(bindings.QUOTAS.idFromName(`sender:31337:${sender.toLowerCase()}`))
}

/** The tables in a quota object's storage: none until it has counted something. */
function tablesOf(stub: DurableObjectStub<SponsorshipQuota>) {
  return runInDurableObject(stub, (_instance, state) =>
    state.storage.sql.exec<{ name: string }>("SELECT name FROM sqlite_master WHERE type = 'table' AND name IN ('buckets', 'retention')").toArray().map((row) => row.name).sort(),
  )
}

beforeAll(async () => {
  await seedSignerKey()
})

describe('quotas', () => {
  it('counts each sender\u2019s signed sponsorships and declines past the limit, saying when one more fits', async () => {
    const config = withQuotas([{ per: 'sender', windowSeconds: 3_600, maxOperations: 2 }])
    const [sender, other] = [newSender(), newSender()]
    expect((await getPaymasterData(config, sender)).result).toBeDefined()
    expect((await getPaymasterData(config, sender)).result).toBeDefined()
    const third = await getPaymasterData(config, sender)
    expect(third.error).toMatchObject({
      code: -32002,
      message: expect.stringContaining(`sender ${sender} has had its 2 sponsored operations per 3600 s on chain 31337; one more fits in `),
      data: { reason: 'quota_exceeded', per: 'sender', windowSeconds: 3_600, limit: 'maxOperations', max: '2', used: '2' },
    })
    const retryAfter = third.error!.data.retryAfterSeconds as number
    // Counted to the second: a sponsorship leaves the window when the whole second it was signed in has.
    expect(retryAfter).toBeGreaterThan(3_590)
    expect(retryAfter).toBeLessThanOrEqual(3_601)
    // Stub data says so already, before the wallet estimates gas for an operation that would not be sponsored.
    expect(await stubData(config, sender)).toMatchObject({ error: { code: -32002, data: { reason: 'quota_exceeded', per: 'sender', used: '2' } } })
    // Another sender has a quota of its own; stub data is not a sponsorship and is never counted.
    expect((await getPaymasterData(config, other)).result).toBeDefined()
    for (let i = 0; i < 3; i++) expect(await stubData(config, other)).toMatchObject({ result: { paymaster: expect.any(String) } })
    expect((await getPaymasterData(config, other)).result).toBeDefined()
    expect((await getPaymasterData(config, other)).error).toMatchObject({ data: { reason: 'quota_exceeded' } })
  })

  it('counts pm_sponsorUserOperation and REST alike; REST answers 429 with Retry-After, and the dry run counts nothing', async () => {
    const config = withQuotas([{ per: 'sender', windowSeconds: 600, maxOperations: 2 }])
    const sender = newSender()
    const body = { userOperation: rpcUserOperationV06({ sender }), entryPoint: entryPoints['0.6'], chainId: 31337 }
    for (let i = 0; i < 3; i++) {
      const dryRun = await postWith(config, '/api/v1/paymaster/process', body)
      expect(await dryRun.json()).toMatchObject({ decision: 'sponsor' })
    }
    // Asking stores nothing: made-up senders cost no storage.
    expect(await tablesOf(senderQuota(sender))).toEqual([])
    const sponsored = await postWith(config, '/rpc', request('pm_sponsorUserOperation', [rpcUserOperationV06({ sender }), entryPoints['0.6']]))
    expect(await sponsored.json()).toMatchObject({ result: { paymasterAndData: expect.any(String) } })
    expect((await postWith(config, '/api/v1/paymaster/sponsor', body)).status).toBe(200)

    const declined = await postWith(config, '/api/v1/paymaster/sponsor', body)
    expect(declined.status).toBe(429)
    const { error } = (await declined.json()) as { error: { code: string; data: { retryAfterSeconds: number } } }
    expect(error).toMatchObject({ code: 'quota_exceeded', data: { reason: 'quota_exceeded', per: 'sender', max: '2', used: '2' } })
    expect(declined.headers.get('retry-after')).toBe(String(error.data.retryAfterSeconds))
    // The dry run now says what signing would.
    expect(await (await postWith(config, '/api/v1/paymaster/process', body)).json()).toMatchObject({ decision: 'decline', reason: 'quota_exceeded' })
  })

  it('counts each API key\u2019s summed maximum cost, one key apart from another', async () => {
    const sender = newSender()
    const dryRun = await postWith(withQuotas([]), '/api/v1/paymaster/process', { userOperation: rpcUserOperationV07({ sender }), entryPoint: entryPoints['0.7'], chainId: 31337 })
    const cost = BigInt(((await dryRun.json()) as { maxCostWei: string }).maxCostWei)
    // Room for two operations and a half: the third is declined by cost.
    const config = withQuotas([{ per: 'apiKey', windowSeconds: 86_400, maxCostWei: String(cost * 2n + cost / 2n) }])
    // Keys of their own, so that no other test's sponsorships count against them.
    const keys = { ...config, API_KEYS: `${apiKey}, quota-key-a-${crypto.randomUUID()}, quota-key-b-${crypto.randomUUID()}` }
    const [, keyA, keyB] = keys.API_KEYS.split(', ') as [string, string, string]
    expect((await getPaymasterData(keys, newSender(), keyA)).result).toBeDefined()
    expect((await getPaymasterData(keys, newSender(), keyA)).result).toBeDefined()
    const third = await getPaymasterData(keys, newSender(), keyA)
    expect(third.error).toMatchObject({
      code: -32002,
      message: `this API key has had ${cost * 2n} wei of its ${cost * 2n + cost / 2n} wei of sponsorship per 86400 s on chain 31337, and this operation may cost ${cost} wei; one more fits in ${third.error?.data.retryAfterSeconds} s`,
      data: { reason: 'quota_exceeded', per: 'apiKey', limit: 'maxCostWei', used: String(cost * 2n), value: String(cost) },
    })
    expect((await getPaymasterData(keys, newSender(), keyB)).result).toBeDefined()
    // An operation that alone costs more than the quota never fits.
    const tight = { ...keys, PAYMASTER_CONFIG: withQuotas([{ per: 'apiKey', windowSeconds: 60, maxCostWei: String(cost - 1n) }]).PAYMASTER_CONFIG }
    expect((await getPaymasterData(tight, newSender(), keyB)).error).toMatchObject({
      message: `this operation alone may cost ${cost} wei, more than the quota of ${cost - 1n} wei per 60 s on chain 31337 for this API key`,
      data: { retryAfterSeconds: null },
    })
  })

  it('declines stub data for an API key with nothing left, whatever the operation will cost', async () => {
    const sender = newSender()
    const stubOf = (bindingsWithConfig: Record<string, unknown>, key: string) => stubData(bindingsWithConfig, sender, key)
    const dryRun = await postWith(withQuotas([]), '/api/v1/paymaster/process', { userOperation: rpcUserOperationV07({ sender }), entryPoint: entryPoints['0.7'], chainId: 31337 })
    const cost = BigInt(((await dryRun.json()) as { maxCostWei: string }).maxCostWei)
    const byCost = withQuotas([{ per: 'apiKey', windowSeconds: 60, maxCostWei: String(cost + 1n) }])
    const keys = { ...byCost, API_KEYS: `${apiKey}, quota-key-c-${crypto.randomUUID()}` }
    const [, key] = keys.API_KEYS.split(', ') as [string, string]
    expect((await getPaymasterData(keys, sender, key)).result).toBeDefined()
    // One wei is left: the stub cannot know the cost yet, so it is given, and signing declines.
    expect((await stubOf(keys, key)).result).toBeDefined()
    expect((await getPaymasterData(keys, sender, key)).error).toMatchObject({ data: { reason: 'quota_exceeded', limit: 'maxCostWei' } })
    // Nothing left: the stub is declined too.
    const exact = { ...keys, PAYMASTER_CONFIG: withQuotas([{ per: 'apiKey', windowSeconds: 60, maxCostWei: String(cost) }]).PAYMASTER_CONFIG }
    const declined = await stubOf(exact, key)
    expect(declined.error).toMatchObject({
      message: `this API key has had ${cost} wei of its ${cost} wei of sponsorship per 60 s on chain 31337, and nothing is left; some is freed in ${declined.error?.data.retryAfterSeconds} s`,
      data: { reason: 'quota_exceeded', per: 'apiKey', limit: 'maxCostWei', used: String(cost) },
    })
    expect(declined.error?.data).not.toHaveProperty('value')
    // Another key's stub is its own.
    expect((await stubOf(exact, apiKey)).result).toBeDefined()
    // A quota of nothing sponsors nothing.
    const none = { ...keys, PAYMASTER_CONFIG: withQuotas([{ per: 'apiKey', windowSeconds: 60, maxCostWei: '0' }]).PAYMASTER_CONFIG }
    expect((await stubOf(none, apiKey)).error).toMatchObject({
      message: 'the quota of 0 wei per 60 s on chain 31337 for this API key sponsors nothing',
      data: { retryAfterSeconds: null },
    })
  })

  it('takes back what was counted for a sponsorship that was not signed', async () => {
    const sender = newSender()
    const failingSigner = withQuotas([{ per: 'sender', windowSeconds: 3_600, maxOperations: 1 }], { PAYMASTER_KEY: bindings.NEVER_CREATED_KEY })
    for (let i = 0; i < 2; i++) expect((await getPaymasterData(failingSigner, sender)).error).toMatchObject({ data: { reason: 'signer_unavailable' } })
    const config = withQuotas([{ per: 'sender', windowSeconds: 3_600, maxOperations: 1 }])
    expect((await getPaymasterData(config, sender)).result).toBeDefined()
    expect((await getPaymasterData(config, sender)).error).toMatchObject({ data: { reason: 'quota_exceeded' } })
  })

  it('lets a sponsorship through again once the oldest has left the window, and keeps what a longer window still counts', async () => {
    const hour = withQuotas([{ per: 'sender', windowSeconds: 3_600, maxOperations: 2 }])
    const second = withQuotas([{ per: 'sender', windowSeconds: 1, maxOperations: 1 }])
    const [sender, alone] = [newSender(), newSender()]
    expect((await getPaymasterData(hour, sender)).result).toBeDefined()
    expect((await getPaymasterData(second, alone)).result).toBeDefined()
    const declined = await getPaymasterData(second, sender)
    expect(declined.error).toMatchObject({ data: { reason: 'quota_exceeded' } })
    const retryAfterSeconds = declined.error!.data.retryAfterSeconds as number
    expect(retryAfterSeconds).toBeGreaterThanOrEqual(1)
    expect(retryAfterSeconds).toBeLessThanOrEqual(2)
    await new Promise((resolve) => setTimeout(resolve, retryAfterSeconds * 1000))
    expect((await getPaymasterData(second, sender)).result).toBeDefined()
    // The one-second window let it through, but kept the first count for the hour's (a deployment with the longer
    // window may still be serving): the hour has had its two.
    expect((await getPaymasterData(hour, sender)).error).toMatchObject({ data: { reason: 'quota_exceeded', used: '2' } })

    // Storage is emptied once nothing kept is needed: not before its time for the sender the hour counts (its alarm
    // is set for then), and soon for the one only ever counted by the second.
    const counted = senderQuota(sender)
    expect(await runDurableObjectAlarm(counted)).toBe(true)
    expect(await tablesOf(counted)).toEqual(['buckets', 'retention'])
    expect(await runInDurableObject(counted, (_instance, state) => state.storage.getAlarm())).toBeGreaterThan(Date.now() + 3_590_000)
    // Its alarm is due once its count has left the second's window; it may have fired on its own by then.
    const aloneQuota = senderQuota(alone)
    const due = await runInDurableObject(aloneQuota, (_instance, state) => state.storage.getAlarm())
    if (due !== null) {
      await new Promise((resolve) => setTimeout(resolve, Math.max(0, due - Date.now()) + 10))
      await runDurableObjectAlarm(aloneQuota)
    }
    expect(await tablesOf(aloneQuota)).toEqual([])
    expect((await getPaymasterData(second, alone)).result).toBeDefined()
  })

  it('takes the last of a quota once, however many requests arrive together', async () => {
    const config = withQuotas([{ per: 'sender', windowSeconds: 3_600, maxOperations: 2 }])
    const sender = newSender()
    const batch = Array.from({ length: 6 }, (_, id) => request('pm_getPaymasterData', [rpcUserOperationV07({ sender, nonce: `0x${id}` }), entryPoints['0.7'], '0x7a69'], id))
    const [first, second] = await Promise.all([postWith(config, '/rpc', batch.slice(0, 3)), postWith(config, '/rpc', batch.slice(3))])
    const answers = [...((await first.json()) as Array<{ result?: unknown; error?: { data: { reason: string } } }>), ...((await second.json()) as [])]
    expect(answers.filter((answer) => answer.result !== undefined)).toHaveLength(2)
    expect(answers.filter((answer) => answer.error?.data.reason === 'quota_exceeded')).toHaveLength(4)
  })

  it('takes back one subject’s count when the other says no, or cannot be reached', async () => {
    const sender = newSender()
    const keys = { API_KEYS: `${apiKey}, quota-key-c-${crypto.randomUUID()}, quota-key-d-${crypto.randomUUID()}` }
    const [, keyC, keyD] = keys.API_KEYS.split(', ') as [string, string, string]
    const config = withQuotas(
      [
        { per: 'sender', windowSeconds: 3_600, maxOperations: 2 },
        { per: 'apiKey', windowSeconds: 3_600, maxOperations: 1 },
      ],
      keys,
    )
    expect((await getPaymasterData(config, sender, keyC)).result).toBeDefined()
    // The key says no; the sender had counted it, and takes it back.
    expect((await getPaymasterData(config, sender, keyC)).error).toMatchObject({ data: { reason: 'quota_exceeded', per: 'apiKey' } })
    // The key's object cannot be reached; the sender takes its count back too.
    const keysUnreachable = {
      idFromName: (name: string) => (name.startsWith('apiKey:') ? undefined : bindings.QUOTAS.idFromName(name)),
      get: (id: DurableObjectId | undefined) => {
        if (id === undefined) throw new Error('no such Durable Object')
        return bindings.QUOTAS.get(id)
      },
    }
    expect((await getPaymasterData({ ...config, QUOTAS: keysUnreachable }, sender, keyD)).error).toMatchObject({ data: { reason: 'quota_unavailable' } })
    // So the sender has had one of its two.
    expect((await getPaymasterData(config, sender, keyD)).result).toBeDefined()
    expect((await getPaymasterData(config, sender, apiKey)).error).toMatchObject({ data: { reason: 'quota_exceeded', per: 'sender' } })
  })

  it('keeps its counts in the Durable Object\u2019s storage, where a new instance reads them', async () => {
    const config = withQuotas([{ per: 'sender', windowSeconds: 3_600, maxOperations: 2 }])
    const sender = newSender()
    expect((await getPaymasterData(config, sender)).result).toBeDefined()
    expect((await getPaymasterData(config, sender)).result).toBeDefined()
    // A longer window only asked with (a dry run) is stored at once: a restart must not prune for the shorter one.
    const longer = withQuotas([{ per: 'sender', windowSeconds: 7_200, maxOperations: 5 }])
    const body = { userOperation: rpcUserOperationV07({ sender }), entryPoint: entryPoints['0.7'], chainId: 31337 }
    expect(await (await postWith(longer, '/api/v1/paymaster/process', body)).json()).toMatchObject({ decision: 'sponsor' })
    await runInDurableObject(senderQuota(sender), async (_instance, state) => {
      const rows = state.storage.sql.exec<{ operations: number }>('SELECT operations FROM buckets').toArray()
      expect(rows.reduce((sum, row) => sum + row.operations, 0)).toBe(2)
      expect(state.storage.sql.exec('SELECT retain_ms FROM retention').toArray()).toEqual([{ retain_ms: 7_200_000 }])
      // What a restarted instance would do: build its ledger from storage.
      const restarted = new SponsorshipQuota(state, env)
      expect(await restarted.ask({ limits: [{ windowSeconds: 3_600, maxOperations: 2 }], costWei: '1', count: false })).toMatchObject({ granted: false, usedOperations: 2 })
      expect(await restarted.ask({ limits: [{ windowSeconds: 3_600, maxOperations: 3 }], costWei: '1', count: false })).toEqual({ granted: true })
    })
  })

  it('names the limit that never fits when two subjects say no', async () => {
    const sender = newSender()
    const dryRun = await postWith(withQuotas([]), '/api/v1/paymaster/process', { userOperation: rpcUserOperationV07({ sender }), entryPoint: entryPoints['0.7'], chainId: 31337 })
    const cost = BigInt(((await dryRun.json()) as { maxCostWei: string }).maxCostWei)
    const senderLimit = { per: 'sender', windowSeconds: 3_600, maxOperations: 1 }
    const key = `quota-key-e-${crypto.randomUUID()}`
    const keys = { API_KEYS: `${apiKey}, ${key}` }
    expect((await getPaymasterData(withQuotas([senderLimit], keys), sender, key)).result).toBeDefined()
    const both = withQuotas([senderLimit, { per: 'apiKey', windowSeconds: 60, maxCostWei: String(cost - 1n) }], keys)
    expect((await getPaymasterData(both, sender, key)).error).toMatchObject({
      message: `this operation alone may cost ${cost} wei, more than the quota of ${cost - 1n} wei per 60 s on chain 31337 for this API key`,
      data: { per: 'apiKey', limit: 'maxCostWei', retryAfterSeconds: null },
    })
  })

  it('stores a busy subject\u2019s counts merged, once it has many', async () => {
    // 5,000 seconds of counts, one a second, the newest a second ago: as many requests would leave them.
    const stub = senderQuota(newSender())
    expect((await stub.ask({ limits: [{ windowSeconds: 86_400, maxOperations: 100_000 }], costWei: '1', count: true })).granted).toBe(true)
    const merged = await runInDurableObject(stub, async (_instance, state) => {
      const newest = Math.floor(Date.now() / 1000) - 1
      state.storage.sql.exec('DELETE FROM buckets')
      for (let second = newest - 4_999; second <= newest; second++) {
        state.storage.sql.exec('INSERT INTO buckets (second, seconds, operations, cost_wei) VALUES (?, 1, 1, ?)', second, '2')
      }
      const restarted = new SponsorshipQuota(state, env)
      const limits = [{ windowSeconds: 60, maxOperations: 1_000 }, { windowSeconds: 86_400, maxOperations: 100_000 }]
      expect(await restarted.ask({ limits, costWei: '1', count: false })).toEqual({ granted: true })
      const rows = state.storage.sql.exec<{ seconds: number; operations: number; cost_wei: string }>('SELECT seconds, operations, cost_wei FROM buckets').toArray()
      // Still every count, and what the day counts to this day.
      expect(await restarted.ask({ limits: [{ windowSeconds: 86_400, maxOperations: 5_000 }], costWei: '1', count: false })).toMatchObject({ granted: false, usedOperations: 5_000, usedCostWei: '10000' })
      return rows
    })
    expect(merged.length).toBeLessThan(60 + 5_000 / 24 + 2)
    expect(merged.reduce((sum, row) => sum + row.operations, 0)).toBe(5_000)
    expect(Math.max(...merged.map((row) => row.seconds))).toBe(24)
  })

  it('reports on /health whether a quota object can be reached, storing nothing to find out', async () => {
    const healthOf = async (workerBindings: Record<string, unknown>, key: string | undefined = operatorKey) => {
      const response = await app.fetch(new Request('http://paymaster.test/health', { headers: key ? { 'x-api-key': key } : {} }), workerBindings)
      return { status: response.status, body: (await response.json()) as { status: string; quotas?: Record<string, unknown> } }
    }
    const limits = [{ per: 'sender', windowSeconds: 60, maxOperations: 5 }]
    const reachable = await healthOf(withQuotas(limits))
    expect(reachable.status).toBe(200)
    expect(reachable.body.quotas).toEqual({ ok: true, ms: expect.any(Number) })
    const probed = bindings.QUOTAS.get(bindings.QUOTAS.idFromName('health'))
    expect(await tablesOf(probed)).toEqual([])
    expect(await runInDurableObject(probed, (_instance, state) => state.storage.getAlarm())).toBeNull()

    // Nothing can be signed meanwhile, so the service is unavailable: to operators, and to anyone else.
    const down = withQuotas(limits, { QUOTAS: overloaded })
    expect(await healthOf(down)).toMatchObject({
      status: 503,
      body: { status: 'unavailable', quotas: { ok: false, error: 'a quota object cannot be reached: Durable Object is overloaded' } },
    })
    expect(await healthOf(down, apiKey)).toEqual({ status: 503, body: { status: 'unavailable' } })
    expect((await healthOf(withQuotas([]))).body).not.toHaveProperty('quotas')
  })

  it('waits for a quota object no longer than its timeouts where it only advises: /health and stub data', async () => {
    const asked: string[] = []
    const hanging = {
      idFromName: (name: string) => name,
      get: (name: string) => ({
        ask: () => {
          asked.push(name)
          return new Promise(() => {})
        },
      }),
    } as unknown as DurableObjectNamespace<SponsorshipQuota>
    const lines: Array<Record<string, unknown>> = []
    const quotas = new DurableObjectQuotas({
      namespace: hanging,
      limits: [{ per: 'sender', windowSeconds: 60, maxOperations: 5 }],
      log: (fields) => lines.push(fields),
      timeouts: { healthMs: 30, adviceMs: 20 },
    })
    expect(await quotas.health()).toEqual({ ok: false, error: 'a quota object cannot be reached: no answer within 30 ms' })
    const sender = newSender()
    await expect(quotas.advise({ chainId: 31337, sender, apiKeyId: undefined, costWei: undefined })).resolves.toBeUndefined()
    expect(asked).toEqual(['health', `sender:31337:${sender.toLowerCase()}`])
    expect(lines).toEqual([{ level: 'warn', event: 'quota_unavailable', advisory: true, message: 'no answer within 20 ms' }])
  })

  it('signs nothing when the counts cannot be reached, and says so', async () => {
    const log = vi.spyOn(console, 'log')
    const config = withQuotas([{ per: 'sender', windowSeconds: 60, maxOperations: 5 }], { QUOTAS: overloaded })
    // Stub data's check is advice only: signing checks again, so the stub is given.
    expect(await stubData(config, newSender())).toMatchObject({ result: { paymaster: expect.any(String) } })
    const answer = await getPaymasterData(config, newSender())
    expect(answer.error).toEqual({
      code: -32603,
      message: 'the sponsorship quotas cannot be checked right now, so nothing was signed; try again shortly',
      data: { reason: 'quota_unavailable' },
    })
    const rest = await postWith(config, '/api/v1/paymaster/sponsor', { userOperation: rpcUserOperationV07(), entryPoint: entryPoints['0.7'], chainId: 31337 })
    expect(rest.status).toBe(503)
    const lines = log.mock.calls.map(([line]) => JSON.parse(String(line)) as Record<string, unknown>)
    expect(lines.filter((line) => line.event === 'sponsorship')).toEqual([])
    // The stub's, a warning only, and the two signing requests'.
    expect(lines.filter((line) => line.event === 'quota_unavailable')).toEqual([
      expect.objectContaining({ level: 'warn', advisory: true, message: 'Durable Object is overloaded' }),
      ...Array(2).fill(expect.objectContaining({ level: 'error', message: 'Durable Object is overloaded' })),
    ])
    log.mockRestore()
  })

  it('refuses a configuration whose quota binding is not a Durable Object namespace, or that counts per API key without keys', async () => {
    const unbound = await postWith(withQuotas([{ per: 'sender', windowSeconds: 60, maxOperations: 5 }], { QUOTAS: undefined }), '/rpc', request('eth_chainId', []))
    expect(unbound.status).toBe(500)
    expect(JSON.stringify(await unbound.json())).toContain(
      'policy.quotas.binding: QUOTAS is not a Durable Object namespace (bind class SponsorshipQuota under that name in wrangler.toml)',
    )
    const keyless = withPolicy({ apiKeys: { required: false }, quotas: { limits: [{ per: 'apiKey', windowSeconds: 60, maxOperations: 5 }] } })
    const refused = await postWith(keyless, '/rpc', request('eth_chainId', []))
    expect(JSON.stringify(await refused.json())).toContain('policy.quotas.limits.0.per: counting per API key needs policy.apiKeys.required')
  })
})
