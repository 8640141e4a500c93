import { hmac } from '@noble/hashes/hmac'
import { sha256 } from '@noble/hashes/sha2'
import { bytesToHex } from '@noble/hashes/utils'
import { FingerprintSet } from './fingerprintSet.js'

/**
 * HMAC-SHA256 request signing between the Worker (keyless backend) and the
 * parent's HTTPS API. Synchronous by design, so no request waits on Node's
 * small Web Crypto thread pool, which is what limits the parent at hundreds of
 * requests in flight. The default hashing (@noble/hashes) runs anywhere,
 * workerd included; the parent passes Node's native hashing (nodeHashing.ts),
 * several times cheaper per request.
 *
 * Signed string: key id \n method (as sent) \n path \n timestamp (unix ms) \n nonce \n hex(SHA-256(body)).
 * The key id is signed too, so that a request cannot be passed off as another
 * client's where two clients were given the same secret.
 * Headers: x-origin-key-id, x-origin-timestamp, x-origin-nonce, x-origin-signature (hex).
 */

/** Shortest HMAC secret the parent takes (and the Worker signs with): an empty or short one would let anyone who guesses it sign requests. */
export const minimumHmacSecretBytes = 16

export const signatureHeaders = {
  keyId: 'x-origin-key-id',
  timestamp: 'x-origin-timestamp',
  nonce: 'x-origin-nonce',
  signature: 'x-origin-signature',
} as const

const encoder = new TextEncoder()

/** The two primitives the signature needs, each answering lower-case hex; any correct implementation gives the same text. */
export type RequestHashing = {
  sha256Hex(data: Uint8Array): string
  /** HMAC-SHA256 of the message's UTF-8 bytes. */
  hmacSha256Hex(key: Uint8Array, message: string): string
}

/** Pure JavaScript: the default, and the one workerd (without nodejs_compat) can run. */
export const nobleHashing: RequestHashing = {
  sha256Hex: (data) => bytesToHex(sha256(data)),
  hmacSha256Hex: (key, message) => bytesToHex(hmac(sha256, key, encoder.encode(message))),
}

/** The signature, as lower-case hex. */
function mac(options: { hashing: RequestHashing; keyId: string; secret: Uint8Array; method: string; path: string; timestamp: string; nonce: string; body: Uint8Array }): string {
  const { hashing } = options
  // The method as sent: methods are case-sensitive, and a request signed for POST must not pass as `post`.
  const signed = `${options.keyId}\n${options.method}\n${options.path}\n${options.timestamp}\n${options.nonce}\n${hashing.sha256Hex(options.body)}`
  return hashing.hmacSha256Hex(options.secret, signed)
}

/** The headers that authenticate one request. */
export function signRequest(options: {
  keyId: string
  secret: string
  method: string
  path: string
  body: Uint8Array
  now?: number
  hashing?: RequestHashing
}): Record<string, string> {
  const timestamp = String(options.now ?? Date.now())
  // 122 random bits as 32 hex digits. Node's randomUUID draws from a buffered pool; getRandomValues
  // (what @noble's randomBytes calls) took about 8 µs per call there. workerd has both natively.
  const nonce = crypto.randomUUID().replaceAll('-', '')
  return {
    [signatureHeaders.keyId]: options.keyId,
    [signatureHeaders.timestamp]: timestamp,
    [signatureHeaders.nonce]: nonce,
    [signatureHeaders.signature]: mac({
      hashing: options.hashing ?? nobleHashing,
      keyId: options.keyId,
      secret: encoder.encode(options.secret),
      method: options.method,
      path: options.path,
      timestamp,
      nonce,
      body: options.body,
    }),
  }
}

export const verificationFailures = ['missing', 'unknown-key', 'stale', 'before-start', 'replayed', 'bad-signature'] as const
export type VerificationFailure = (typeof verificationFailures)[number]

/**
 * Verifies signed requests: known key id, timestamp no more than `maxSkewMs`
 * behind now nor `maxFutureSkewMs` ahead of it, a nonce not seen within that
 * window, and the MAC, compared in constant time. Nonces are remembered only as
 * long as a timestamp could still be accepted. Nonces live in memory, so a
 * request timestamped before `acceptsFrom` (when this verifier was made, plus
 * `maxFutureSkewMs`) is refused (`before-start`): an earlier process (a parent
 * restarted meanwhile) may have accepted it, ahead of its own clock as it may
 * have been, and a replay of, say, an unfreeze must not undo the freeze that
 * followed it. A process should wait `msUntilServing()` before it serves, or
 * it refuses every request until then (and after, while a wall clock stepped
 * back meanwhile has not reached `acceptsFrom`).
 */
export class RequestVerifier {
  private readonly secrets: Map<string, Uint8Array>
  private readonly maxSkewMs: number
  private readonly maxFutureSkewMs: number
  private readonly now: () => number
  private readonly hashing: RequestHashing
  /**
   * Nonces seen, newest generation first; each generation spans `maxSkewMs`
   * and three are kept. A request is acceptable from its timestamp − the future
   * skew to its timestamp + skew, so a nonce must be remembered for up to
   * 2 × skew after it is first seen (the future skew is at most the skew); it
   * is, since its generation is emptied only after two younger ones have each
   * run a full skew. A nonce is kept as a 64-bit
   * fingerprint of its key id and text (the head of their SHA-256), so the
   * store holds no object per request for the GC; two different nonces
   * sharing one would only have the second refused as a replay.
   */
  private readonly nonceGenerations = [new FingerprintSet(), new FingerprintSet(), new FingerprintSet()]
  private generationStartedAt = Number.NEGATIVE_INFINITY
  /**
   * The latest the clock has read. Timestamps are refused below it − skew,
   * and the nonce memory turns over by it: were the clock stepped back (an
   * NTP step, a restored VM), a request whose nonce was already forgotten
   * would otherwise be acceptable again.
   */
  private latestNow = Number.NEGATIVE_INFINITY
  /**
   * Nothing timestamped earlier is known not to be a replay: the process before this one may have accepted
   * requests up to `maxFutureSkewMs` ahead of its last reading of the clock, which was before this one began.
   */
  readonly acceptsFrom: number
  private readonly monotonicNow: () => number
  private readonly madeAtMonotonic: number

  /**
   * `maxSkewMs`: how far behind (default 30 s); `maxFutureSkewMs`: how far ahead (default 5 s); `now`: the wall
   * clock the timestamps are read against; `monotonicNow`: the clock `msUntilServing` waits on.
   */
  constructor(options: {
    secrets: Record<string, string>
    maxSkewMs?: number
    maxFutureSkewMs?: number
    now?: () => number
    monotonicNow?: () => number
    hashing?: RequestHashing
  }) {
    this.secrets = new Map(Object.entries(options.secrets).map(([keyId, secret]) => [keyId, encoder.encode(secret)]))
    this.maxSkewMs = options.maxSkewMs ?? 30_000
    this.maxFutureSkewMs = options.maxFutureSkewMs ?? 5_000
    // The nonce memory spans 2 × maxSkewMs: a longer window ahead would outlast it.
    if (this.maxFutureSkewMs > this.maxSkewMs) throw new Error('maxFutureSkewMs may not exceed maxSkewMs')
    this.now = options.now ?? Date.now
    this.hashing = options.hashing ?? nobleHashing
    this.acceptsFrom = this.now() + this.maxFutureSkewMs
    this.monotonicNow = options.monotonicNow ?? (() => performance.now())
    this.madeAtMonotonic = this.monotonicNow()
  }

  /**
   * How long a process should wait before serving: until `maxFutureSkewMs` has passed since this verifier was made,
   * timed on the monotonic clock, so that a wall clock stepped back meanwhile does not hold serving back by the step
   * (requests are refused `before-start` until the wall clock catches up, which is as safe).
   */
  msUntilServing(): number {
    return Math.max(0, this.maxFutureSkewMs - (this.monotonicNow() - this.madeAtMonotonic))
  }

  verify(options: { method: string; path: string; headers: (name: string) => string | undefined; body: Uint8Array }): VerificationFailure | undefined {
    const keyId = options.headers(signatureHeaders.keyId)
    const timestamp = options.headers(signatureHeaders.timestamp)
    const nonce = options.headers(signatureHeaders.nonce)
    const signature = options.headers(signatureHeaders.signature)
    if (!keyId || !timestamp || !nonce || !signature || !/^[0-9a-f]{64}$/.test(signature) || !/^[0-9a-f]{16,64}$/.test(nonce)) return 'missing'
    const secret = this.secrets.get(keyId)
    if (!secret) return 'unknown-key'
    const now = this.now()
    this.latestNow = Math.max(this.latestNow, now)
    if (!/^\d{1,15}$/.test(timestamp) || Number(timestamp) > now + this.maxFutureSkewMs || Number(timestamp) < this.latestNow - this.maxSkewMs) return 'stale'
    if (this.latestNow - this.generationStartedAt >= this.maxSkewMs) {
      const oldest = this.nonceGenerations.pop()!
      oldest.clear()
      this.nonceGenerations.unshift(oldest)
      this.generationStartedAt = this.latestNow
    }
    const fingerprint = this.hashing.sha256Hex(encoder.encode(`${keyId}:${nonce}`))
    const high = Number.parseInt(fingerprint.slice(0, 8), 16)
    const low = Number.parseInt(fingerprint.slice(8, 16), 16)
    if (this.nonceGenerations.some((generation) => generation.has(high, low))) return 'replayed'
    // Named fields, not `{ ...options }`: V8 took about 12 µs per request over that spread.
    const expected = mac({ hashing: this.hashing, keyId, secret, method: options.method, path: options.path, timestamp, nonce, body: options.body })
    if (!equalInConstantTime(signature, expected)) return 'bad-signature'
    // After the MAC: only a request the client really signed is counted as one from before this process.
    if (Number(timestamp) < this.acceptsFrom) return 'before-start'
    this.nonceGenerations[0]!.add(high, low)
    return undefined
  }
}

/** Hex text against hex text: the time depends on the length only, never on where they differ. */
function equalInConstantTime(a: string, b: string): boolean {
  let difference = a.length ^ b.length
  for (let i = 0; i < a.length; i++) difference |= a.charCodeAt(i) ^ b.charCodeAt(i)
  return difference === 0
}
