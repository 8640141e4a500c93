import { base64ToBytes, bytesToBase64 } from './base64.js'
import { getAddress, hexToBytes, isHex, size, type Address, type Hex } from 'viem'
import { parseCompactSignature, parseDerSignature, toEthereumSignature } from './ecdsa.js'
import { deadlineSignal, healthOf, SignerError, signerErrorMessage, stoppedForCaller, type SignedDigest, type Signer, type SignerDescription, type SignerHealth, type SignOptions } from './signer.js'

export type HttpSignerOptions = {
  name: string
  /** Base URL of the key server: we call `${url}/sign` and `${url}/health`. */
  url: string
  keyId: string
  /** Bearer token from a Worker secret. */
  token: string | undefined
  /** The address the key server's key has; every signature is checked against it. */
  address: Address
  timeoutMs: number
  fetch?: typeof fetch
}

/**
 * A team's own key server behind a Keyless-style JSON contract:
 *
 *   POST {url}/sign    {key_id, algorithm: "ecdsa-secp256k1", data: base64(digest)}
 *                      → {signature, key_id}; signature is 0x-hex r‖s or r‖s‖v, or base64 DER
 *   POST {url}/health  → 2xx when the key can sign
 *
 * with `Authorization: Bearer <token>`. Whatever form the signature takes, it
 * is normalised to low-s and must recover to the configured address.
 */
export class HttpSigner implements Signer {

  private readonly checksummed: Address

  /** Without trailing slashes, so that `${url}/sign` never becomes `//sign`. */
  private readonly baseUrl: string

  constructor(private readonly options: HttpSignerOptions) {
    this.checksummed = getAddress(options.address)
    this.baseUrl = options.url.replace(/\/+$/, '')
  }

  async address(): Promise<Address> {
    return this.checksummed
  }

  private async post(path: string, body: unknown, signal?: AbortSignal): Promise<unknown> {
    const { token, timeoutMs, name } = this.options
    if (!token) throw new SignerError(`HTTP signer ${name}: its bearer token secret is not set`)
    let response: Response
    try {
      response = await (this.options.fetch ?? fetch)(`${this.baseUrl}${path}`, {
        method: 'POST',
        headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
        body: JSON.stringify(body),
        signal: deadlineSignal(timeoutMs, signal),
      })
    } catch (error) {
      if (signal?.aborted) throw stoppedForCaller(`HTTP signer ${name}`)
      const timedOut = (error as { name?: string }).name === 'TimeoutError'
      throw new SignerError(`HTTP signer ${name}: ${timedOut ? `no answer within ${timeoutMs} ms` : 'key server unreachable'}`, { retryable: true })
    }
    if (!response.ok) {
      await response.body?.cancel()
      const denied = response.status === 401 || response.status === 403
      throw new SignerError(`HTTP signer ${name}: key server answered ${response.status}${denied ? ' (check the bearer token)' : ''}`, {
        retryable: response.status >= 500 || response.status === 429,
      })
    }
    try {
      return await response.json()
    } catch {
      throw new SignerError(`HTTP signer ${name}: key server answered something other than JSON`)
    }
  }

  async signDigest(digest: Hex, options?: SignOptions): Promise<SignedDigest> {
    const { keyId, name } = this.options
    const answer = (await this.post('/sign', { key_id: keyId, algorithm: 'ecdsa-secp256k1', data: bytesToBase64(hexToBytes(digest)) }, options?.signal)) as {
      signature?: unknown
    }
    if (typeof answer?.signature !== 'string') throw new SignerError(`HTTP signer ${name}: answer has no signature`)
    const { r, s, recoveryIdHint } = parseSignature(answer.signature, name)
    const address = await this.address()
    return { signature: await toEthereumSignature({ r, s, digest, address, recoveryIdHint }), signedBy: name, address }
  }

  health(): Promise<SignerHealth> {
    // Healthy means the key server answers for this key; the address itself is configured.
    return healthOf({ address: () => this.post('/health', { key_id: this.options.keyId }).then(() => this.address()) })
  }

  describe(): SignerDescription {
    return { kind: 'http', name: this.options.name, securityLevel: 'software' }
  }
}

function parseSignature(value: string, name: string): { r: bigint; s: bigint; recoveryIdHint?: number } {
  if (isHex(value) && (size(value) === 64 || size(value) === 65)) {
    try {
      return parseCompactSignature(value)
    } catch (error) {
      throw new SignerError(`HTTP signer ${name}: malformed signature (${signerErrorMessage(error)})`)
    }
  }
  let der: Uint8Array
  try {
    der = base64ToBytes(value)
  } catch {
    throw new SignerError(`HTTP signer ${name}: signature is neither 64/65-byte hex nor base64 DER (not base64)`)
  }
  try {
    return parseDerSignature(der)
  } catch (error) {
    throw new SignerError(`HTTP signer ${name}: signature is neither 64/65-byte hex nor base64 DER (${signerErrorMessage(error)})`)
  }
}
