/**
 * The histograms an enclave keeps and reports in its HEALTH answer, as one
 * count per upper bound with a last count for everything above. The enclave
 * fills them and the parent writes them out for Prometheus, so both read the
 * bounds from here (and the parent loads nothing of the enclave's to do it).
 */

/** Inline re-derivation (rehydrate) latency, in ms. */
export const rehydrateBucketsMs = [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10]

/** Signs per message to a signing thread. */
export const batchSizeBuckets = [1, 2, 4, 8, 16, 32]

export function emptyCounts(bounds: readonly number[]): number[] {
  return new Array<number>(bounds.length + 1).fill(0)
}

/** Counts `value` in the first bucket whose bound it does not exceed, or in the last. */
export function countInto(counts: number[], bounds: readonly number[], value: number): void {
  const bucket = bounds.findIndex((upper) => value <= upper)
  counts[bucket === -1 ? bounds.length : bucket]! += 1
}
