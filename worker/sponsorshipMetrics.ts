import type { SponsorshipObservation } from './sponsor/sponsor.js'

/**
 * Sponsorship outcomes as Prometheus counters (this isolate): what was asked (stub data, a dry run, a signature),
 * on which chain, and how it ended; and the summed maximum cost of what was signed. Labels come from a closed set:
 * a chain id the configuration does not serve counts as `other`, so callers cannot grow the label space.
 */
export class SponsorshipMetrics {
  /** Counts by their label set, as exposed. */
  private readonly requests = new Map<string, number>()
  private readonly signedCostWei = new Map<string, bigint>()
  private readonly chainIds: ReadonlySet<number>

  constructor(chainIds: readonly number[]) {
    this.chainIds = new Set(chainIds)
  }

  record(observation: SponsorshipObservation): void {
    const chain = this.chainIds.has(observation.chainId) ? String(observation.chainId) : 'other'
    const reason = observation.outcome === 'sponsored' ? '' : `,reason="${observation.reason}"`
    const labels = `request="${observation.request}",chain_id="${chain}",outcome="${observation.outcome}"${reason}`
    this.requests.set(labels, (this.requests.get(labels) ?? 0) + 1)
    // What a signature put at stake: a stub or a dry run puts nothing there, whatever it was told.
    if (observation.request === 'sign' && observation.outcome === 'sponsored' && observation.maxCostWei !== undefined) {
      this.signedCostWei.set(chain, (this.signedCostWei.get(chain) ?? 0n) + observation.maxCostWei)
    }
  }

  toPrometheus(): string {
    const lines = [
      '# HELP paymaster_sponsorship_requests_total Sponsorship requests by request (stub, dry_run, sign), chain, outcome (sponsored, declined, error) and reason (this isolate).',
      '# TYPE paymaster_sponsorship_requests_total counter',
      ...[...this.requests].map(([labels, count]) => `paymaster_sponsorship_requests_total{${labels}} ${count}`),
      '# HELP paymaster_sponsored_max_cost_wei_total Summed maximum cost of the sponsorships signed, in wei, by chain (this isolate).',
      '# TYPE paymaster_sponsored_max_cost_wei_total counter',
      ...[...this.signedCostWei].map(([chain, wei]) => `paymaster_sponsored_max_cost_wei_total{chain_id="${chain}"} ${wei}`),
    ]
    return `${lines.join('\n')}\n`
  }
}
