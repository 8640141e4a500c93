import { randomInt } from 'node:crypto'
import type { LogsRequest, LogsResponse } from '../protocol/messages.js'
import type { KeyCacheAuditEvent } from './keyCache.js'

/** Longest line kept, in UTF-16 code units (so at most 3× that in UTF-8, which a LOGS answer's u16 length holds). */
const maxLineLength = 4_096

/**
 * The enclave's log lines, kept for the parent to collect (LOGS) and log as
 * its own: a production Nitro Enclave has no console, so a line only its
 * stdout saw (an audit of a grace signature, the preload's fingerprint)
 * would reach no one. A LOGS request acknowledges the lines the parent has
 * (those up to `after`, which then go), so a parent that restarts gets what
 * its predecessor had not acknowledged. Bounded by `maxBytes` of UTF-8: past
 * it the oldest lines go uncollected, and the next LOGS answer counts them
 * (and the one after, if none acknowledged that answer).
 * A line written `mustDeliver` (an audit) is never dropped for room: it
 * moves behind the newest line instead, with a new number (so a parent may
 * log it twice, never not at all). Such lines take at most a quarter of
 * `maxBytes`; past that, writing one throws, and its writer must not do
 * what the line would have recorded. With that room full, one ordinary
 * write in many moves them all (about 0.5 ms for 5,000): bounded, and
 * only while the parent is not collecting.
 * A queue with a moving head, not `Array.shift()`, which copies a large
 * array on every call: dropping a line must cost the event loop nothing.
 */
export class LogRing {
  /** Tells this process's lines from a restarted enclave's, whose numbering starts again. */
  readonly instance = randomInt(1, 2 ** 32)
  private lines: string[] = []
  /** Whether `lines[i]` must reach the parent (see `write`). */
  private mustDeliver: boolean[] = []
  private mustDeliverBytes = 0
  /** Index in `lines` of the oldest line kept; those before it are dropped, and go at the next compaction. */
  private head = 0
  /** The number of `lines[head]` (or of the next line, with none kept); lines are numbered from 1. */
  private first = 1
  private bytes = 0
  /** Lines dropped for room that no LOGS answer carried, since the last answer. */
  private lost = 0
  /**
   * What the last answer reported lost, and its last line's number: until a request acknowledges that line, the
   * answer may not have arrived, and its count is reported again (as its lines are).
   */
  private unacknowledged = { lost: 0, lastLine: 0 }

  constructor(private readonly options: { maxBytes: number }) {}

  /** Keeps `line` for the parent. Throws, keeping nothing, if it must be delivered and no room is left for such lines. */
  write(line: string, { mustDeliver = false }: { mustDeliver?: boolean } = {}): void {
    const kept = line.length > maxLineLength ? `${cutAt(line, maxLineLength - 1)}…` : line
    if (mustDeliver && this.mustDeliverBytes + Buffer.byteLength(kept) > this.options.maxBytes / 4) {
      throw new Error('the enclave log holds as many undelivered audit lines as it may: the parent has not collected them')
    }
    this.append(kept, mustDeliver)
    // Lines that must be delivered hold at most a quarter of maxBytes, so over it some other line is kept; still, each
    // line is visited at most once.
    for (let visits = this.kept; visits > 0 && this.bytes > this.options.maxBytes && this.kept > 1; visits--) {
      const moving = this.mustDeliver[this.head]!
      const oldest = this.lines[this.head]!
      // A line an answer carried is not lost, acknowledged or not (answers are seldom lost; counting it would cry
      // wolf each time a full ring drops what the parent has but has not yet acknowledged).
      if (!moving && this.first > this.unacknowledged.lastLine) this.lost += 1
      this.dropOldest()
      if (moving) this.append(oldest, true)
    }
  }

  /**
   * Drops the lines up to `after` when `instance` is this process's (the parent has them), and answers the oldest
   * of the rest that fit in `maxBytes` of UTF-8, at least one.
   */
  read({ instance, after, maxBytes }: LogsRequest & { maxBytes: number }): LogsResponse {
    if (instance === this.instance) {
      while (this.kept > 0 && this.first <= after) this.dropOldest()
      if (after >= this.unacknowledged.lastLine) this.unacknowledged.lost = 0
    }
    const lines: string[] = []
    let bytes = 0
    for (let index = this.head; index < this.lines.length; index++) {
      const line = this.lines[index]!
      const lineBytes = 2 + Buffer.byteLength(line)
      if (lines.length > 0 && bytes + lineBytes > maxBytes) break
      lines.push(line)
      bytes += lineBytes
    }
    this.unacknowledged = { lost: this.unacknowledged.lost + this.lost, lastLine: this.first + lines.length - 1 }
    this.lost = 0
    const skipped = Math.min(this.unacknowledged.lost, 2 ** 32 - 1)
    return { instance: this.instance, first: this.first, skipped, more: lines.length < this.kept, lines }
  }

  private get kept(): number {
    return this.lines.length - this.head
  }

  private append(line: string, mustDeliver: boolean): void {
    const bytes = Buffer.byteLength(line)
    this.lines.push(line)
    this.mustDeliver.push(mustDeliver)
    this.bytes += bytes
    if (mustDeliver) this.mustDeliverBytes += bytes
  }

  private dropOldest(): void {
    const bytes = Buffer.byteLength(this.lines[this.head]!)
    this.bytes -= bytes
    if (this.mustDeliver[this.head]) this.mustDeliverBytes -= bytes
    this.head += 1
    this.first += 1
    // Compacted once the dropped part is as long as the rest: each line is copied about once in all.
    if (this.head >= 1_024 && this.head * 2 >= this.lines.length) {
      this.lines = this.lines.slice(this.head)
      this.mustDeliver = this.mustDeliver.slice(this.head)
      this.head = 0
    }
  }
}

/**
 * The key cache's audits as log lines. A grace signature's audit reaches the
 * parent or throws, and the signature is not given. A withdrawal is kept so
 * when there is room, else it is an ordinary line (the log may then show a
 * grace signature that was not given: more, never fewer). Other audits (a
 * record that will not open, once per request for its key) are ordinary
 * lines, lest they use up the room grace audits need.
 */
export function auditLogger(logLine: (fields: Record<string, unknown>, options?: { mustDeliver?: boolean }) => void): (event: KeyCacheAuditEvent) => void {
  return (event) => {
    const fields = { level: 'warn', event: 'key_cache_audit', ...event }
    if (event.type === 'grace-signature') return logLine(fields, { mustDeliver: true })
    if (event.type === 'grace-signature-withdrawn') {
      try {
        return logLine(fields, { mustDeliver: true })
      } catch {
        // no room for it as an audit: an ordinary line, below
      }
    }
    logLine(fields)
  }
}

/** `text` cut to at most `length` code units, never between the two halves of a surrogate pair. */
function cutAt(text: string, length: number): string {
  const code = text.charCodeAt(length - 1)
  return text.slice(0, code >= 0xd800 && code <= 0xdbff ? length - 1 : length)
}
