import { describe, expect, it } from 'vitest'
import { ByteSlabs } from '../../enclave-origin/enclave/byteSlabs.js'

describe('ByteSlabs', () => {
  it('hands out zeroed views of one length from one shared buffer, and copies into them', () => {
    const slabs = new ByteSlabs()
    const a = slabs.allocate(32)
    const b = slabs.copy(new Uint8Array(32).fill(7))

    expect(a).toEqual(new Uint8Array(32))
    expect(b).toEqual(new Uint8Array(32).fill(7))
    expect(a.buffer).toBe(b.buffer)
    expect(b.byteOffset - a.byteOffset).toBe(32)
    expect(slabs.stats()).toEqual({ views: 2, slabs: 1, bytes: 65_536 })
  })

  it('keeps each length in its own slabs, and starts a new slab when one is full', () => {
    const slabs = new ByteSlabs()
    const views = Array.from({ length: 2_049 }, () => slabs.allocate(32))
    const other = slabs.allocate(60)

    expect(new Set(views.map((view) => view.buffer)).size).toBe(2)
    expect(views.some((view) => view.buffer === other.buffer)).toBe(false)
    expect(slabs.stats()).toMatchObject({ views: 2_050, slabs: 3 })
  })

  it('zeroes a released view at once and gives its place to the next view of that length', () => {
    const slabs = new ByteSlabs()
    const first = slabs.copy(new Uint8Array(32).fill(1))
    slabs.copy(new Uint8Array(32).fill(2))

    slabs.release(first)
    expect(first).toEqual(new Uint8Array(32))
    const reused = slabs.copy(new Uint8Array(32).fill(3))

    expect(reused.buffer).toBe(first.buffer)
    expect(reused.byteOffset).toBe(first.byteOffset)
    expect(slabs.stats().views).toBe(2)
  })

  it('refuses to release a view twice, or one it did not hand out', () => {
    const slabs = new ByteSlabs()
    const view = slabs.allocate(32)
    slabs.release(view)

    expect(() => slabs.release(view)).toThrow('released twice')
    expect(() => slabs.release(new Uint8Array(32))).toThrow('not a view from these slabs')
    const slab = new Uint8Array(slabs.allocate(32).buffer)
    expect(() => slabs.release(slab.subarray(1, 33))).toThrow('not a view from these slabs')
    expect(slabs.stats().views).toBe(1)
  })

  it('gives a length larger than a slab a buffer of its own', () => {
    const slabs = new ByteSlabs()
    const big = slabs.allocate(100_000)

    expect(big.buffer.byteLength).toBe(100_000)
    slabs.release(big)
    expect(slabs.allocate(100_000).buffer).toBe(big.buffer)
  })

  it('zeroes everything on clear()', () => {
    const slabs = new ByteSlabs()
    const views = [slabs.copy(new Uint8Array(32).fill(9)), slabs.copy(new Uint8Array(65).fill(9))]

    slabs.clear()

    expect(views).toEqual([new Uint8Array(32), new Uint8Array(65)])
    expect(slabs.stats()).toEqual({ views: 0, slabs: 0, bytes: 0 })
  })

  it('refuses a length that is not a positive integer', () => {
    expect(() => new ByteSlabs().allocate(0)).toThrow(RangeError)
    expect(() => new ByteSlabs().allocate(1.5)).toThrow(RangeError)
  })
})
