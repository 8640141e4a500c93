/**
 * When each key last stopped being active (frozen, archived), by a count of such changes. A signature is made
 * from a `mark` read before it: its key was deactivated meanwhile if `deactivatedSince` says so, even if it is
 * active again by the time the signature is back. The enclave's key cache and the parent each keep one.
 */
export class DeactivationMarks {
  private count = 0
  private readonly lastByKey = new Map<string, number>()

  /** Read before a signature is made. */
  get mark(): number {
    return this.count
  }

  deactivated(keyId: string): void {
    this.lastByKey.set(keyId, ++this.count)
  }

  /** Whether the key stopped being active after `mark` was read. A number compare unless some key did. */
  deactivatedSince(keyId: string, mark: number): boolean {
    return mark !== this.count && (this.lastByKey.get(keyId) ?? 0) > mark
  }

  /** Forgets every key (marks already read stay comparable: the count goes on). */
  clear(): void {
    this.lastByKey.clear()
  }
}
