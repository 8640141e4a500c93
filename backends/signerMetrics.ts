/** Sign outcomes per backend, as counters an operator can scrape (Prometheus text) or stream (Analytics Engine). */

/** `cancelled`: stopped because the chain's caller gave up (no verdict on the backend). */
export type SignOutcome = 'success' | 'failure' | 'timeout' | 'skipped' | 'cancelled'

export type AnalyticsEngineDataset = { writeDataPoint(point: { blobs?: string[]; doubles?: number[]; indexes?: string[] }): void }

export class SignerMetrics {
  private readonly counts = new Map<string, { backend: string; outcome: SignOutcome; count: number; milliseconds: number }>()

  constructor(private readonly analytics?: AnalyticsEngineDataset) {}

  record(backend: string, outcome: SignOutcome, milliseconds: number): void {
    const key = `${backend}\u0000${outcome}`
    const entry = this.counts.get(key) ?? { backend, outcome, count: 0, milliseconds: 0 }
    entry.count++
    entry.milliseconds += milliseconds
    this.counts.set(key, entry)
    this.analytics?.writeDataPoint({ blobs: [backend, outcome], doubles: [milliseconds], indexes: [backend] })
  }

  count(backend: string, outcome: SignOutcome): number {
    return this.counts.get(`${backend}\u0000${outcome}`)?.count ?? 0
  }

  toPrometheus(): string {
    const lines = [
      '# HELP paymaster_signer_requests_total Signature attempts per backend and outcome (this isolate).',
      '# TYPE paymaster_signer_requests_total counter',
      ...[...this.counts.values()].map((e) => `paymaster_signer_requests_total{backend="${e.backend}",outcome="${e.outcome}"} ${e.count}`),
      '# HELP paymaster_signer_latency_ms_sum Total milliseconds spent per backend and outcome (this isolate).',
      '# TYPE paymaster_signer_latency_ms_sum counter',
      ...[...this.counts.values()].map((e) => `paymaster_signer_latency_ms_sum{backend="${e.backend}",outcome="${e.outcome}"} ${e.milliseconds}`),
    ]
    return `${lines.join('\n')}\n`
  }
}
