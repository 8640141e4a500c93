export type BreakerState = 'closed' | 'open' | 'half-open'

/**
 * Opens after `failureThreshold` consecutive failures (timeouts count). While
 * open, calls are skipped; after `coolDownMs` one probe is let through
 * (half-open): its success closes the breaker, its failure reopens it.
 */
export class CircuitBreaker {
  private failures = 0
  private openedAt: number | undefined
  private probing = false

  constructor(private readonly options: { failureThreshold: number; coolDownMs: number; now: () => number }) {}

  get state(): BreakerState {
    if (this.openedAt === undefined) return 'closed'
    return this.options.now() - this.openedAt >= this.options.coolDownMs ? 'half-open' : 'open'
  }

  /** Whether a call may go ahead now; in half-open, only one probe at a time. */
  tryAcquire(): boolean {
    const state = this.state
    if (state === 'closed') return true
    if (state === 'open' || this.probing) return false
    this.probing = true
    return true
  }

  success(): void {
    this.failures = 0
    this.openedAt = undefined
    this.probing = false
  }

  failure(): void {
    this.failures++
    if (this.probing || this.failures >= this.options.failureThreshold) this.openedAt = this.options.now()
    this.probing = false
  }
}
