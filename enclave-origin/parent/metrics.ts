import { collectDefaultMetrics, Counter, Gauge, Registry } from 'prom-client'
import type { SignEngineStats } from '../enclave/engine.js'
import type { KeyCacheStats } from '../enclave/keyCache.js'
import { batchSizeBuckets, countInto, emptyCounts, rehydrateBucketsMs } from '../protocol/histograms.js'
import type { EnclaveHealth, OriginParent } from './origin.js'
import { verificationFailures } from '../protocol/requestSigning.js'

/** Upper bounds of the parent's sign-latency histogram, in seconds. */
const signLatencyBoundsSeconds = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1]
const signPhases = ['enclave', 'queue', 'rpc', 'total'] as const
export type SignPhase = (typeof signPhases)[number]

/**
 * The parent's own figures on every request: sign latency by phase, and
 * requests by route and status. Plain counts, written out by PrometheusText
 * like the enclaves' figures: prom-client's labelled children re-validate
 * and re-hash their labels on every observation, about 2 µs per sign for
 * the four phases against 0.12 µs here.
 */
export class RequestFigures {
  private readonly latency = new Map<SignPhase, { counts: number[]; sum: number }>(signPhases.map((phase) => [phase, { counts: emptyCounts(signLatencyBoundsSeconds), sum: 0 }]))
  private readonly requests = new Map<string, { route: string; status: string; count: number }>()

  observeSign(phase: SignPhase, seconds: number): void {
    const histogram = this.latency.get(phase)!
    countInto(histogram.counts, signLatencyBoundsSeconds, seconds)
    histogram.sum += seconds
  }

  countRequest(route: string, status: number): void {
    const key = `${route} ${status}`
    const counter = this.requests.get(key)
    if (counter) counter.count++
    else this.requests.set(key, { route, status: String(status), count: 1 })
  }

  writeTo(text: PrometheusText): void {
    for (const [phase, { counts, sum }] of this.latency) {
      text.histogram(
        {
          name: 'origin_sign_latency_seconds',
          help: 'Sign latency by phase: enclave (decode to signature, engine queue included), queue (the rest of the round trip: wire and connection queues), rpc (parent to enclave and back), total (request to answer).',
        },
        { phase },
        { bounds: signLatencyBoundsSeconds, counts, sum },
      )
    }
    for (const { route, status, count } of this.requests.values()) {
      text.add({ name: 'origin_requests_total', help: 'API requests by route and status.', type: 'counter' }, { route, status }, count)
    }
  }
}

/**
 * The parent's Prometheus metrics. Its per-request figures (sign latency by
 * phase, requests) are RequestFigures; NEEDS_UNLOCK answers, refused
 * authentications and inflight live in a prom-client registry. The enclaves' (cache states, refreshes, unlocks,
 * grace signatures, rehydrate latency, engine queue and batch sizes) are
 * counters and histograms the enclave keeps; they arrive with one HEALTH
 * answer per enclave per scrape and are written out under their own names
 * (`enclaveMetricsText`). The process's own standard figures come too
 * (prom-client's defaults: CPU, memory, event-loop lag,
 * `nodejs_gc_duration_seconds` by kind), since the parent's GC pauses are
 * part of every sign's latency.
 */
export function originMetrics(parent: OriginParent) {
  const registry = new Registry()
  collectDefaultMetrics({ register: registry })
  const figures = new RequestFigures()
  const needsUnlock = new Counter({ name: 'origin_needs_unlock_total', help: 'Requests (signs, creates, gets, rotations) answered 503 because the enclave needs an unlock.', registers: [registry] })
  const authFailures = new Counter({
    name: 'origin_request_auth_failures_total',
    help: 'Requests refused 401 by HMAC verification, by reason (missing, unknown-key, stale, before-start, replayed, bad-signature), and 403 for a sign-only key asking for more (not-permitted).',
    labelNames: ['reason'],
    registers: [registry],
  })
  const shed = new Counter({
    name: 'origin_requests_shed_total',
    help: 'Signs, gets and creates answered 503 (overloaded) at once because their enclave was serving MAX_INFLIGHT_PER_ENCLAVE of them, by route.',
    labelNames: ['route'],
    registers: [registry],
  })
  const droppedConnections = new Counter({
    name: 'origin_connections_dropped_total',
    help: 'Connections closed as they arrived because their listener held as many as it may, by listener: clients (MAX_CONNECTIONS) or operators (OPERATOR_MAX_CONNECTIONS).',
    labelNames: ['listener'],
    registers: [registry],
  })
  // Every known series from the start, at 0: a rate over a series that is not there yet reads "no data".
  for (const listener of ['clients', 'operators']) droppedConnections.inc({ listener }, 0)
  for (const reason of [...verificationFailures, 'not-permitted']) authFailures.inc({ reason }, 0)
  for (const route of ['sign', 'get', 'create']) shed.inc({ route }, 0)
  new Gauge({
    name: 'origin_inflight_requests',
    help: 'Requests in flight to the enclaves.',
    registers: [registry],
    collect() {
      this.set(parent.inflight)
    },
  })
  const text = async () => {
    const own = new PrometheusText()
    figures.writeTo(own)
    for (const { enclave, standby, outcome, count } of parent.failovers()) {
      own.add(
        { name: 'origin_failovers_total', help: 'Signs and gets for an enclave\u2019s keys that another enclave took while it was out of reach or out of service, by what that one did: served, refused or failed.', type: 'counter' },
        { enclave, standby, outcome },
        count,
      )
    }
    return `${await registry.metrics()}${own}\n${enclaveMetricsText(await parent.health())}`
  }
  return { text, contentType: registry.contentType, figures, needsUnlock, authFailures, shed, droppedConnections }
}


type EnclaveStats = { cache: Omit<KeyCacheStats, 'keys'>; engine: SignEngineStats }

/** The enclave figures that are one number each, and where each is in the HEALTH answer. */
const scalarFamilies: Array<{ name: string; type: 'counter' | 'gauge'; help: string; value: (stats: EnclaveStats) => unknown }> = [
  { name: 'origin_enclave_key_refreshes_total', type: 'counter', help: 'Plaintext keys re-derived from their sealed records, inline and in the background.', value: (s) => s.cache.refreshes },
  { name: 'origin_enclave_key_refresh_failures_total', type: 'counter', help: 'Refreshes that failed (a record that would not open, or no data key).', value: (s) => s.cache.refreshFailures },
  { name: 'origin_enclave_keys_not_active', type: 'gauge', help: 'Frozen and archived keys the enclave holds: they never sign, and origin_enclave_keys leaves them out.', value: (s) => s.cache.keysNotActive },
  { name: 'origin_enclave_unlocks_total', type: 'counter', help: 'Data keys installed: by the parent\u2019s UNLOCKs and by the enclave\u2019s own unlocks.', value: (s) => s.cache.unlocks },
  { name: 'origin_enclave_unlock_failures_total', type: 'counter', help: 'The enclave\u2019s own unlocks (with the wrapped data key it holds) that failed. A failed UNLOCK of the parent\u2019s fails whoever asked for it (those it starts on NEEDS_UNLOCK are logged as unlock_failed).', value: (s) => s.cache.unlockFailures },
  { name: 'origin_enclave_needs_unlock_total', type: 'counter', help: 'Requests the enclave answered NEEDS_UNLOCK.', value: (s) => s.cache.needsUnlock },
  { name: 'origin_enclave_grace_signatures_total', type: 'counter', help: 'Signatures given on grace while the data key was gone (each one audited).', value: (s) => s.cache.graceSignatures },
  { name: 'origin_enclave_grace_signatures_unaudited_total', type: 'counter', help: 'Grace signatures refused (NEEDS_UNLOCK) because the enclave\u2019s log held as many uncollected audits as it may.', value: (s) => s.cache.graceRefusedUnaudited },
  { name: 'origin_enclave_rehydrate_over_budget_total', type: 'counter', help: 'Inline re-derivations that took longer than their budget.', value: (s) => s.cache.inlineRefreshOverBudget },
  { name: 'origin_enclave_engine_threads', type: 'gauge', help: 'Signing threads.', value: (s) => s.engine.threads },
  { name: 'origin_enclave_engine_inflight', type: 'gauge', help: 'Signs held by the signing threads.', value: (s) => s.engine.inflight },
  { name: 'origin_enclave_engine_queue_depth', type: 'gauge', help: 'Signs waiting in the open batch.', value: (s) => s.engine.queued },
  { name: 'origin_enclave_engine_inline_signs_total', type: 'counter', help: 'Signs made on the enclave event loop while the threads were idle.', value: (s) => s.engine.inline },
]

type Family = { name: string; help: string; type: 'counter' | 'gauge' | 'histogram'; samples: string[] }

/** Prometheus text, one HELP and TYPE per family however many label sets it has. */
export class PrometheusText {
  private readonly families = new Map<string, Family>()

  /** A sample; a value that is not a finite number (a figure not sent) is left out. */
  add(family: Omit<Family, 'samples'>, labels: Record<string, string>, value: unknown, suffix = ''): void {
    if (typeof value !== 'number' || !Number.isFinite(value)) return
    let entry = this.families.get(family.name)
    if (!entry) this.families.set(family.name, (entry = { ...family, samples: [] }))
    const rendered = Object.entries(labels)
      .map(([key, label]) => `${key}="${label.replace(/["\\\n]/g, (c) => (c === '\n' ? '\\n' : `\\${c}`))}"`)
      .join(',')
    entry.samples.push(`${family.name}${suffix}{${rendered}} ${value}`)
  }

  /** A histogram from one count per bound and a last one above them (histograms.ts), as cumulative buckets. */
  histogram(family: Omit<Family, 'samples' | 'type'>, labels: Record<string, string>, h: { bounds: readonly number[]; counts: unknown; sum: unknown }): void {
    const counts = h.counts
    if (!Array.isArray(counts) || counts.length !== h.bounds.length + 1 || !counts.every((c) => typeof c === 'number' && Number.isFinite(c))) return
    const type = { ...family, type: 'histogram' as const }
    let cumulative = 0
    h.bounds.forEach((bound, i) => this.add(type, { ...labels, le: String(bound) }, (cumulative += counts[i] as number), '_bucket'))
    const count = cumulative + (counts[h.bounds.length] as number)
    this.add(type, { ...labels, le: '+Inf' }, count, '_bucket')
    this.add(type, labels, h.sum, '_sum')
    this.add(type, labels, count, '_count')
  }

  toString(): string {
    return [...this.families.values()].map((f) => `# HELP ${f.name} ${f.help}\n# TYPE ${f.name} ${f.type}\n${f.samples.join('\n')}\n`).join('\n')
  }
}

/**
 * Prometheus text for the figures each enclave reported; an enclave that did
 * not answer adds only `origin_enclave_up 0`. A figure an enclave did not send
 * (an older version, say) is left out rather than spoiling the whole scrape.
 */
export function enclaveMetricsText(enclaves: EnclaveHealth[]): string {
  const text = new PrometheusText()
  for (const enclave of enclaves) {
    const labels = { enclave: enclave.id }
    text.add({ name: 'origin_enclave_up', help: 'Whether the enclave answered HEALTH for this scrape.', type: 'gauge' }, labels, enclave.answered ? 1 : 0)
    text.add(
      { name: 'origin_enclave_requests_admitted', help: 'Signs, gets and creates the parent is serving on the enclave now; at MAX_INFLIGHT_PER_ENCLAVE more are shed.', type: 'gauge' },
      labels,
      enclave.admitted,
    )
    if (!enclave.answered) continue
    text.add({ name: 'origin_enclave_ready', help: 'Whether the enclave can serve: it answered, is in service and not held back after failing requests, and in preload mode its accounts are loaded.', type: 'gauge' }, labels, enclave.ok ? 1 : 0)
    const stats = enclave.stats as ({ cacheStates?: Record<string, number> } & Partial<EnclaveStats>) | undefined
    if (!stats?.cache || !stats.engine || !stats.cacheStates) continue
    const { cache, engine } = stats
    for (const [state, count] of Object.entries(stats.cacheStates)) {
      text.add({ name: 'origin_enclave_keys', help: 'Active keys in the enclave cache by state: WARM (signs now), COOL (re-derived from its sealed record on use), INVALID (needs an unlock).', type: 'gauge' }, { ...labels, state }, count)
    }
    for (const family of scalarFamilies) text.add(family, labels, family.value({ cache, engine }))
    const { memory } = stats as { memory?: Record<string, unknown> }
    text.add({ name: 'origin_enclave_resident_memory_bytes', help: 'The enclave process\u2019s resident memory.', type: 'gauge' }, labels, memory?.residentBytes)
    text.add({ name: 'origin_enclave_heap_used_bytes', help: 'The enclave\u2019s V8 heap in use (key records and plaintext keys live there and in its slabs).', type: 'gauge' }, labels, memory?.heapUsedBytes)
    text.histogram(
      { name: 'origin_enclave_rehydrate_seconds', help: 'Inline re-derivation (COOL to WARM) latency.' },
      labels,
      { bounds: rehydrateBucketsMs.map((ms) => ms / 1_000), counts: cache.inlineRefreshMs?.buckets, sum: Number(cache.inlineRefreshMs?.sum) / 1_000 },
    )
    text.histogram({ name: 'origin_enclave_engine_batch_size', help: 'Signs per message to a signing thread.' }, labels, { bounds: batchSizeBuckets, counts: engine.batchSizes, sum: engine.batchedSigns })
  }
  return String(text)
}
