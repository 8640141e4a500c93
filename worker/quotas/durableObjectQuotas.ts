import type { QuotaConfig } from '../../config/schema.js'
import { InternalError, QuotaExceededError, QuotaUnavailableError } from '../errors.js'
import type { QuotaUse, Quotas } from '../sponsor/sponsor.js'
import { longestWait, worstOf } from './quotaLedger.js'
import type { QuotaAnswer, QuotaLimitWire, SponsorshipQuota } from './sponsorshipQuota.js'
import { waitAtMost } from '../../enclave-origin/waitAtMost.js'

type QuotaLimit = QuotaConfig['limits'][number]
type Per = QuotaLimit['per']
/** One kind of subject's limits, as configured and as sent to its objects. */
type Kind = { per: Per; limits: QuotaLimit[]; wire: QuotaLimitWire[] }
type Subject = Kind & { name: string }

/** How long /health's probe, and stub data's advice, wait for a quota object (a slow one must not hold them up). */
export type QuotaTimeouts = { healthMs: number; adviceMs: number }
const defaultTimeouts: QuotaTimeouts = { healthMs: 5_000, adviceMs: 1_000 }

/**
 * The configured quotas, counted in one SponsorshipQuota Durable Object per subject: a sender, or an API key, on one
 * chain. A sponsorship is counted when it is about to be signed (a signature can be used on chain until it expires,
 * whatever the operation then costs), and taken back if it is not signed after all. When the counts cannot be
 * reached nothing is signed: a quota that fails open is no quota.
 */
export class DurableObjectQuotas implements Quotas {
  private readonly namespace: DurableObjectNamespace<SponsorshipQuota>
  private readonly log: (fields: Record<string, unknown>) => void
  private readonly timeouts: QuotaTimeouts
  private readonly kinds: readonly Kind[]

  constructor(options: {
    namespace: DurableObjectNamespace<SponsorshipQuota>
    limits: readonly QuotaLimit[]
    log: (fields: Record<string, unknown>) => void
    timeouts?: QuotaTimeouts
  }) {
    this.namespace = options.namespace
    this.log = options.log
    this.timeouts = options.timeouts ?? defaultTimeouts
    const pers: Per[] = ['sender', 'apiKey']
    this.kinds = pers
      .map((per) => {
        const own = options.limits.filter((limit) => limit.per === per)
        const wire = own.map(({ windowSeconds, maxOperations, maxCostWei }) => ({ windowSeconds, maxOperations, maxCostWei: maxCostWei?.toString() }))
        return { per, limits: own, wire }
      })
      .filter((kind) => kind.limits.length > 0)
  }

  take(use: QuotaUse): Promise<() => Promise<void>> {
    return this.ask({ use, count: true })
  }

  async check(use: QuotaUse): Promise<void> {
    await this.ask({ use, count: false })
  }

  async advise(use: QuotaUse): Promise<void> {
    const answered = await waitAtMost(this.ask({ use, count: false, advisory: true }), { ms: this.timeouts.adviceMs })
    if (!('value' in answered)) this.adviceSkipped(`no answer within ${this.timeouts.adviceMs} ms`)
  }

  /** Stub data given without the counts' advice: nothing refused for it, as signing asks again and signs nothing uncounted. */
  private adviceSkipped(why: string): void {
    this.log({ level: 'warn', event: 'quota_unavailable', advisory: true, message: why })
  }

  /** One round trip to an object no subject is counted in, asking about no limit: it stores nothing. */
  async health(): Promise<{ ok: true; ms: number } | { ok: false; error: string }> {
    const started = Date.now()
    const why = (message: string) => ({ ok: false as const, error: `a quota object cannot be reached: ${message}` })
    try {
      const probe = this.namespace.get(this.namespace.idFromName('health'))
      const answered = await waitAtMost<unknown>(probe.ask({ limits: [], costWei: '0', count: false }), { ms: this.timeouts.healthMs })
      return 'value' in answered ? { ok: true, ms: Date.now() - started } : why(`no answer within ${this.timeouts.healthMs} ms`)
    } catch (error) {
      return why(messageOf(error))
    }
  }

  /** Asks every subject's object; `advisory` (stub data) logs, rather than throws, when they cannot be reached. */
  private async ask(options: { use: QuotaUse; count: boolean; advisory?: boolean }): Promise<() => Promise<void>> {
    const { use, count, advisory = false } = options
    const subjects = this.subjectsOf(use)
    // A cost not known yet must still fit: one wei, so that only a quota with nothing left says no.
    const costWei = (use.costWei ?? 1n).toString()
    // Async, so that a throw on the way to one object is a rejection like any other, after which the others are released.
    const settled = await Promise.allSettled(subjects.map(async (subject) => this.stubOf(subject).ask({ limits: subject.wire, costWei, count })))

    const counted = settled.flatMap((result, index) =>
      result.status === 'fulfilled' && result.value.granted && result.value.second !== undefined ? [{ subject: subjects[index]!, second: result.value.second }] : [],
    )
    const release = async () => {
      await Promise.all(
        counted.map(async ({ subject, second }) => {
          try {
            await this.stubOf(subject).release({ second, costWei })
          } catch (error) {
            // Left counted: the quota then errs on the safe side, by one sponsorship.
            this.log({ level: 'warn', event: 'quota_release_failed', per: subject.per, message: messageOf(error) })
          }
        }),
      )
    }

    const failure = settled.find((result): result is PromiseRejectedResult => result.status === 'rejected')
    if (failure && advisory) {
      // A subject that did answer may still say no, below.
      this.adviceSkipped(messageOf(failure.reason))
    } else if (failure) {
      await release()
      this.log({ level: 'error', event: 'quota_unavailable', message: messageOf(failure.reason) })
      throw new QuotaUnavailableError('the sponsorship quotas cannot be checked right now, so nothing was signed; try again shortly', {
        reason: 'quota_unavailable',
      })
    }
    const denials = settled.flatMap((result, index) =>
      result.status === 'fulfilled' && !result.value.granted ? [{ subject: subjects[index]!, answer: result.value }] : [],
    )
    if (denials.length > 0) {
      await release()
      // One more fits once every subject that said no lets it.
      const named = worstOf(denials, ({ answer }) => answer.retryAfterSeconds)
      const retryAfterSeconds = longestWait(denials.map(({ answer }) => answer.retryAfterSeconds))
      throw exceeded(named.subject, { ...named.answer, retryAfterSeconds }, use)
    }
    return release
  }

  private subjectsOf(use: QuotaUse): Subject[] {
    return this.kinds.map((kind) => {
      const id = kind.per === 'sender' ? use.sender.toLowerCase() : use.apiKeyId
      // The configuration allows per-API-key limits only where every request carries a verified key.
      if (id === undefined) throw new InternalError('a quota per API key, for a request without one')
      return { ...kind, name: `${kind.per}:${use.chainId}:${id}` }
    })
  }

  private stubOf(subject: Subject) {
    return this.namespace.get(this.namespace.idFromName(subject.name))
  }
}

function exceeded(subject: Subject, answer: Extract<QuotaAnswer, { granted: false }>, use: QuotaUse): QuotaExceededError {
  const limit = subject.limits[answer.limit]!
  const who = subject.per === 'sender' ? `sender ${use.sender}` : 'this API key'
  const per = `per ${limit.windowSeconds} s on chain ${use.chainId}`
  const data = {
    reason: 'quota_exceeded',
    per: subject.per,
    windowSeconds: limit.windowSeconds,
    limit: answer.exceeded,
    retryAfterSeconds: answer.retryAfterSeconds,
  }
  if (answer.exceeded === 'maxOperations') {
    const max = limit.maxOperations!
    return new QuotaExceededError(`${who} has had its ${max} sponsored operations ${per}; ${retryText(answer.retryAfterSeconds)}`, {
      ...data,
      max: String(max),
      used: String(answer.usedOperations),
    })
  }
  const max = limit.maxCostWei!
  const used = `${who} has had ${answer.usedCostWei} wei of its ${max} wei of sponsorship ${per}`
  const { costWei } = use
  if (costWei === undefined) {
    // Stub data: the operation's cost is not known, only that nothing is left.
    const message =
      answer.retryAfterSeconds === null
        ? `the quota of ${max} wei ${per} for ${who} sponsors nothing`
        : `${used}, and nothing is left; some is freed in ${answer.retryAfterSeconds} s`
    return new QuotaExceededError(message, { ...data, max: max.toString(), used: answer.usedCostWei })
  }
  const message =
    costWei > max
      ? `this operation alone may cost ${costWei} wei, more than the quota of ${max} wei ${per} for ${who}`
      : `${used}, and this operation may cost ${costWei} wei; ${retryText(answer.retryAfterSeconds)}`
  return new QuotaExceededError(message, { ...data, max: max.toString(), used: answer.usedCostWei, value: costWei.toString() })
}

function retryText(retryAfterSeconds: number | null): string {
  return retryAfterSeconds === null ? 'it never fits: it alone may cost more than a quota allows' : `one more fits in ${retryAfterSeconds} s`
}

function messageOf(error: unknown): string {
  return (error instanceof Error ? error.message : String(error)).slice(0, 200)
}
