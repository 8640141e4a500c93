import { describe, expect, it } from 'vitest'
import { waitAtMost } from '../../backends/waitAtMost.js'

/** A promise that never settles on its own: what a wait gives up on. */
const never = () => new Promise<never>(() => {})

describe('waitAtMost', () => {
  it('answers the value when it comes in time', async () => {
    expect(await waitAtMost(Promise.resolve(7), { ms: 1_000 })).toEqual({ value: 7 })
  })

  it('throws a failure that comes in time', async () => {
    await expect(waitAtMost(Promise.reject(new Error('no')), { ms: 1_000 })).rejects.toThrow('no')
  })

  it('gives up for want of time, and for a caller who stopped, saying which', async () => {
    expect(await waitAtMost(never(), { ms: 5 })).toEqual({ gaveUp: 'timeout' })
    const stopping = new AbortController()
    const waiting = waitAtMost(never(), { ms: 60_000, signal: stopping.signal })
    stopping.abort()
    expect(await waiting).toEqual({ gaveUp: 'aborted' })
    expect(await waitAtMost(Promise.resolve(1), { ms: 60_000, signal: AbortSignal.abort() })).toEqual({ gaveUp: 'aborted' })
  })

  it('leaves no abort listener behind once the wait ends', async () => {
    const signal = new AbortController().signal
    const listeners = { added: 0, removed: 0 }
    const add = signal.addEventListener.bind(signal)
    const remove = signal.removeEventListener.bind(signal)
    signal.addEventListener = ((...args: Parameters<typeof add>) => (listeners.added++, add(...args))) as typeof add
    signal.removeEventListener = ((...args: Parameters<typeof remove>) => (listeners.removed++, remove(...args))) as typeof remove
    await waitAtMost(Promise.resolve(1), { ms: 1_000, signal })
    await waitAtMost(never(), { ms: 1, signal })
    expect(listeners).toEqual({ added: 2, removed: 2 })
  })

  it('lets what it gave up on fail later unwatched (no unhandled rejection)', async () => {
    let fail!: (error: Error) => void
    const late = new Promise<never>((_, reject) => (fail = reject))
    expect(await waitAtMost(late, { ms: 1 })).toEqual({ gaveUp: 'timeout' })
    fail(new Error('too late'))
    // An unhandled rejection would fail this run (vitest reports it); give it a turn to surface.
    await new Promise((resolve) => setTimeout(resolve, 10))
  })
})
