/**
 * Holds a retried operation back after failures in a row, so a failing
 * service (KMS, for unlocks) is not called back to back: 0.5 s after the
 * first, doubling to 30 s, each ±25%. A success clears it.
 */
export class FailureBackoff {
  private failuresInARow = 0
  private notBefore = 0

  constructor(private readonly clock: { now: () => number; random: () => number }) {}

  /** Whether the operation must wait now. */
  get holding(): boolean {
    return this.notBefore !== 0 && this.clock.now() < this.notBefore
  }

  /** Whether the last attempt failed (held back or not): the next one is a probe. */
  get failing(): boolean {
    return this.failuresInARow > 0
  }

  /** Records a failure; answers how long the next attempt is held back (ms). */
  failed(): number {
    const backoffMs = Math.min(30_000, 500 * 2 ** this.failuresInARow++) * (0.75 + this.clock.random() / 2)
    this.notBefore = this.clock.now() + backoffMs
    return backoffMs
  }

  succeeded(): void {
    this.failuresInARow = 0
    this.notBefore = 0
  }
}
