/**
 * A set of 64-bit fingerprints (two 32-bit halves), open addressing with
 * linear probing over one typed array. The parent remembers every request's
 * nonce for up to three skew windows: as strings in a Set, that was hundreds
 * of thousands of heap objects for the GC to copy, promote and mark, about
 * 100 bytes each; here an entry is 8 bytes the GC never looks inside.
 * The pair (0, 0) marks an empty slot, so the lowest bit of `low` is always
 * set: fingerprints that differ only there are one (63 bits count).
 */
export class FingerprintSet {
  private slots: Uint32Array
  private entries = 0

  constructor(initialCapacity = 1024) {
    let capacity = 16
    while (capacity < initialCapacity) capacity *= 2
    this.slots = new Uint32Array(capacity * 2)
  }

  get size(): number {
    return this.entries
  }

  has(high: number, low: number): boolean {
    return this.slotOf(high >>> 0, (low | 1) >>> 0) >= 0
  }

  /** Adds the fingerprint; false if it was there already. */
  add(high: number, low: number): boolean {
    const h = high >>> 0
    const l = (low | 1) >>> 0
    const found = this.slotOf(h, l)
    if (found >= 0) return false
    // Kept at most half full, so probes stay short.
    if ((this.entries + 1) * 2 > this.slots.length / 2) {
      this.grow()
      return this.add(h, l)
    }
    const slot = ~found
    this.slots[slot * 2] = h
    this.slots[slot * 2 + 1] = l
    this.entries++
    return true
  }

  /** Empties the set and keeps its memory, sized for the next generation of as many entries. */
  clear(): void {
    this.slots.fill(0)
    this.entries = 0
  }

  /** The slot holding the fingerprint, or ~(the empty slot where it would go). */
  private slotOf(high: number, low: number): number {
    const mask = this.slots.length / 2 - 1
    for (let slot = low & mask; ; slot = (slot + 1) & mask) {
      const slotLow = this.slots[slot * 2 + 1]!
      if (slotLow === 0) return ~slot
      if (slotLow === low && this.slots[slot * 2] === high) return slot
    }
  }

  private grow(): void {
    const old = this.slots
    this.slots = new Uint32Array(old.length * 2)
    this.entries = 0
    for (let i = 0; i < old.length; i += 2) if (old[i + 1] !== 0) this.add(old[i]!, old[i + 1]!)
  }
}
