import { getAddress, type Address, type Hex } from 'viem'
import { CircuitBreaker, type BreakerAdmission } from './circuitBreaker.js'
import type { SignerMetrics } from './signerMetrics.js'
import { SignerError, signerErrorMessage, type MemberHealth, type SignedDigest, type Signer, type SignerDescription, type SignerHealth, type SignOptions } from './signer.js'
import { waitAtMost } from '../enclave-origin/waitAtMost.js'

export type FallbackSignerOptions = {
  name: string
  /** Primary first, then backups in order. */
  members: Signer[]
  /** How long one member may take before the next is asked. */
  timeoutMs: number
  failureThreshold: number
  coolDownMs: number
  /** Ask the next member too when the current one is slower than this (it keeps running; the first answer wins). */
  hedgeAfterMs?: number
  /** Single-signer paymasters accept one address: every member must have it. */
  requireSameAddress: boolean
  /**
   * With requireSameAddress: the address the members' configs declare. It is the chain's address from the
   * start, so a member that declares none cannot make its own key the chain's by answering first.
   */
  declaredAddress?: Address
  metrics: SignerMetrics
  now?: () => number
}

/** A probe's attempt ends (answered, failed or timed out) within `timeoutMs`; one not heard of a second later never will be (see CircuitBreaker). */
const probeLeaseMarginMs = 1_000

/** A member that did not answer in time. */
class AttemptTimeoutError extends SignerError {}

/**
 * An ordered chain of signers that clients never see fail over. Each member
 * has a circuit breaker, so a dead primary costs its timeout only until the
 * breaker opens, not on every request; a member whose breaker is open is
 * skipped at no cost. Each attempt is bounded by `timeoutMs`, so when every
 * member fails the caller gets an error, never a hang.
 */
export class FallbackSigner implements Signer {
  private readonly breakers: CircuitBreaker[]
  private readonly lastErrors: Array<string | undefined>
  /** Whether each member's last failure may go otherwise if asked again (a timeout, an outage); true until one fails. */
  private readonly lastFailureRetryable: boolean[]
  /** With requireSameAddress: the one address every member must sign as, once known. */
  private agreedAddress: Address | undefined

  constructor(private readonly options: FallbackSignerOptions) {
    const now = options.now ?? Date.now
    this.breakers = options.members.map(() => new CircuitBreaker({ failureThreshold: options.failureThreshold, coolDownMs: options.coolDownMs, probeLeaseMs: options.timeoutMs + probeLeaseMarginMs, now }))
    this.lastErrors = options.members.map(() => undefined)
    this.lastFailureRetryable = options.members.map(() => true)
    this.agreedAddress = options.declaredAddress && getAddress(options.declaredAddress)
  }

  async address(): Promise<Address> {
    if (!this.options.requireSameAddress) return this.firstAvailable((member) => member.address())
    const answers = await Promise.allSettled(this.options.members.map((member) => member.address()))
    const address = this.agreedOn(answers.map((answer) => (answer.status === 'fulfilled' ? answer.value : undefined)))
    if (address !== undefined) return address
    const last = answers.at(-1)
    throw this.noneAvailable(last?.status === 'rejected' ? last.reason : undefined)
  }

  /**
   * The one address the members resolve to (one entry per member, undefined where it did not answer),
   * undefined when none did. Members that differ from each other or from the address already agreed are
   * refused: the paymaster would reject some signatures.
   */
  private agreedOn(addresses: Array<Address | undefined>): Address | undefined {
    const answered = [...new Set(addresses.filter((a): a is Address => a !== undefined))]
    const agreed = this.agreedAddress ?? answered[0]
    if (answered.some((address) => address !== agreed)) {
      const resolved = this.options.members.map((m, i) => `${m.describe().name}=${addresses[i] ?? 'unavailable'}`).join(', ')
      throw new SignerError(
        answered.length > 1
          ? `${this.options.name}: backends resolve to different addresses (${resolved}) but this chain's paymaster accepts a single signer`
          : `${this.options.name}: backends resolve to ${resolved}, but this chain's paymaster accepts only ${agreed}`,
      )
    }
    if (answered.length === 0) return undefined
    this.agreedAddress = agreed
    return agreed
  }

  /** When no member answered: the last member's error if it is safe to show, else a generic one. */
  private noneAvailable(lastError: unknown): SignerError {
    return lastError instanceof SignerError ? lastError : new SignerError(`${this.options.name}: no backend is available`)
  }

  private async firstAvailable<T>(use: (member: Signer) => Promise<T>): Promise<T> {
    let lastError: unknown
    for (const member of this.options.members) {
      try {
        return await use(member)
      } catch (error) {
        lastError = error
      }
    }
    throw this.noneAvailable(lastError)
  }

  async signDigest(digest: Hex, options?: SignOptions): Promise<SignedDigest> {
    const { members, metrics } = this.options
    return new Promise<SignedDigest>((resolve, reject) => {
      let next = 0
      let running = 0
      let settled = false
      const failures: string[] = []
      // Whether asking again may go otherwise: it may if a member reached so far (asked, or skipped by a breaker that will
      // let it try again) last failed for something passing (a timeout, an outage), not for good (denied, misconfigured).
      const worthRetrying = () => this.lastFailureRetryable.slice(0, next).some((each) => each)
      // Our caller's signal, if any: when it gives up, members still at work stop. A member a hedge beat to the
      // answer runs on to its own timeout (which stops it too): a hung one must still count against its breaker.
      const signal = options?.signal ?? new AbortController().signal
      const deadline = options?.deadline
      // Starts the next member whose breaker lets a call through. Breakers are asked only when a member
      // is needed: a half-open probe slot taken for a member that never runs would never be given back.
      const launch = (): boolean => {
        while (!settled && !signal.aborted && next < members.length) {
          const index = next++
          const admission = this.breakers[index]!.tryAcquire()
          if (!admission) {
            metrics.record(members[index]!.describe().name, 'skipped', 0)
            continue
          }
          running++
          const hedge = this.options.hedgeAfterMs === undefined ? undefined : setTimeout(launch, this.options.hedgeAfterMs)
          void this.attempt({ index, digest, admission, signal, deadline }).then(
            (signed) => {
              clearTimeout(hedge)
              running--
              if (!settled) {
                settled = true
                resolve(signed)
              }
            },
            (error: unknown) => {
              clearTimeout(hedge)
              running--
              failures.push(signerErrorMessage(error))
              // A caller that gave up gets no further member started for it.
              if (!settled && !launch() && running === 0) {
                settled = true
                reject(new SignerError(`${this.options.name}: every signer backend failed: ${failures.join('; ')}`, { retryable: worthRetrying() }))
              }
            },
          )
          return true
        }
        return false
      }
      if (!launch()) {
        settled = true
        const retryable = signal.aborted || worthRetrying()
        const why = signal.aborted ? 'its caller no longer waits for the signature' : `every signer backend is unavailable (circuits open)${retryable ? '; retry shortly' : ''}`
        reject(new SignerError(`${this.options.name}: ${why}`, { retryable }))
      }
    })
  }

  /**
   * One member, bounded by the timeout (which aborts its signal), with its breaker and counters updated. The member
   * is told when that is (or the chain's own caller's deadline, if earlier), so it does not start a wait past it.
   */
  private async attempt({ index, digest, admission, signal, deadline }: { index: number; digest: Hex; admission: BreakerAdmission; signal: AbortSignal; deadline: number | undefined }): Promise<SignedDigest> {
    const member = this.options.members[index]!
    const name = member.describe().name
    const started = Date.now()
    const expired = new AbortController()
    try {
      // If the timeout wins, this attempt may still fail later, unwatched (see waitAtMost).
      const signing = member.signDigest(digest, {
        signal: AbortSignal.any([signal, expired.signal]),
        deadline: Math.min(started + this.options.timeoutMs, deadline ?? Number.POSITIVE_INFINITY),
      })
      const waited = await waitAtMost(signing, { ms: this.options.timeoutMs })
      if (!('value' in waited)) {
        // The timeout decided first: a member that fails at once on the abort must not count as a mere failure.
        expired.abort()
        throw new AttemptTimeoutError(`${name}: no signature within ${this.options.timeoutMs} ms`, { retryable: true })
      }
      const signed = waited.value
      if (this.options.requireSameAddress) {
        this.agreedAddress ??= signed.address
        if (signed.address !== this.agreedAddress) {
          throw new SignerError(`${name} signs as ${signed.address}, but this chain's paymaster accepts only ${this.agreedAddress}`)
        }
      }
      this.breakers[index]!.success()
      this.options.metrics.record(name, 'success', Date.now() - started)
      return signed
    } catch (error) {
      const timedOut = error instanceof AttemptTimeoutError
      if (!timedOut && signal.aborted) {
        // Stopped because the chain's caller gave up: no verdict on this member.
        this.breakers[index]!.release(admission)
        this.options.metrics.record(name, 'cancelled', Date.now() - started)
        throw error
      }
      this.breakers[index]!.failure(admission)
      this.lastErrors[index] = signerErrorMessage(error)
      this.lastFailureRetryable[index] = error instanceof SignerError && error.options.retryable
      this.options.metrics.record(name, timedOut ? 'timeout' : 'failure', Date.now() - started)
      throw error
    }
  }

  async health(): Promise<SignerHealth> {
    // The address comes from the members' health, so each member is probed once.
    const members = await this.members()
    const addresses = members.map((m) => m.address)
    let address: Address | undefined
    try {
      address = this.options.requireSameAddress ? this.agreedOn(addresses) : addresses.find((a) => a !== undefined)
    } catch (error) {
      return { ok: false, error: signerErrorMessage(error), members }
    }
    // As address() would report it: the last member's error.
    if (address === undefined) return { ok: false, error: members.at(-1)?.error ?? this.noneAvailable(undefined).message, members }
    const healthy = members.some((m) => m.ok && m.state !== 'open')
    return healthy ? { ok: true, address, members } : { ok: false, error: `${this.options.name}: no healthy backend`, members }
  }

  private members(): Promise<MemberHealth[]> {
    return Promise.all(
      this.options.members.map(async (member, index) => {
        const health = await member.health()
        return {
          name: member.describe().name,
          kind: member.describe().kind,
          state: this.breakers[index]!.state,
          ...health,
          ...(this.lastErrors[index] ? { lastError: this.lastErrors[index] } : {}),
        }
      }),
    )
  }

  describe(): SignerDescription {
    const primary = this.options.members[0]!.describe()
    return { kind: 'fallback', name: this.options.name, securityLevel: primary.securityLevel }
  }
}
