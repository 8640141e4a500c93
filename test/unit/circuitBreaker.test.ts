import { describe, expect, it } from 'vitest'
import { CircuitBreaker } from '../../backends/circuitBreaker.js'

const call = { kind: 'call' } as const

/** A breaker on a hand-moved clock (threshold 2, cool-down 1 s, probe lease 3 s), opened at 0 by two of three calls let through failing. */
function openedBreaker() {
  const clock = { now: 0 }
  const breaker = new CircuitBreaker({ failureThreshold: 2, coolDownMs: 1_000, probeLeaseMs: 3_000, now: () => clock.now })
  const admissions = [breaker.tryAcquire(), breaker.tryAcquire(), breaker.tryAcquire()]
  breaker.failure(call)
  breaker.failure(call)
  return { clock, breaker, admissions }
}

const probe = { kind: 'probe', probe: expect.any(Number) }

describe('circuit breaker', () => {
  it('calls in flight when it opened that fail later do not push the probe back', () => {
    const { clock, breaker, admissions } = openedBreaker()
    expect(admissions).toEqual([call, call, call])
    expect(breaker.state).toBe('open')
    clock.now = 600
    breaker.failure(call)
    clock.now = 1_000
    expect(breaker.state).toBe('half-open')
    expect(breaker.tryAcquire()).toEqual(probe)
  })

  it('a probe given up before it answered frees the slot for the next probe, and leaves the breaker as it was', () => {
    const { clock, breaker } = openedBreaker()
    clock.now = 1_000
    const admitted = breaker.tryAcquire()!
    expect(breaker.tryAcquire()).toBeUndefined()
    breaker.release(admitted)
    expect(breaker.state).toBe('half-open')
    expect(breaker.tryAcquire()).toEqual(probe)
    // An ordinary call released changes nothing.
    breaker.release(call)
    expect(breaker.tryAcquire()).toBeUndefined()
  })

  it('gives a probe that never reports back (workerd dropped it with its request) its slot for the lease only', () => {
    const { clock, breaker } = openedBreaker()
    clock.now = 1_000
    const lost = breaker.tryAcquire()!
    expect(lost).toEqual(probe)
    clock.now = 3_999
    expect(breaker.tryAcquire()).toBeUndefined()
    clock.now = 4_000
    const next = breaker.tryAcquire()!
    expect(next).toEqual(probe)
    // The lost one, should it report after all, is not the probe in flight.
    breaker.failure(lost)
    expect(breaker.state).toBe('half-open')
    breaker.success()
    expect(breaker.state).toBe('closed')
  })

  it('a failed probe restarts the cool-down; a late failure of another call does not count as the probe', () => {
    const { clock, breaker } = openedBreaker()
    clock.now = 1_000
    const admitted = breaker.tryAcquire()!
    expect(admitted).toEqual(probe)
    breaker.failure(call)
    expect(breaker.state).toBe('half-open')
    expect(breaker.tryAcquire()).toBeUndefined()
    clock.now = 1_200
    breaker.failure(admitted)
    expect(breaker.state).toBe('open')
    clock.now = 2_200
    expect(breaker.tryAcquire()).toEqual(probe)
  })

  it('a probe that fails after a success closed the breaker and a new probe went out does not count as that probe', () => {
    const { clock, breaker } = openedBreaker()
    clock.now = 1_000
    const first = breaker.tryAcquire()!
    // A call from before the breaker opened succeeds: closed. Failures open it again, and after the cool-down a second probe goes out.
    breaker.success()
    breaker.failure(call)
    breaker.failure(call)
    clock.now = 2_000
    const second = breaker.tryAcquire()!
    expect(second).toEqual(probe)
    clock.now = 2_500
    breaker.failure(first)
    // The second probe is still the one out: no third, and the cool-down was not restarted.
    expect(breaker.state).toBe('half-open')
    expect(breaker.tryAcquire()).toBeUndefined()
    breaker.failure(second)
    expect(breaker.state).toBe('open')
  })
})
