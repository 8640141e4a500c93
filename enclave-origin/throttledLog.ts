/**
 * Log lines of one kind at most once every 10 s, each counting (`count`) the
 * occurrences since the last: a flood of forged requests, or of signs for
 * the keys of an enclave that is down, must not flood the log. A line
 * counts the occurrences since the previous line of its kind, so a burst's
 * tail is told with the next burst. Kinds must be few (a route and a
 * reason, not a key id): each is remembered. On a monotonic clock: a wall
 * clock stepped back would silence a kind until it caught up.
 */
export class ThrottledLog {
  private readonly byKind = new Map<string, { loggedAt: number; unlogged: number }>()
  private readonly log: (fields: Record<string, unknown>) => void
  private readonly intervalMs: number
  private readonly now: () => number

  constructor({ log, intervalMs = 10_000, now = () => performance.now() }: { log: (fields: Record<string, unknown>) => void; intervalMs?: number; now?: () => number }) {
    this.log = log
    this.intervalMs = intervalMs
    this.now = now
  }

  write(kind: string, fields: Record<string, unknown>): void {
    const now = this.now()
    const last = this.byKind.get(kind)
    if (last && now - last.loggedAt < this.intervalMs) {
      last.unlogged++
      return
    }
    this.byKind.set(kind, { loggedAt: now, unlogged: 0 })
    this.log({ ...fields, count: (last?.unlogged ?? 0) + 1 })
  }
}
