import { randomBytes } from 'node:crypto'
import { describe, expect, it } from 'vitest'
import { FingerprintSet } from '../../enclave-origin/protocol/fingerprintSet.js'

/** n random fingerprints as [high, low] pairs. */
function fingerprints(n: number): Array<[number, number]> {
  const words = new Uint32Array(randomBytes(n * 8).buffer)
  return Array.from({ length: n }, (_, i) => [words[2 * i]!, words[2 * i + 1]!])
}

describe('FingerprintSet (the parent\u2019s nonce store)', () => {
  it('finds every fingerprint it was given across many growths, and none it was not', () => {
    const set = new FingerprintSet(16)
    const added = fingerprints(50_000)
    for (const [high, low] of added) expect(set.add(high, low)).toBe(true)
    expect(set.size).toBe(50_000)
    expect(added.every(([high, low]) => set.has(high, low))).toBe(true)
    expect(fingerprints(50_000).filter(([high, low]) => set.has(high, low))).toHaveLength(0)
  })

  it('adds a fingerprint once, and tells apart those that share either half', () => {
    const set = new FingerprintSet()
    expect(set.add(7, 9)).toBe(true)
    expect(set.add(7, 9)).toBe(false)
    expect(set.has(7, 11)).toBe(false)
    expect(set.has(8, 9)).toBe(false)
    expect(set.add(0, 0)).toBe(true)
    expect(set.has(0, 0)).toBe(true)
    expect(set.size).toBe(2)
  })

  it('is empty after clear, and takes new fingerprints again', () => {
    const set = new FingerprintSet()
    const added = fingerprints(5_000)
    for (const [high, low] of added) set.add(high, low)
    set.clear()
    expect(set.size).toBe(0)
    expect(added.some(([high, low]) => set.has(high, low))).toBe(false)
    expect(set.add(added[0]![0], added[0]![1])).toBe(true)
    expect(set.has(added[0]![0], added[0]![1])).toBe(true)
  })
})
