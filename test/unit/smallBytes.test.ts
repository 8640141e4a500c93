import { describe, expect, it } from 'vitest'
import { smallBytes } from '../../enclave-origin/protocol/smallBytes.js'

describe('smallBytes', () => {
  it('carves small arrays from one shared slab, each zeroed, 8-byte aligned and independent of its neighbours', () => {
    const first = smallBytes(69)
    const second = smallBytes(79)
    expect(second.buffer).toBe(first.buffer)
    expect(second.byteOffset).toBe(first.byteOffset + 72)
    expect([first.length, second.length]).toEqual([69, 79])
    expect(first.every((byte) => byte === 0) && second.every((byte) => byte === 0)).toBe(true)
    first.fill(0xff)
    expect(second.every((byte) => byte === 0)).toBe(true)
    expect(Object.getPrototypeOf(first)).toBe(Uint8Array.prototype)
  })

  it('starts a new zeroed slab when one is full, and gives a large array its own buffer', () => {
    const first = smallBytes(200)
    let later = smallBytes(200)
    for (let i = 0; i < 100 && later.buffer === first.buffer; i++) later = smallBytes(200)
    expect(later.buffer).not.toBe(first.buffer)
    expect(later.every((byte) => byte === 0)).toBe(true)
    const large = smallBytes(257)
    expect(large.byteOffset).toBe(0)
    expect(large.buffer.byteLength).toBe(257)
  })
})
