import { randomBytes } from 'node:crypto'
import { afterAll, describe, expect, it } from 'vitest'
import { SignEngine } from '../../enclave-origin/enclave/engine.js'
import { KeyCache } from '../../enclave-origin/enclave/keyCache.js'
import { memoryFigures } from '../../enclave-origin/enclave/memory.js'
import { secp256k1 } from '../../enclave-origin/enclave/nativeSecp256k1.js'
import { sealPrivateKey } from '../../enclave-origin/enclave/sealing.js'
import { decodeHealthResponse, encodeHealthResponse } from '../../enclave-origin/protocol/messages.js'
import { enclaveMetricsText, PrometheusText, RequestFigures } from '../../enclave-origin/parent/metrics.js'

/**
 * The enclave figures on the parent's /metrics: real key-cache and engine
 * stats, through the HEALTH payload's codec, written out as Prometheus text.
 */

const engines: SignEngine[] = []
afterAll(() => Promise.all(engines.map((engine) => engine.stop())))

async function enclaveStats() {
  const dek = new Uint8Array(randomBytes(32))
  // The two re-derivations below take 2 ms and then 6 ms by this clock: one within the 4 ms budget, one over it.
  const ticks = [0, 2, 10, 16]
  const monotonicNow = () => ticks.shift() ?? 16
  const cache = new KeyCache({ now: Date.now, monotonicNow, unlock: async () => ({ dek: new Uint8Array(dek) }) })
  cache.setDek(new Uint8Array(dek))
  const floor = cache.openSequenceEpoch()
  for (const [keyId, state] of [['a', 'active'], ['b', 'active'], ['c', 'active'], ['d', 'frozen']] as const) {
    const privateKey = new Uint8Array(randomBytes(32))
    cache.load({ keyId, version: 1, state, publicKey: secp256k1.publicKeyCreate(privateKey, false), sealed: sealPrivateKey({ privateKey, dek, keyId, version: 1 }) }, floor)
  }
  // Two COOL keys are rehydrated on use; the third stays COOL; the frozen one is counted apart.
  const used = ['a', 'b'].map((keyId) => cache.acquire(keyId))
  const engine = new SignEngine({ threads: 1, inlinePerTurn: 1 })
  engines.push(engine)
  await engine.start()
  await Promise.all(
    used.flatMap((key) => (key.kind === 'ok' ? Array.from({ length: 5 }, () => engine.sign({ privateKey: key.privateKey, digest: new Uint8Array(randomBytes(32)) })) : [])),
  )
  const stats = cache.stats()
  // As the enclave sends it and the parent reads it.
  return decodeHealthResponse(encodeHealthResponse({ cacheStates: stats.keys, cache: { ...stats, keys: undefined }, engine: engine.stats(), memory: memoryFigures() }))
}

/** name{labels} → value, for every sample line. */
function samples(text: string): Map<string, number> {
  const lines = text.split('\n').filter((line) => line !== '' && !line.startsWith('#'))
  return new Map(lines.map((line) => [line.slice(0, line.lastIndexOf(' ')), Number(line.slice(line.lastIndexOf(' ') + 1))]))
}

describe('enclave metrics on the parent', () => {
  it('names each figure as operators expect, with one HELP and TYPE per family across enclaves', async () => {
    const stats = await enclaveStats()
    const text = enclaveMetricsText([
      { id: 'enclave-1', answered: true, ok: true, inflight: 5, admitted: 3, stats },
      { id: 'enclave-2', answered: false, ok: false, inflight: 4, admitted: 2, error: 'connection refused' },
    ])
    const values = samples(text)
    expect(Object.fromEntries(values)).toMatchObject({
      'origin_enclave_up{enclave="enclave-1"}': 1,
      'origin_enclave_up{enclave="enclave-2"}': 0,
      'origin_enclave_ready{enclave="enclave-1"}': 1,
      'origin_enclave_keys{enclave="enclave-1",state="WARM"}': 2,
      'origin_enclave_keys{enclave="enclave-1",state="COOL"}': 1,
      'origin_enclave_keys{enclave="enclave-1",state="INVALID"}': 0,
      'origin_enclave_keys_not_active{enclave="enclave-1"}': 1,
      'origin_enclave_unlocks_total{enclave="enclave-1"}': 1,
      'origin_enclave_key_refreshes_total{enclave="enclave-1"}': 2,
      'origin_enclave_rehydrate_seconds_count{enclave="enclave-1"}': 2,
      'origin_enclave_engine_threads{enclave="enclave-1"}': 1,
      'origin_enclave_engine_inline_signs_total{enclave="enclave-1"}': 1,
      'origin_enclave_engine_inflight{enclave="enclave-1"}': 0,
      'origin_enclave_engine_queue_depth{enclave="enclave-1"}': 0,
      'origin_enclave_key_refresh_failures_total{enclave="enclave-1"}': 0,
      'origin_enclave_needs_unlock_total{enclave="enclave-1"}': 0,
      'origin_enclave_grace_signatures_total{enclave="enclave-1"}': 0,
      'origin_enclave_rehydrate_over_budget_total{enclave="enclave-1"}': 1,
      'origin_enclave_requests_admitted{enclave="enclave-1"}': 3,
      'origin_enclave_requests_admitted{enclave="enclave-2"}': 2,
    })
    for (const gauge of ['origin_enclave_resident_memory_bytes', 'origin_enclave_heap_used_bytes']) expect(values.get(`${gauge}{enclave="enclave-1"}`)).toBeGreaterThan(1_000_000)
    for (const family of ['origin_enclave_up', 'origin_enclave_keys', 'origin_enclave_grace_signatures_total', 'origin_enclave_engine_batch_size']) {
      expect(text.match(new RegExp(`^# TYPE ${family} `, 'gm'))).toHaveLength(1)
    }
    // A down enclave reports nothing but its up gauge and the requests it is serving.
    expect([...values.keys()].filter((name) => name.includes('enclave-2'))).toEqual(['origin_enclave_up{enclave="enclave-2"}', 'origin_enclave_requests_admitted{enclave="enclave-2"}'])
  })

  it('writes histograms with cumulative buckets whose +Inf equals the count', async () => {
    const values = samples(enclaveMetricsText([{ id: 'e', answered: true, ok: true, inflight: 0, admitted: 0, stats: await enclaveStats() }]))
    for (const family of ['origin_enclave_rehydrate_seconds', 'origin_enclave_engine_batch_size']) {
      const buckets = [...values.entries()].filter(([name]) => name.startsWith(`${family}_bucket{`)).map(([, value]) => value)
      expect(buckets.length).toBeGreaterThan(2)
      expect(buckets).toEqual([...buckets].sort((a, b) => a - b))
      expect(values.get(`${family}_bucket{enclave="e",le="+Inf"}`)).toBe(values.get(`${family}_count{enclave="e"}`))
    }
    // Ten signs: one inline, so the batch sizes add up to the nine the thread signed.
    expect(values.get('origin_enclave_engine_batch_size_sum{enclave="e"}')).toBe(9)
  })

  it('keeps the cache and engine figures of an enclave that answers but cannot serve yet, and leaves out figures an enclave did not send', async () => {
    const stats = await enclaveStats()
    const older = { ...stats, engine: { ...(stats.engine as object), batchSizes: undefined, inline: undefined }, cache: { ...(stats.cache as object), inlineRefreshMs: undefined } }
    const text = enclaveMetricsText([{ id: 'p', answered: true, ok: false, inflight: 0, admitted: 0, stats: older, error: 'the preload file is not loaded yet' }])
    const values = samples(text)
    expect(values.get('origin_enclave_up{enclave="p"}')).toBe(1)
    expect(values.get('origin_enclave_ready{enclave="p"}')).toBe(0)
    expect(values.get('origin_enclave_keys{enclave="p",state="WARM"}')).toBe(2)
    expect(text).not.toContain('origin_enclave_engine_batch_size')
    expect(text).not.toContain('origin_enclave_engine_inline_signs_total')
    expect(text).not.toContain('origin_enclave_rehydrate_seconds')
    expect(text).not.toMatch(/undefined|NaN/)
  })

  it('writes the parent\u2019s own sign latency by phase and requests by route and status', () => {
    const figures = new RequestFigures()
    for (const seconds of [0.0004, 0.0015, 0.0015, 0.03, 2]) figures.observeSign('total', seconds)
    figures.observeSign('rpc', 0.001)
    figures.countRequest('sign', 200)
    figures.countRequest('sign', 200)
    figures.countRequest('sign', 503)
    const text = new PrometheusText()
    figures.writeTo(text)
    const values = samples(String(text))
    expect(Object.fromEntries(values)).toMatchObject({
      'origin_sign_latency_seconds_bucket{phase="total",le="0.0005"}': 1,
      'origin_sign_latency_seconds_bucket{phase="total",le="0.002"}': 3,
      'origin_sign_latency_seconds_bucket{phase="total",le="0.05"}': 4,
      'origin_sign_latency_seconds_bucket{phase="total",le="1"}': 4,
      'origin_sign_latency_seconds_bucket{phase="total",le="+Inf"}': 5,
      'origin_sign_latency_seconds_count{phase="total"}': 5,
      'origin_sign_latency_seconds_bucket{phase="rpc",le="0.001"}': 1,
      'origin_sign_latency_seconds_count{phase="queue"}': 0,
      'origin_requests_total{route="sign",status="200"}': 2,
      'origin_requests_total{route="sign",status="503"}': 1,
    })
    expect(values.get('origin_sign_latency_seconds_sum{phase="total"}')).toBeCloseTo(2.0334, 10)
    expect(String(text).match(/^# TYPE origin_sign_latency_seconds histogram$/gm)).toHaveLength(1)
    expect(String(text).match(/^# TYPE origin_requests_total counter$/gm)).toHaveLength(1)
  })
})
