import { randomInt } from 'node:crypto'
import type { LogsRequest, LogsResponse } from '../protocol/messages.js'

/** Longest line kept, in UTF-16 code units (so at most 3× that in UTF-8, which a LOGS answer's u16 length holds). */
const maxLineLength = 4_096

/**
 * The enclave's log lines, kept for the parent to collect (LOGS) and log as
 * its own: a production Nitro Enclave has no console, so a line only its
 * stdout saw (an audit of a grace signature, the preload's fingerprint)
 * would reach no one. A LOGS request acknowledges the lines the parent has
 * (those up to `after`, which then go), so a parent that restarts gets what
 * its predecessor had not collected, once. Bounded by `maxBytes` (UTF-16
 * code units, about bytes for the ASCII of JSON lines): past it the oldest
 * lines go uncollected, and the next LOGS answer counts them.
 */
export class LogRing {
  /** Tells this process's lines from a restarted enclave's, whose numbering starts again. */
  readonly instance = randomInt(1, 2 ** 32)
  private readonly lines: string[] = []
  /** The number of `lines[0]` (or of the next line, with none kept); lines are numbered from 1. */
  private first = 1
  private size = 0
  /** Lines dropped for room before any LOGS answer carried them, since the last answer. */
  private lost = 0

  constructor(private readonly options: { maxBytes: number }) {}

  write(line: string): void {
    const kept = line.length > maxLineLength ? `${line.slice(0, maxLineLength - 1)}…` : line
    this.lines.push(kept)
    this.size += kept.length
    while (this.size > this.options.maxBytes && this.lines.length > 1) {
      this.dropFirst()
      this.lost += 1
    }
  }

  /**
   * Drops the lines up to `after` when `instance` is this process's (the parent has them), and answers the oldest
   * of the rest that fit in `maxBytes` of UTF-8, at least one.
   */
  read({ instance, after, maxBytes }: LogsRequest & { maxBytes: number }): LogsResponse {
    if (instance === this.instance) while (this.lines.length > 0 && this.first <= after) this.dropFirst()
    const lines: string[] = []
    let bytes = 0
    for (const line of this.lines) {
      const lineBytes = 2 + Buffer.byteLength(line)
      if (lines.length > 0 && bytes + lineBytes > maxBytes) break
      lines.push(line)
      bytes += lineBytes
    }
    const skipped = Math.min(this.lost, 2 ** 32 - 1)
    this.lost = 0
    return { instance: this.instance, first: this.first, skipped, more: lines.length < this.lines.length, lines }
  }

  private dropFirst(): void {
    this.size -= this.lines.shift()!.length
    this.first += 1
  }
}
