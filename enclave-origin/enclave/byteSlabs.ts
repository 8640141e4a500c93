/**
 * Small byte strings of a few fixed lengths, kept as views into large shared
 * ArrayBuffers (slabs) rather than each in its own.
 *
 * Why: the key cache holds three small buffers per key (private key, public
 * key, sealed record). Each in its own ArrayBuffer, 50,000 keys made 150,000
 * ArrayBuffers, about 1 KB of V8 heap per key, and garbage collections that
 * walk and sweep all of them: the enclave's incremental marking took steps of
 * up to 14 ms, and its tail latency grew with the number of keys. Here a
 * slab holds many strings of one length; a view is one small object.
 *
 * A released string is zeroed at once and its place reused by the next
 * string of that length. So a view must not be used after its release: it
 * may by then hold someone else's bytes.
 */

/** Bytes per slab; a length larger than this gets a slab of its own length. */
const slabBytes = 64 * 1024

/** Every slot of one length: the slabs, which slots are live, and the free ones (index = slab × slotsPerSlab + slot). */
type SizeClass = { slotsPerSlab: number; slabs: Uint8Array[]; slabIndex: Map<ArrayBufferLike, number>; live: Uint8Array[]; free: number[] }

export type ByteSlabsStats = { views: number; slabs: number; bytes: number }

export class ByteSlabs {
  private readonly classes = new Map<number, SizeClass>()

  /** A view of `length` zero bytes. */
  allocate(length: number): Uint8Array {
    if (!Number.isInteger(length) || length < 1) throw new RangeError(`ByteSlabs: length must be a positive integer, got ${length}`)
    const sizeClass = this.sizeClass(length)
    let index = sizeClass.free.pop()
    if (index === undefined) {
      index = sizeClass.slabs.length * sizeClass.slotsPerSlab
      const slab = new Uint8Array(sizeClass.slotsPerSlab * length)
      sizeClass.slabIndex.set(slab.buffer, sizeClass.slabs.length)
      sizeClass.slabs.push(slab)
      sizeClass.live.push(new Uint8Array(sizeClass.slotsPerSlab))
      for (let slot = sizeClass.slotsPerSlab - 1; slot > 0; slot--) sizeClass.free.push(index + slot)
    }
    const slabAt = Math.floor(index / sizeClass.slotsPerSlab)
    const slot = index % sizeClass.slotsPerSlab
    sizeClass.live[slabAt]![slot] = 1
    return sizeClass.slabs[slabAt]!.subarray(slot * length, (slot + 1) * length)
  }

  /** A view holding a copy of `bytes`. */
  copy(bytes: Uint8Array): Uint8Array {
    const view = this.allocate(bytes.length)
    view.set(bytes)
    return view
  }

  /** Zeroes the view's bytes and frees its place. Throws for a view these slabs did not hand out, or one already released. */
  release(view: Uint8Array): void {
    const sizeClass = this.classes.get(view.length)
    const slabAt = sizeClass?.slabIndex.get(view.buffer)
    if (!sizeClass || slabAt === undefined || view.byteOffset % view.length !== 0) throw new RangeError('ByteSlabs: not a view from these slabs')
    const slot = view.byteOffset / view.length
    if (sizeClass.live[slabAt]![slot] === 0) throw new RangeError('ByteSlabs: view released twice')
    view.fill(0)
    sizeClass.live[slabAt]![slot] = 0
    sizeClass.free.push(slabAt * sizeClass.slotsPerSlab + slot)
  }

  /** Zeroes every slab and forgets them all; views handed out before now point at zeros. */
  clear(): void {
    for (const sizeClass of this.classes.values()) for (const slab of sizeClass.slabs) slab.fill(0)
    this.classes.clear()
  }

  stats(): ByteSlabsStats {
    let views = 0
    let slabs = 0
    let bytes = 0
    for (const sizeClass of this.classes.values()) {
      views += sizeClass.slabs.length * sizeClass.slotsPerSlab - sizeClass.free.length
      slabs += sizeClass.slabs.length
      for (const slab of sizeClass.slabs) bytes += slab.length
    }
    return { views, slabs, bytes }
  }

  private sizeClass(length: number): SizeClass {
    let sizeClass = this.classes.get(length)
    if (!sizeClass) this.classes.set(length, (sizeClass = { slotsPerSlab: Math.max(1, Math.floor(slabBytes / length)), slabs: [], slabIndex: new Map(), live: [], free: [] }))
    return sizeClass
  }
}
