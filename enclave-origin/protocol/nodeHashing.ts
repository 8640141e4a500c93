import { hash } from 'node:crypto'
import type { RequestHashing } from './requestSigning.js'

const blockBytes = 64
const digestBytes = 32

/**
 * Where HMAC's two padded blocks are assembled: reused by every call (they
 * are synchronous), so that a request allocates no buffer for them. The inner
 * one grows to the longest message seen.
 */
let inner = Buffer.alloc(blockBytes + 256)
const outer = Buffer.alloc(blockBytes + digestBytes)

/**
 * Node's native SHA-256 and HMAC-SHA256 for request signing: what the parent
 * (and the benchmark's client) use. Both go through the one-shot
 * `crypto.hash` with hex output, and HMAC is built from it as RFC 2104
 * defines it. `createHash` and `createHmac` each leave a native object behind
 * that V8 can only free through a weak-handle callback during a
 * young-generation GC: at 1,600 signs a second those callbacks took 2–15 ms
 * of each scavenge pause in the parent, whose event loop stands still
 * meanwhile. Hex output also saves the ArrayBuffer (and its GC sweep) that
 * a Buffer result would cost.
 */
export const nodeHashing: RequestHashing = {
  sha256Hex: (data) => hash('sha256', data, 'hex'),
  hmacSha256Hex: (key, message) => {
    const block = key.length > blockBytes ? Buffer.from(hash('sha256', key, 'hex'), 'hex') : key
    const messageBytes = Buffer.byteLength(message)
    if (inner.length < blockBytes + messageBytes) inner = Buffer.alloc(blockBytes + messageBytes)
    inner.fill(0x36, 0, blockBytes)
    outer.fill(0x5c, 0, blockBytes)
    for (let i = 0; i < block.length; i++) {
      inner[i]! ^= block[i]!
      outer[i]! ^= block[i]!
    }
    inner.write(message, blockBytes, 'utf8')
    outer.write(hash('sha256', inner.subarray(0, blockBytes + messageBytes), 'hex'), blockBytes, 'hex')
    const mac = hash('sha256', outer, 'hex')
    // The padded blocks are the key in all but name: not left lying in the shared buffers.
    inner.fill(0, 0, blockBytes)
    outer.fill(0, 0, blockBytes)
    return mac
  },
}
