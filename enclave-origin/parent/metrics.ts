import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry } from 'prom-client'
import type { SignEngineStats } from '../enclave/engine.js'
import type { KeyCacheStats } from '../enclave/keyCache.js'
import { batchSizeBuckets, rehydrateBucketsMs } from '../protocol/histograms.js'
import type { OriginParent } from './origin.js'

/**
 * The parent's Prometheus metrics. Its own (sign latency by phase, requests,
 * NEEDS_UNLOCK answers, inflight) live in a prom-client registry. The
 * enclaves' (cache states, refreshes, unlocks, grace signatures, rehydrate
 * latency, engine queue and batch sizes) are counters and histograms the
 * enclave keeps; they arrive with one HEALTH answer per enclave per scrape and
 * are written out under their own names (`enclaveMetricsText`). The
 * process's own standard figures come too (prom-client's defaults: CPU,
 * memory, event-loop lag, `nodejs_gc_duration_seconds` by kind), since the
 * parent's GC pauses are part of every sign's latency.
 */
export function originMetrics(parent: OriginParent) {
  const registry = new Registry()
  collectDefaultMetrics({ register: registry })
  const signLatency = new Histogram({
    name: 'origin_sign_latency_seconds',
    help: 'Sign latency by phase: enclave (decode to signature, engine queue included), queue (the rest of the round trip: wire and connection queues), rpc (parent to enclave and back), total (request to answer).',
    labelNames: ['phase'],
    buckets: [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1],
    registers: [registry],
  })
  const requests = new Counter({ name: 'origin_requests_total', help: 'API requests by route and status.', labelNames: ['route', 'status'], registers: [registry] })
  const needsUnlock = new Counter({ name: 'origin_needs_unlock_total', help: 'Sign requests answered 503 because the key needs an unlock.', registers: [registry] })
  new Gauge({
    name: 'origin_inflight_requests',
    help: 'Requests in flight to the enclaves.',
    registers: [registry],
    collect() {
      this.set(parent.inflight)
    },
  })
  const text = async () => `${await registry.metrics()}${enclaveMetricsText(await parent.health())}`
  return { text, contentType: registry.contentType, signLatency, requests, needsUnlock }
}

type EnclaveHealth = Awaited<ReturnType<OriginParent['health']>>[number]

type EnclaveStats = { cache: Omit<KeyCacheStats, 'keys'>; engine: SignEngineStats }

/** The enclave figures that are one number each, and where each is in the HEALTH answer. */
const scalarFamilies: Array<{ name: string; type: 'counter' | 'gauge'; help: string; value: (stats: EnclaveStats) => unknown }> = [
  { name: 'origin_enclave_key_refreshes_total', type: 'counter', help: 'Plaintext keys re-derived from their sealed records, inline and in the background.', value: (s) => s.cache.refreshes },
  { name: 'origin_enclave_key_refresh_failures_total', type: 'counter', help: 'Refreshes that failed (a record that would not open, or no data key).', value: (s) => s.cache.refreshFailures },
  { name: 'origin_enclave_unlocks_total', type: 'counter', help: 'Data keys installed by an unlock.', value: (s) => s.cache.unlocks },
  { name: 'origin_enclave_unlock_failures_total', type: 'counter', help: 'Unlocks that failed.', value: (s) => s.cache.unlockFailures },
  { name: 'origin_enclave_needs_unlock_total', type: 'counter', help: 'Requests the enclave answered NEEDS_UNLOCK.', value: (s) => s.cache.needsUnlock },
  { name: 'origin_enclave_grace_signatures_total', type: 'counter', help: 'Signatures given on grace while the data key was gone (each one audited).', value: (s) => s.cache.graceSignatures },
  { name: 'origin_enclave_rehydrate_over_budget_total', type: 'counter', help: 'Inline re-derivations that took longer than their budget.', value: (s) => s.cache.inlineRefreshOverBudget },
  { name: 'origin_enclave_engine_threads', type: 'gauge', help: 'Signing threads.', value: (s) => s.engine.threads },
  { name: 'origin_enclave_engine_inflight', type: 'gauge', help: 'Signs held by the signing threads.', value: (s) => s.engine.inflight },
  { name: 'origin_enclave_engine_queue_depth', type: 'gauge', help: 'Signs waiting in the open batch.', value: (s) => s.engine.queued },
  { name: 'origin_enclave_engine_inline_signs_total', type: 'counter', help: 'Signs made on the enclave event loop while the threads were idle.', value: (s) => s.engine.inline },
]

type Family = { name: string; help: string; type: 'counter' | 'gauge' | 'histogram'; samples: string[] }

/**
 * Prometheus text for the figures each enclave reported; an enclave that did
 * not answer adds only `origin_enclave_up 0`. A figure an enclave did not send
 * (an older version, say) is left out rather than spoiling the whole scrape.
 */
export function enclaveMetricsText(enclaves: EnclaveHealth[]): string {
  const families = new Map<string, Family>()
  const add = (family: Omit<Family, 'samples'>, labels: Record<string, string>, value: unknown, suffix = '') => {
    if (typeof value !== 'number' || !Number.isFinite(value)) return
    let entry = families.get(family.name)
    if (!entry) families.set(family.name, (entry = { ...family, samples: [] }))
    const rendered = Object.entries(labels)
      .map(([key, label]) => `${key}="${label.replace(/["\\\n]/g, (c) => (c === '\n' ? '\\n' : `\\${c}`))}"`)
      .join(',')
    entry.samples.push(`${family.name}${suffix}{${rendered}} ${value}`)
  }
  const histogram = (family: Omit<Family, 'samples' | 'type'>, labels: Record<string, string>, h: { bounds: number[]; counts: unknown; sum: unknown }) => {
    const counts = h.counts
    if (!Array.isArray(counts) || counts.length !== h.bounds.length + 1 || !counts.every((c) => typeof c === 'number' && Number.isFinite(c))) return
    const type = { ...family, type: 'histogram' as const }
    let cumulative = 0
    h.bounds.forEach((bound, i) => add(type, { ...labels, le: String(bound) }, (cumulative += counts[i] as number), '_bucket'))
    const count = cumulative + (counts[h.bounds.length] as number)
    add(type, { ...labels, le: '+Inf' }, count, '_bucket')
    add(type, labels, h.sum, '_sum')
    add(type, labels, count, '_count')
  }

  for (const enclave of enclaves) {
    const labels = { enclave: enclave.id }
    add({ name: 'origin_enclave_up', help: 'Whether the enclave answered HEALTH for this scrape.', type: 'gauge' }, labels, enclave.answered ? 1 : 0)
    if (!enclave.answered) continue
    add({ name: 'origin_enclave_ready', help: 'Whether the enclave can serve: it answered, and in preload mode its accounts are loaded.', type: 'gauge' }, labels, enclave.ok ? 1 : 0)
    const stats = enclave.stats as ({ cacheStates?: Record<string, number> } & Partial<EnclaveStats>) | undefined
    if (!stats?.cache || !stats.engine || !stats.cacheStates) continue
    const { cache, engine } = stats
    for (const [state, count] of Object.entries(stats.cacheStates)) {
      add({ name: 'origin_enclave_keys', help: 'Keys in the enclave cache by state: WARM (signs now), COOL (re-derived from its sealed record on use), INVALID (needs an unlock).', type: 'gauge' }, { ...labels, state }, count)
    }
    for (const family of scalarFamilies) add(family, labels, family.value({ cache, engine }))
    histogram(
      { name: 'origin_enclave_rehydrate_seconds', help: 'Inline re-derivation (COOL to WARM) latency.' },
      labels,
      { bounds: rehydrateBucketsMs.map((ms) => ms / 1_000), counts: cache.inlineRefreshMs.buckets, sum: cache.inlineRefreshMs.sum / 1_000 },
    )
    histogram({ name: 'origin_enclave_engine_batch_size', help: 'Signs per message to a signing thread.' }, labels, { bounds: batchSizeBuckets, counts: engine.batchSizes, sum: engine.batchedSigns })
  }
  return [...families.values()].map((f) => `# HELP ${f.name} ${f.help}\n# TYPE ${f.name} ${f.type}\n${f.samples.join('\n')}\n`).join('\n')
}
