// Runtime-neutral (workerd and Node): the Worker's signers and quotas use it as the origin's processes do.

/** How a bounded wait ended: with the promise's value, or given up on, for want of time or because its caller stopped. */
export type Waited<T> = { value: T } | { gaveUp: 'timeout' | 'aborted' }

/**
 * `promise`, waited for at most `ms` and, given a `signal`, until it aborts. What is given up on goes on, unwatched
 * (its failure too); a failure before then is thrown. The timer and the abort listener go when the wait ends, so a
 * long-lived process or isolate keeps none of them.
 */
export async function waitAtMost<T>(promise: Promise<T>, { ms, signal }: { ms: number; signal?: AbortSignal }): Promise<Waited<T>> {
  if (signal?.aborted) {
    promise.catch(() => {})
    return { gaveUp: 'aborted' }
  }
  let timer: ReturnType<typeof setTimeout> | undefined
  let onAbort: (() => void) | undefined
  const gaveUp = new Promise<Waited<T>>((resolve) => {
    timer = setTimeout(() => resolve({ gaveUp: 'timeout' }), Math.max(ms, 0))
    onAbort = () => resolve({ gaveUp: 'aborted' })
    signal?.addEventListener('abort', onAbort, { once: true })
  })
  try {
    return await Promise.race([promise.then((value) => ({ value })), gaveUp])
  } finally {
    clearTimeout(timer)
    signal?.removeEventListener('abort', onAbort!)
  }
}
