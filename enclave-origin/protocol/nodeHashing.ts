import { createHash, createHmac } from 'node:crypto'
import type { RequestHashing } from './requestSigning.js'

/** Node's native SHA-256 and HMAC for request signing: what the parent (and the benchmark's client) use. */
export const nodeHashing: RequestHashing = {
  sha256: (data) => createHash('sha256').update(data).digest(),
  hmacSha256: (key, data) => createHmac('sha256', key).update(data).digest(),
}
