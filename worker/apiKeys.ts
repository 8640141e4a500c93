import { UnauthorizedError } from './errors.js'

/**
 * API keys from a Worker secret (comma separated). Presented keys are compared
 * as SHA-256 digests against every configured key without stopping early, so
 * the time taken says nothing about how much of a key matched, or which.
 */
export class ApiKeys {
  private readonly digests: Promise<Uint8Array[]>

  constructor(keys: readonly string[]) {
    this.digests = Promise.all(keys.map(sha256))
  }

  /** The keys in a secret's value; none when the secret is unset (or a binding, not a string). */
  static parse(secretValue: unknown): string[] {
    return (typeof secretValue === 'string' ? secretValue : '')
      .split(',')
      .map((key) => key.trim())
      .filter((key) => key.length > 0)
  }

  /**
   * Answers the key's id: the first 8 bytes of its SHA-256, in hex, which names it in quotas and logs without
   * saying anything of the key.
   */
  async verify(presented: string | undefined): Promise<string> {
    if (!presented) {
      throw new UnauthorizedError('an API key is required: send it in the x-api-key header or the apiKey query parameter', {
        reason: 'missing_api_key',
      })
    }
    const candidate = await sha256(presented)
    let matched = 0
    for (const digest of await this.digests) matched |= equalDigests(candidate, digest)
    if (!matched) throw new UnauthorizedError('the API key is not valid', { reason: 'invalid_api_key' })
    return [...candidate.subarray(0, 8)].map((byte) => byte.toString(16).padStart(2, '0')).join('')
  }
}

async function sha256(value: string): Promise<Uint8Array> {
  return new Uint8Array(await crypto.subtle.digest('SHA-256', new TextEncoder().encode(value)))
}

/** 1 when equal, else 0, in time independent of the contents. */
function equalDigests(a: Uint8Array, b: Uint8Array): number {
  let difference = a.length ^ b.length
  for (let i = 0; i < a.length; i++) difference |= a[i]! ^ b[i]!
  return difference === 0 ? 1 : 0
}
