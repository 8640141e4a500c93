export type BreakerState = 'closed' | 'open' | 'half-open'

/** How a call was let through: as an ordinary call, or as one half-open probe, told apart from earlier ones. */
export type BreakerAdmission = { kind: 'call' } | { kind: 'probe'; probe: number }

/**
 * Opens after `failureThreshold` consecutive failures (timeouts count). While
 * open, calls are skipped; after `coolDownMs` one probe is let through
 * (half-open): its success closes the breaker, its failure reopens it.
 *
 * A probe holds its slot for `probeLeaseMs` at most. In workerd a request's
 * fetches and timers are dropped once it has answered, so a probe whose
 * request a hedge or a backup answered first may never report back; after
 * its lease the slot goes to the next probe.
 */
export class CircuitBreaker {
  private failures = 0
  private openedAt: number | undefined
  /** The probe in flight (its number), or 0. */
  private probing = 0
  private probeStartedAt = 0
  private probes = 0

  constructor(private readonly options: { failureThreshold: number; coolDownMs: number; probeLeaseMs: number; now: () => number }) {}

  get state(): BreakerState {
    if (this.openedAt === undefined) return 'closed'
    return this.options.now() - this.openedAt >= this.options.coolDownMs ? 'half-open' : 'open'
  }

  /** Whether a call may go ahead now, and as what; undefined when it may not. In half-open, one probe at a time. */
  tryAcquire(): BreakerAdmission | undefined {
    const state = this.state
    if (state === 'closed') return { kind: 'call' }
    if (state === 'open') return undefined
    const now = this.options.now()
    if (this.probing && now - this.probeStartedAt < this.options.probeLeaseMs) return undefined
    this.probing = ++this.probes
    this.probeStartedAt = now
    return { kind: 'probe', probe: this.probing }
  }

  success(): void {
    this.failures = 0
    this.openedAt = undefined
    this.probing = 0
  }

  /** The call was given up before it answered: neither outcome; a probe's slot is free for the next. */
  release(admission: BreakerAdmission): void {
    if (admission.kind === 'probe' && admission.probe === this.probing) this.probing = 0
  }

  /**
   * The cool-down starts when the breaker opens or a probe fails. Calls that were in flight when it opened
   * and fail later leave it alone: each would otherwise push the probe back.
   */
  failure(admission: BreakerAdmission): void {
    this.failures++
    // Only the probe in flight: a success since this one was let through closed the breaker (and a later probe may be out).
    const probeFailed = admission.kind === 'probe' && admission.probe === this.probing
    if (probeFailed) this.probing = 0
    if (probeFailed || (this.openedAt === undefined && this.failures >= this.options.failureThreshold)) this.openedAt = this.options.now()
  }
}
