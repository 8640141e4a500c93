import { getEventListeners } from 'node:events'
import { afterEach, describe, expect, it, vi } from 'vitest'
import { waitAtMost } from '../../enclave-origin/waitAtMost.js'

/** A promise that never settles on its own: what a wait gives up on. */
const never = () => new Promise<never>(() => {})

/** Unhandled rejections seen while `run` runs and a few turns after. */
async function unhandledDuring(run: () => Promise<void>): Promise<unknown[]> {
  const seen: unknown[] = []
  const listener = (reason: unknown) => seen.push(reason)
  process.on('unhandledRejection', listener)
  try {
    await run()
    await new Promise((resolve) => setTimeout(resolve, 20))
  } finally {
    process.off('unhandledRejection', listener)
  }
  return seen
}

describe('waitAtMost', () => {
  afterEach(() => {
    vi.useRealTimers()
  })

  it('answers the value when it comes in time', async () => {
    expect(await waitAtMost(Promise.resolve(7), { ms: 1_000 })).toEqual({ value: 7 })
  })

  it('throws a failure that comes in time', async () => {
    await expect(waitAtMost(Promise.reject(new Error('no')), { ms: 1_000 })).rejects.toThrow('no')
  })

  it('gives up for want of time, and for a caller who stopped (before or during the wait), saying which', async () => {
    expect(await waitAtMost(never(), { ms: 5 })).toEqual({ gaveUp: 'timeout' })
    const stopping = new AbortController()
    const waiting = waitAtMost(never(), { ms: 60_000, signal: stopping.signal })
    stopping.abort()
    expect(await waiting).toEqual({ gaveUp: 'aborted' })
    expect(await waitAtMost(Promise.resolve(1), { ms: 60_000, signal: AbortSignal.abort() })).toEqual({ gaveUp: 'aborted' })
  })

  it('leaves no abort listener and no timer behind, however the wait ends', async () => {
    vi.useFakeTimers()
    const signal = new AbortController().signal
    const ends = [
      () => waitAtMost(Promise.resolve(1), { ms: 1_000, signal }),
      () => waitAtMost(Promise.reject(new Error('no')), { ms: 1_000, signal }).catch(() => undefined),
      async () => {
        const waiting = waitAtMost(never(), { ms: 1_000, signal })
        await vi.advanceTimersByTimeAsync(1_000)
        return waiting
      },
    ]
    for (const end of ends) {
      await end()
      expect(getEventListeners(signal, 'abort')).toEqual([])
      expect(vi.getTimerCount()).toBe(0)
    }
    const stopping = new AbortController()
    const waiting = waitAtMost(never(), { ms: 1_000, signal: stopping.signal })
    stopping.abort()
    await waiting
    expect(getEventListeners(stopping.signal, 'abort')).toEqual([])
    expect(vi.getTimerCount()).toBe(0)
  })

  it('lets what it gave up on fail later unwatched, whether for time or a caller already gone', async () => {
    const unhandled = await unhandledDuring(async () => {
      for (const signal of [undefined, AbortSignal.abort()]) {
        let fail!: (error: Error) => void
        const late = new Promise<never>((_, reject) => (fail = reject))
        expect(await waitAtMost(late, { ms: 1, signal })).toHaveProperty('gaveUp')
        fail(new Error('too late'))
      }
    })
    expect(unhandled).toEqual([])
  })
})
