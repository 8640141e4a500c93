import { DurableObject } from 'cloudflare:workers'
import { QuotaLedger, type Bucket, type WindowLimit } from './quotaLedger.js'

/**
 * One quota subject's counts (a sender, or an API key, on one chain), in a Durable Object: one instance per subject
 * sees every Worker's requests for it, one at a time, so no two requests both take the last of a quota. The counts
 * live in its SQLite storage, and an answer leaves only once what it counted is stored (the output gate).
 */

/** What crosses the RPC boundary: numbers and strings (wei as decimal strings). */
export type QuotaLimitWire = { windowSeconds: number; maxOperations?: number; maxCostWei?: string }

export type QuotaAsk = {
  limits: QuotaLimitWire[]
  costWei: string
  /** Count it if granted (a signature follows), or only say whether it would be (the dry run). */
  count: boolean
}

export type QuotaAnswer =
  | { granted: true; /** Where it was counted, for `release`; none when not counted. */ second?: number }
  | {
      granted: false
      limit: number
      exceeded: 'maxOperations' | 'maxCostWei'
      usedOperations: number
      usedCostWei: string
      retryAfterSeconds: number | null
    }

type BucketRow = { second: number; seconds: number; operations: number; cost_wei: string }

export class SponsorshipQuota extends DurableObject {
  private ledger: QuotaLedger
  /** Whether the tables exist: a subject that is only ever asked about (stub data, dry runs) stores nothing. */
  private stored: boolean
  /**
   * How long counts are kept: the longest window this subject has been asked with since its storage was last emptied,
   * so that a shorter window in one deployment (a rollback, a gradual rollout) never deletes what a longer one in
   * another still counts.
   */
  private retainMs: number
  private alarmSet = false

  constructor(ctx: DurableObjectState, env: Cloudflare.Env) {
    super(ctx, env)
    const { sql } = ctx.storage
    this.stored = sql.exec("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'buckets'").toArray().length > 0
    const rows = this.stored ? sql.exec<BucketRow>('SELECT second, seconds, operations, cost_wei FROM buckets').toArray() : []
    this.ledger = new QuotaLedger(rows.map((row) => ({ second: row.second, seconds: row.seconds, operations: row.operations, costWei: BigInt(row.cost_wei) })))
    this.retainMs = this.stored ? (sql.exec<{ retain_ms: number }>('SELECT retain_ms FROM retention').toArray()[0]?.retain_ms ?? 0) : 0
  }

  async ask(ask: QuotaAsk): Promise<QuotaAnswer> {
    const nowMs = Date.now()
    const limits: WindowLimit[] = ask.limits.map((limit) => ({
      windowMs: limit.windowSeconds * 1000,
      maxOperations: limit.maxOperations,
      maxCostWei: limit.maxCostWei === undefined ? undefined : BigInt(limit.maxCostWei),
    }))
    const costWei = BigInt(ask.costWei)
    // Decided and counted with no await between: nothing else runs in this object meanwhile.
    const decision = this.ledger.decide(nowMs, costWei, limits)
    const lengths = limits.map((limit) => limit.windowMs)
    const longest = Math.max(...lengths)
    if (longest > this.retainMs) {
      this.retainMs = longest
      // Stored at once, asked or counted: a restart must not forget a longer window that was only ever asked with.
      if (this.stored) this.ctx.storage.sql.exec('UPDATE retention SET retain_ms = ?', this.retainMs)
    }
    const forgotten = this.ledger.prune(nowMs, limits, this.retainMs)
    if (forgotten !== undefined && this.stored) this.ctx.storage.sql.exec('DELETE FROM buckets WHERE second <= ?', forgotten)
    if (this.ledger.mergeIfMany(nowMs, [...lengths, this.retainMs]) && this.stored) this.storeAll()
    if (!decision.granted) {
      const { retryAfterMs, usedCostWei, ...rest } = decision
      return { ...rest, usedCostWei: usedCostWei.toString(), retryAfterSeconds: retryAfterMs === null ? null : Math.ceil(retryAfterMs / 1000) }
    }
    if (!ask.count) return { granted: true }
    const bucket = this.ledger.record(nowMs, costWei)
    await this.store(bucket)
    return { granted: true, second: bucket.second }
  }

  /** Takes back a counted sponsorship that was not signed after all. */
  async release(counted: { second: number; costWei: string }): Promise<void> {
    const bucket = this.ledger.release(counted.second, BigInt(counted.costWei))
    if (bucket) await this.store(bucket)
  }

  /** Empties the storage once the newest count has been kept as long as any window needs it; else waits for then. */
  override async alarm(): Promise<void> {
    this.alarmSet = false
    const due = this.dueMs()
    if (due !== undefined && Date.now() < due) return this.scheduleAlarm()
    await this.ctx.storage.deleteAll()
    this.ledger = new QuotaLedger([])
    this.stored = false
    this.retainMs = 0
  }

  private async store(bucket: Bucket): Promise<void> {
    const { sql } = this.ctx.storage
    if (!this.stored) {
      sql.exec('CREATE TABLE buckets (second INTEGER PRIMARY KEY, seconds INTEGER NOT NULL, operations INTEGER NOT NULL, cost_wei TEXT NOT NULL)')
      sql.exec('CREATE TABLE retention (retain_ms INTEGER NOT NULL)')
      // From here on, ask() stores the retention whenever it grows.
      sql.exec('INSERT INTO retention (retain_ms) VALUES (?)', this.retainMs)
      this.stored = true
    }
    this.storeBucket(bucket)
    if (!this.alarmSet) await this.scheduleAlarm()
  }

  private storeBucket(bucket: Bucket): void {
    this.ctx.storage.sql.exec(
      'INSERT INTO buckets (second, seconds, operations, cost_wei) VALUES (?, ?, ?, ?) ON CONFLICT (second) DO UPDATE SET seconds = excluded.seconds, operations = excluded.operations, cost_wei = excluded.cost_wei',
      bucket.second,
      bucket.seconds,
      bucket.operations,
      bucket.costWei.toString(),
    )
  }

  /** After buckets were merged: the table holds them as they are now. */
  private storeAll(): void {
    this.ctx.storage.sql.exec('DELETE FROM buckets')
    for (const bucket of this.ledger.all()) this.storeBucket(bucket)
  }

  private dueMs(): number | undefined {
    const newest = this.ledger.newestCountMs
    return newest === undefined ? undefined : newest + this.retainMs + 1
  }

  private async scheduleAlarm(): Promise<void> {
    const due = this.dueMs()
    if (due === undefined) return
    await this.ctx.storage.setAlarm(due)
    this.alarmSet = true
  }
}
