/**
 * Zeroed byte arrays for frames and payloads, the small ones carved from
 * shared 16 KiB slabs. V8 gives every typed array over 64 bytes its own
 * off-heap backing store, which each young-generation GC must then sweep: at
 * thousands of SIGN round trips a second (four or five such arrays each, on
 * both sides of the connection) that sweep was a third or more of the
 * enclave's GC pause time. A slab is one backing store for a few hundred
 * frames.
 *
 * Slabs are never reused, so the bytes start zeroed as `new Uint8Array` would,
 * and a slab is freed once no array carved from it is alive. So these arrays
 * are for bytes that die soon (a frame on its way, a payload being decoded):
 * anything kept for long is copied out (the payload decoders do), or one
 * kept record would pin 16 KiB. Callers must use `byteOffset` with `.buffer`,
 * as for any view. Signing keys and the data key never pass through here
 * (frames carry them sealed or wrapped). The preload identity in an UNLOCK
 * does, as it went through a buffer of its own before, and it is decoded
 * into a string, which cannot be zeroed either way.
 */
const slabBytes = 16 * 1024
/** Above this an array gets its own backing store: large payloads are rare, and one must not pin a slab for long. */
const largestPooled = 256

let slab = new ArrayBuffer(slabBytes)
let used = 0

export function smallBytes(length: number): Uint8Array {
  if (length > largestPooled) return new Uint8Array(length)
  if (used + length > slabBytes) {
    slab = new ArrayBuffer(slabBytes)
    used = 0
  }
  const bytes = new Uint8Array(slab, used, length)
  // 8-byte steps keep every array aligned for DataView reads of any width.
  used += (length + 7) & ~7
  return bytes
}
