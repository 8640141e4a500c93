import { Counter, Gauge, Histogram, Registry } from 'prom-client'
import type { OriginParent } from './origin.js'

/**
 * The parent's Prometheus metrics. Enclave-side figures (cache states,
 * refreshes, batch sizes) arrive with each enclave's HEALTH answer and are
 * read at scrape time.
 */
export function originMetrics(parent: OriginParent) {
  const registry = new Registry()
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
  // One HEALTH round trip per enclave per scrape, shared by the gauges below (each collects on its own).
  let snapshot: { at: number; health: ReturnType<OriginParent['health']> } | undefined
  const enclaveHealth = () => {
    const now = Date.now()
    if (!snapshot || now - snapshot.at > 1_000) snapshot = { at: now, health: parent.health() }
    return snapshot.health
  }
  const enclaveGauge = (name: string, help: string, pick: (stats: Record<string, unknown>) => Record<string, number>) =>
    new Gauge({
      name,
      help,
      labelNames: ['enclave', 'kind'],
      registers: [registry],
      async collect() {
        this.reset()
        for (const enclave of await enclaveHealth()) {
          if (!enclave.stats) continue
          for (const [kind, value] of Object.entries(pick(enclave.stats))) this.set({ enclave: enclave.id, kind }, value)
        }
      },
    })
  enclaveGauge('origin_enclave_cache_keys', 'Keys per cache state (WARM, COOL, INVALID).', (s) => numbers(s.cacheStates))
  enclaveGauge('origin_enclave_cache_events', 'Cache counters: refreshes, refresh failures, unlocks, needs-unlock answers, grace signatures, rehydrate latency.', (s) =>
    numbers(s.cache),
  )
  enclaveGauge('origin_enclave_engine', 'Signing engine: inflight, queued, batches, mean batch size.', (s) => numbers(s.engine))
  return { registry, signLatency, requests, needsUnlock }
}

/** The numeric fields of an object, flattened one level (`a.b`). */
function numbers(value: unknown, prefix = ''): Record<string, number> {
  const out: Record<string, number> = {}
  if (typeof value !== 'object' || value === null) return out
  for (const [key, field] of Object.entries(value)) {
    if (typeof field === 'number') out[`${prefix}${key}`] = field
    else if (typeof field === 'object' && field !== null && !prefix) Object.assign(out, numbers(field, `${key}.`))
  }
  return out
}
