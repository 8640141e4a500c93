import { describe, expect, it } from 'vitest'
import { SharedLoad } from '../../backends/sharedLoad.js'
import { SignerError } from '../../backends/signer.js'

/** Loads the test settles by hand, counted; a clock the test moves. */
function harness(options: { keepMs: number; abandonAfterMs?: number }) {
  const clock = { now: 0 }
  const loads: Array<{ resolve: (value: string) => void; reject: (error: Error) => void }> = []
  const shared = new SharedLoad<string>({
    load: () => new Promise<string>((resolve, reject) => loads.push({ resolve, reject })),
    abandonAfterMs: options.abandonAfterMs ?? 60_000,
    keepMs: options.keepMs,
    what: 'test signer: reading the key',
    now: () => clock.now,
  })
  return { clock, loads, shared }
}

describe('SharedLoad', () => {
  it('shares one load among the calls made while it runs, keeps its answer if told to, and forgets a failure', async () => {
    const { loads, shared } = harness({ keepMs: Infinity })
    const first = [shared.get(), shared.get()]
    expect(loads).toHaveLength(1)
    loads[0]!.reject(new SignerError('no key'))
    for (const call of first) await expect(call).rejects.toThrow('no key')
    const second = shared.get()
    expect(loads).toHaveLength(2)
    loads[1]!.resolve('key')
    expect(await second).toBe('key')
    expect(await shared.get()).toBe('key')
    expect(loads).toHaveLength(2)
  })

  it("stops a caller's wait when its signal aborts, the load going on for the others; and starts none for a caller already gone", async () => {
    const { loads, shared } = harness({ keepMs: Infinity })
    const gone = new AbortController()
    gone.abort()
    await expect(shared.get(gone.signal)).rejects.toMatchObject({ message: 'test signer: reading the key: stopped waiting, as its caller no longer waits', options: { retryable: true } })
    expect(loads).toHaveLength(0)
    const leaving = new AbortController()
    const stopped = shared.get(leaving.signal)
    const patient = shared.get()
    leaving.abort()
    await expect(stopped).rejects.toThrow('stopped waiting, as its caller no longer waits')
    loads[0]!.resolve('key')
    expect(await patient).toBe('key')
    expect(loads).toHaveLength(1)
  })

  it('keeps an answer for keepMs, then loads again (0: at every call after it)', async () => {
    for (const keepMs of [0, 5_000]) {
      const { clock, loads, shared } = harness({ keepMs })
      const first = shared.get()
      loads[0]!.resolve('one')
      expect(await first).toBe('one')
      clock.now = keepMs - 1
      if (keepMs > 0) expect(await shared.get()).toBe('one')
      clock.now = keepMs
      const second = shared.get()
      expect(loads).toHaveLength(2)
      loads[1]!.resolve('two')
      expect(await second).toBe('two')
    }
  })

  it('gives up on a load that never settles (workerd dropped it with the request that started it), and starts another', async () => {
    const { clock, loads, shared } = harness({ keepMs: Infinity, abandonAfterMs: 1_000 })
    const started = Date.now()
    const stuck = shared.get()
    // A caller joining later waits only until the same deadline, counted from the load's start.
    clock.now = 900
    const joined = shared.get()
    expect(loads).toHaveLength(1)
    const refusal = new SignerError('test signer: reading the key: no answer within 1000 ms; retry shortly', { retryable: true })
    await expect(joined).rejects.toThrow(refusal.message)
    // 100 ms after it joined, not the 1,000 of a deadline of its own.
    expect(Date.now() - started).toBeLessThan(800)
    await expect(stuck).rejects.toSatisfy((error: unknown) => error instanceof SignerError && error.options.retryable && error.message === refusal.message)
    // Past the deadline, the next call starts a new load, which answers.
    clock.now = 1_000
    const fresh = shared.get()
    expect(loads).toHaveLength(2)
    loads[1]!.resolve('key')
    expect(await fresh).toBe('key')
    // The abandoned one settling late changes nothing.
    loads[0]!.resolve('late')
    expect(await shared.get()).toBe('key')
  })
})
