/**
 * HMAC-SHA256 request signing between the Worker (keyless backend) and the
 * parent's HTTPS API. Runtime-neutral (Web Crypto only): the same code signs
 * in workerd and verifies in Node.
 *
 * Signed string: METHOD \n path \n timestamp (unix ms) \n nonce \n hex(SHA-256(body)).
 * Headers: x-origin-key-id, x-origin-timestamp, x-origin-nonce, x-origin-signature (hex).
 */

export const signatureHeaders = {
  keyId: 'x-origin-key-id',
  timestamp: 'x-origin-timestamp',
  nonce: 'x-origin-nonce',
  signature: 'x-origin-signature',
} as const

const encoder = new TextEncoder()

function hex(bytes: ArrayBuffer | Uint8Array): string {
  return [...new Uint8Array(bytes)].map((b) => b.toString(16).padStart(2, '0')).join('')
}

async function hmacKey(secret: string): Promise<CryptoKey> {
  return crypto.subtle.importKey('raw', encoder.encode(secret), { name: 'HMAC', hash: 'SHA-256' }, false, ['sign', 'verify'])
}

async function stringToSign(options: { method: string; path: string; timestamp: string; nonce: string; body: Uint8Array }): Promise<Uint8Array> {
  const bodyHash = hex(await crypto.subtle.digest('SHA-256', options.body))
  return encoder.encode([options.method.toUpperCase(), options.path, options.timestamp, options.nonce, bodyHash].join('\n'))
}

/** The headers that authenticate one request. */
export async function signRequest(options: {
  keyId: string
  secret: string
  method: string
  path: string
  body: Uint8Array
  now?: number
}): Promise<Record<string, string>> {
  const timestamp = String(options.now ?? Date.now())
  const nonce = hex(crypto.getRandomValues(new Uint8Array(16)))
  const mac = await crypto.subtle.sign('HMAC', await hmacKey(options.secret), await stringToSign({ ...options, timestamp, nonce }))
  return {
    [signatureHeaders.keyId]: options.keyId,
    [signatureHeaders.timestamp]: timestamp,
    [signatureHeaders.nonce]: nonce,
    [signatureHeaders.signature]: hex(mac),
  }
}

export type VerificationFailure = 'missing' | 'unknown-key' | 'stale' | 'replayed' | 'bad-signature'

/**
 * Verifies signed requests: known key id, timestamp within `maxSkewMs` of now,
 * a nonce not seen within that window, and the MAC (compared in constant time
 * by crypto.subtle.verify). Nonces are remembered only as long as a timestamp
 * could still be accepted.
 */
export class RequestVerifier {
  private readonly keys = new Map<string, Promise<CryptoKey>>()
  private readonly seen = new Map<string, number>()

  constructor(
    private readonly options: { secrets: Record<string, string>; maxSkewMs?: number; now?: () => number },
  ) {
    for (const [keyId, secret] of Object.entries(options.secrets)) this.keys.set(keyId, hmacKey(secret))
  }

  async verify(options: { method: string; path: string; headers: (name: string) => string | undefined; body: Uint8Array }): Promise<VerificationFailure | undefined> {
    const keyId = options.headers(signatureHeaders.keyId)
    const timestamp = options.headers(signatureHeaders.timestamp)
    const nonce = options.headers(signatureHeaders.nonce)
    const signature = options.headers(signatureHeaders.signature)
    if (!keyId || !timestamp || !nonce || !signature || !/^[0-9a-f]{64}$/.test(signature) || !/^[0-9a-f]{16,64}$/.test(nonce)) return 'missing'
    const key = this.keys.get(keyId)
    if (!key) return 'unknown-key'
    const now = (this.options.now ?? Date.now)()
    const window = this.options.maxSkewMs ?? 30_000
    if (!/^\d{1,15}$/.test(timestamp) || Math.abs(now - Number(timestamp)) > window) return 'stale'
    this.forgetOldNonces(now, window)
    const nonceKey = `${keyId}:${nonce}`
    if (this.seen.has(nonceKey)) return 'replayed'
    const mac = Uint8Array.from(signature.match(/../g)!.map((byte) => parseInt(byte, 16)))
    const valid = await crypto.subtle.verify('HMAC', await key, mac, await stringToSign({ ...options, timestamp, nonce }))
    if (!valid) return 'bad-signature'
    this.seen.set(nonceKey, now)
    return undefined
  }

  private forgetOldNonces(now: number, window: number): void {
    // Map iteration is insertion order, and nonces are inserted in time order.
    for (const [nonce, at] of this.seen) {
      if (now - at <= 2 * window) break
      this.seen.delete(nonce)
    }
  }
}
