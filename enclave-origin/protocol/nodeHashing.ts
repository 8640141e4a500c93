import { hash } from 'node:crypto'
import type { RequestHashing } from './requestSigning.js'

const blockBytes = 64
const sha256 = (data: Uint8Array): Buffer => hash('sha256', data, 'buffer') as unknown as Buffer

/**
 * Node's native SHA-256 and HMAC-SHA256 for request signing: what the parent
 * (and the benchmark's client) use. Both go through the one-shot
 * `crypto.hash`, and HMAC is built from it as RFC 2104 defines it, because
 * `createHash` and `createHmac` each leave a native object behind that V8
 * can only free through a weak-handle callback during a young-generation GC:
 * at 1,600 signs a second those callbacks took 2–15 ms of each scavenge
 * pause in the parent, whose event loop stands still meanwhile.
 */
export const nodeHashing: RequestHashing = {
  sha256,
  hmacSha256: (key, data) => {
    const block = key.length > blockBytes ? sha256(key) : key
    const inner = Buffer.allocUnsafe(blockBytes + data.length).fill(0x36, 0, blockBytes)
    const outer = Buffer.allocUnsafe(blockBytes + 32).fill(0x5c, 0, blockBytes)
    for (let i = 0; i < block.length; i++) {
      inner[i]! ^= block[i]!
      outer[i]! ^= block[i]!
    }
    inner.set(data, blockBytes)
    outer.set(sha256(inner), blockBytes)
    return sha256(outer)
  },
}
