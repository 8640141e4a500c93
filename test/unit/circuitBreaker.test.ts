import { describe, expect, it } from 'vitest'
import { CircuitBreaker } from '../../backends/circuitBreaker.js'

function breakerWithClock() {
  const clock = { now: 0 }
  return { clock, breaker: new CircuitBreaker({ failureThreshold: 2, coolDownMs: 1_000, now: () => clock.now }) }
}

describe('circuit breaker', () => {
  it('calls in flight when it opened that fail later do not push the probe back', () => {
    const { clock, breaker } = breakerWithClock()
    const admissions = [breaker.tryAcquire(), breaker.tryAcquire(), breaker.tryAcquire()]
    expect(admissions).toEqual(['call', 'call', 'call'])
    breaker.failure('call')
    breaker.failure('call')
    expect(breaker.state).toBe('open')
    clock.now = 600
    breaker.failure('call')
    clock.now = 1_000
    expect(breaker.state).toBe('half-open')
    expect(breaker.tryAcquire()).toBe('probe')
  })

  it('a failed probe restarts the cool-down; a late failure of another call does not count as the probe', () => {
    const { clock, breaker } = breakerWithClock()
    breaker.tryAcquire()
    breaker.tryAcquire()
    breaker.tryAcquire()
    breaker.failure('call')
    breaker.failure('call')
    clock.now = 1_000
    expect(breaker.tryAcquire()).toBe('probe')
    breaker.failure('call')
    expect(breaker.state).toBe('half-open')
    expect(breaker.tryAcquire()).toBeUndefined()
    clock.now = 1_200
    breaker.failure('probe')
    expect(breaker.state).toBe('open')
    clock.now = 2_200
    expect(breaker.tryAcquire()).toBe('probe')
  })
})
