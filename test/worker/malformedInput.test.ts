import { afterEach, beforeAll, describe, expect, it, vi } from 'vitest'
import { mutated, type Json } from '../support/mutations.js'
import { seededRandom } from '../support/seededRandom.js'
import { rpcUserOperationV06, rpcUserOperationV07 } from '../support/userOperations.js'
import { apiKey, call, entryPoints, request, rpc, seedSignerKey } from './helpers.js'

/**
 * Bad input gets a clear error and harms nothing, over many shapes at once:
 * valid requests with a few fields replaced by values of the wrong type,
 * size or form, or removed. Seeded, so a failing case can be replayed; each
 * failure names its seed and the request.
 */

beforeAll(async () => {
  await seedSignerKey()
})
afterEach(() => {
  vi.restoreAllMocks()
})

const chain = '0x7a69'
const rpcBases: Json[] = [
  request('pm_getPaymasterData', [rpcUserOperationV07(), entryPoints['0.7'], chain, {}]),
  request('pm_getPaymasterStubData', [rpcUserOperationV06(), entryPoints['0.6'], chain]),
  request('pm_sponsorUserOperation', [rpcUserOperationV07(), entryPoints['0.8']]),
  request('pm_getPaymasterData', [rpcUserOperationV06(), entryPoints['0.6'], chain, null]),
  request('eth_chainId', []),
  request('pm_supportedEntryPoints', []),
] as Json[]
const restBase = { userOperation: rpcUserOperationV07(), entryPoint: entryPoints['0.7'], chainId: 31337, context: {} } as unknown as Json

/** What every answer must be: no internal error, no signer failure, a message that says what was wrong, no stack. */
function expectClearAnswer(answer: unknown, where: string) {
  const answers = Array.isArray(answer) ? answer : [answer]
  for (const one of answers as Array<{ jsonrpc?: string; result?: unknown; error?: { code: number; message: string } }>) {
    expect(one.jsonrpc, where).toBe('2.0')
    if (one.error === undefined) {
      expect(one.result, where).toBeDefined()
      continue
    }
    expect([-32700, -32600, -32601, -32602, -32002], where).toContain(one.error.code)
    expect(one.error.message.length, where).toBeGreaterThan(5)
    expect(one.error.message, where).not.toMatch(/\n\s+at /)
  }
}

/** Spies on the console that keep what is logged, printing nothing (thousands of lines would slow the sweep). */
function quietConsole() {
  return (['log', 'warn', 'error'] as const).map((level) => vi.spyOn(console, level).mockImplementation(() => {}))
}

/** Log lines so far: none with a stack trace (a real newline, or one escaped in a JSON line), none at level error. */
function expectCleanLogs(spies: Array<{ mock: { calls: unknown[][] } }>) {
  for (const spy of spies) {
    for (const args of spy.mock.calls) {
      const line = args.map((arg) => (arg instanceof Error ? String(arg.stack) : String(arg))).join(' ')
      expect(line).not.toMatch(/(\n|\\n)\s+at /)
      // Internal errors are logged at level error (app.onError's request_failed, the RPC transport's internal kind).
      expect(line).not.toContain('"level":"error"')
      expect(line).not.toContain('"errorKind":"internal"')
    }
  }
}

describe('malformed input, many shapes (seeded)', () => {
  it('JSON-RPC: every mutated request, single or in a batch, gets a clear error or a result, never an internal one', async () => {
    const spies = quietConsole()
    const seed = 0x7e57
    const random = seededRandom(seed)
    for (let n = 0; n < 300; n++) {
      const base = rpcBases[n % rpcBases.length]!
      const batch = n % 10 === 9
      const valid = { ...(base as Record<string, Json>), id: 'the valid one' }
      const body = batch ? [mutated(base, random), valid, mutated(base, random)] : mutated(base, random)
      const where = `seed ${seed}, case ${n}: ${JSON.stringify(body).slice(0, 400)}`
      const { status, body: answer } = await rpc(body)
      // 204: notifications alone (the id removed), which get no answer.
      expect([200, 204, 400, 413], where).toContain(status)
      if (status === 204) {
        expect(answer, where).toBeUndefined()
        expect((body as { id?: unknown }).id, where).toBeUndefined()
        continue
      }
      expectClearAnswer(answer, where)
      if (batch) {
        // An answer for each request with an id (and for an invalid one without: it cannot be told a notification), the
        // valid one's a result.
        const withId = (body as Array<Record<string, unknown>>).filter((one) => one === null || typeof one !== 'object' || Array.isArray(one) || 'id' in one).length
        expect((answer as unknown[]).length, where).toBeGreaterThanOrEqual(withId)
        expect((answer as unknown[]).length, where).toBeLessThanOrEqual(3)
        expect((answer as Array<{ id: unknown; result?: unknown }>).find((one) => one.id === 'the valid one')?.result, where).toBeDefined()
      }
    }
    expectCleanLogs(spies)
    // And nothing was harmed: a valid request still signs.
    const { body } = await rpc(request('pm_getPaymasterData', [rpcUserOperationV07(), entryPoints['0.7'], chain, {}]))
    expect(body.result.paymasterData).toMatch(/^0x01[0-9a-f]{154}$/)
  })

  it('JSON-RPC: truncated and garbled bodies get -32700', async () => {
    const random = seededRandom(0xb0d1)
    const text = JSON.stringify(rpcBases[0])
    for (let n = 0; n < 60; n++) {
      const cut = 1 + Math.floor(random() * (text.length - 2))
      // Cut short, its object is never closed; a raw control character is JSON nowhere.
      const garbled = n % 2 === 0 ? text.slice(0, cut) : `${text.slice(0, cut)}\u0001${text.slice(cut + 1)}`
      const { status, body } = await rpc(garbled)
      const where = `case ${n}: ${garbled.slice(Math.max(0, cut - 40), cut + 40)}`
      expect(status, where).toBe(400)
      expect(body, where).toEqual({ jsonrpc: '2.0', id: null, error: { code: -32700, message: 'request body is not valid JSON' } })
    }
  })

  it('REST: every mutated sponsorship gets a clear 4xx error or a sponsorship, never a 5xx', async () => {
    const spies = quietConsole()
    const seed = 0x5e57
    const random = seededRandom(seed)
    for (let n = 0; n < 150; n++) {
      const body = mutated(restBase, random)
      const where = `seed ${seed}, case ${n}: ${JSON.stringify(body).slice(0, 400)}`
      const response = await call('/api/v1/paymaster/sponsor', {
        method: 'POST',
        headers: { 'content-type': 'application/json', 'x-api-key': apiKey },
        body: JSON.stringify(body),
      })
      expect([200, 400, 403, 413], where).toContain(response.status)
      const answer = (await response.json()) as { error?: { code: string; message: string }; paymasterAndData?: string; paymasterData?: string }
      if (response.status === 200) {
        expect(answer.error, where).toBeUndefined()
        expect(answer.paymasterData ?? answer.paymasterAndData, where).toMatch(/^0x[0-9a-f]+$/)
        continue
      }
      expect(answer.error?.message.length, where).toBeGreaterThan(5)
      expect(answer.error?.message, where).not.toMatch(/\n\s+at /)
    }
    expectCleanLogs(spies)
    const valid = await call('/api/v1/paymaster/sponsor', { method: 'POST', headers: { 'content-type': 'application/json', 'x-api-key': apiKey }, body: JSON.stringify(restBase) })
    expect(valid.status).toBe(200)
  })
})
