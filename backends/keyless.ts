import { getAddress, isHex, size, type Address, type Hex } from 'viem'
import { jsonObjectOf } from '../enclave-origin/errors.js'
import { minimumHmacSecretBytes, signRequest } from '../enclave-origin/protocol/requestSigning.js'
import { waitAtMost } from '../enclave-origin/waitAtMost.js'
import { parseCompactSignature, toEthereumSignature } from './ecdsa.js'
import { deadlineSignal, healthOf, SignerError, signerErrorMessage, stoppedForCaller, type SignedDigest, type Signer, type SignerDescription, type SignerHealth, type SignOptions } from './signer.js'

export type KeylessSignerOptions = {
  name: string
  /** The parent's HTTPS API, e.g. https://origin.internal:8443 */
  url: string
  /** The origin key that signs for this paymaster. */
  keyId: string
  /** The address that key has, as the operator who made it recorded: every signature is checked against it. */
  address: Address
  /** HMAC credentials the parent knows this Worker by; the secret comes from a Worker secret. */
  hmacKeyId: string
  hmacSecret: string | undefined
  /** Everything one signature may take, waits for an unlock included. */
  deadlineMs: number
  /**
   * The `mtls_certificates` binding every request goes through, presenting its client certificate; `binding` is
   * what the Worker env holds under `bindingName` (checked at each request: a missing one is a configuration error).
   */
  clientCertificate?: { bindingName: string; binding: unknown }
  fetch?: typeof fetch
}

/** What an `mtls_certificates` binding is in a Worker env: a fetch that presents the certificate. */
type CertificateFetcher = { fetch: typeof fetch }

const isFetcher = (binding: unknown): binding is CertificateFetcher => typeof binding === 'object' && binding !== null && typeof (binding as CertificateFetcher).fetch === 'function'

/**
 * The enclave origin as a signer: HMAC-signed requests to the parent, which
 * forwards them to the enclave holding the key. When the enclave must first
 * unlock the key (503 with Retry-After), the backend waits and asks again
 * while its deadline allows; past that it fails, so a fallback chain moves on.
 * It stops as soon as its caller's signal says the chain has moved on. Each
 * signature is checked against the configured address, never one the parent
 * reports: the parent host is outside the enclave.
 */
export class KeylessSigner implements Signer {
  /** Without trailing slashes: the parent's HMAC covers the path as we write it, and `//v1/…` is not that path. */
  private readonly baseUrl: string
  private readonly checksummed: Address
  /** What is wrong with the HMAC secret, once for all requests; each fails saying so. */
  private readonly secretFault: string | undefined

  constructor(private readonly options: KeylessSignerOptions) {
    this.baseUrl = options.url.replace(/\/+$/, '')
    this.checksummed = getAddress(options.address)
    this.secretFault = hmacSecretFault(options.hmacSecret)
  }

  /** Global fetch, or the client certificate's binding's (called on the binding: a Fetcher's fetch needs its `this`). */
  private fetcher(): typeof fetch {
    const { clientCertificate, name } = this.options
    if (!clientCertificate) return this.options.fetch ?? fetch
    const { binding, bindingName } = clientCertificate
    if (!isFetcher(binding)) {
      throw new SignerError(`keyless signer ${name}: clientCertificate names ${bindingName}, which is not an mtls_certificates binding of this Worker (add it under [[mtls_certificates]] in wrangler.toml)`)
    }
    return (input, init) => binding.fetch(input, init)
  }

  /**
   * One call to the parent, within `deadline` (its own), waiting out a Retry-After only if the call could still end
   * by then and by `callerDeadline` (see SignOptions); a call its caller gives up on is stopped by `signal`.
   */
  private async request({
    method,
    path,
    body,
    deadline,
    callerDeadline = Number.POSITIVE_INFINITY,
    signal,
  }: {
    method: 'GET' | 'POST'
    path: string
    body?: unknown
    deadline: number
    callerDeadline?: number
    signal?: AbortSignal
  }): Promise<Record<string, unknown>> {
    const { name, hmacKeyId, hmacSecret } = this.options
    if (this.secretFault !== undefined || !hmacSecret) throw new SignerError(`keyless signer ${name}: its HMAC secret ${this.secretFault}`)
    const payload = new TextEncoder().encode(body === undefined ? '' : JSON.stringify(body))
    const send = this.fetcher()
    for (;;) {
      if (signal?.aborted) throw stoppedForCaller(`keyless signer ${name}`)
      const remaining = deadline - Date.now()
      if (remaining <= 0) throw new SignerError(`keyless signer ${name}: no signature within ${this.options.deadlineMs} ms`, { retryable: true })
      const headers = await signRequest({ keyId: hmacKeyId, secret: hmacSecret, method, path, body: payload })
      let response: Response
      try {
        response = await send(`${this.baseUrl}${path}`, {
          method,
          headers: { 'content-type': 'application/json', ...headers },
          body: method === 'POST' ? payload : undefined,
          signal: deadlineSignal(remaining, signal),
          // Never followed: a redirect would carry the signed request elsewhere (to be replayed within its window),
          // or turn the POST into a GET the parent refuses as a bad signature.
          redirect: 'manual',
        })
      } catch {
        if (signal?.aborted) throw stoppedForCaller(`keyless signer ${name}`)
        throw new SignerError(`keyless signer ${name}: the origin is unreachable or did not answer in time`, { retryable: true })
      }
      const retryAfterMs = retryAfterMsOf(response.headers)
      if (response.status === 503 && Number.isFinite(retryAfterMs) && Date.now() + retryAfterMs + minimumRetryTimeMs <= Math.min(deadline, callerDeadline)) {
        // A body that already broke off has nothing left to cancel.
        await response.body?.cancel().catch(() => {})
        // A wait for nothing, bounded: `retryAfterMs`, or less if the caller stops first (the loop then says so).
        await waitAtMost(new Promise<never>(() => {}), { ms: retryAfterMs, signal })
        continue
      }
      let text: string
      try {
        text = await response.text()
      } catch {
        if (signal?.aborted) throw stoppedForCaller(`keyless signer ${name}`)
        // The deadline, or the connection, ended the answer after its status: a 200 cut short is no malformed signature.
        throw new SignerError(`keyless signer ${name}: the origin's answer broke off or did not arrive in time`, { retryable: true })
      }
      // An empty object where the origin sent none (a proxy's error page, say).
      const answer = jsonObjectOf(text) ?? {}
      if (response.ok) return answer
      // Our own words for the status, not the origin's text: this message reaches wallets, and the
      // parent's logs and metrics hold the detail for its operator.
      const reason =
        answer.error === 'needs_unlock'
          ? 'the key is still being unlocked'
          : answer.error === 'overloaded'
            ? 'it is overloaded'
            : answer.error === 'no such route'
              ? 'no such route: check the url'
              : response.status >= 300 && response.status < 400
                ? 'a redirect, which it does not follow: check the url'
                : (originStatusMeanings[response.status] ?? 'an unexpected answer')
      throw new SignerError(`keyless signer ${name}: the origin answered ${response.status} (${reason})`, {
        retryable: response.status >= 500 || response.status === 429,
      })
    }
  }

  private path(suffix = ''): string {
    return `/v1/keys/${encodeURIComponent(this.options.keyId)}${suffix}`
  }

  async address(): Promise<Address> {
    return this.checksummed
  }

  /** The key as the origin reports it: its address, and its state where the origin gives one. */
  private async lookUpKey(): Promise<{ address: Address; state: unknown }> {
    const key = await this.request({ method: 'GET', path: this.path(), deadline: Date.now() + this.options.deadlineMs })
    if (typeof key.address !== 'string') throw new SignerError(`keyless signer ${this.options.name}: the origin returned no address`)
    return { address: getAddress(key.address), state: key.state }
  }

  async signDigest(digest: Hex, options?: SignOptions): Promise<SignedDigest> {
    const address = this.checksummed
    // The caller's deadline only decides whether a Retry-After is worth waiting out: its own timer (a chain's) stops
    // the call through `signal`, so a call that simply hangs is the caller's timeout, as before.
    const answer = await this.request({
      method: 'POST',
      path: this.path('/sign'),
      body: { digest },
      deadline: Date.now() + this.options.deadlineMs,
      callerDeadline: options?.deadline,
      signal: options?.signal,
    })
    const signature = answer.signature
    if (typeof signature !== 'string' || !isHex(signature) || size(signature) !== 64) {
      throw new SignerError(`keyless signer ${this.options.name}: the origin returned a malformed signature`)
    }
    let r: bigint, s: bigint
    try {
      ;({ r, s } = parseCompactSignature(signature))
    } catch (error) {
      throw new SignerError(`keyless signer ${this.options.name}: the origin returned a malformed signature (${signerErrorMessage(error)})`)
    }
    const recoveryIdHint = typeof answer.recoveryId === 'number' ? answer.recoveryId : undefined
    return { signature: await toEthereumSignature({ r, s, digest, address, recoveryIdHint }), signedBy: this.options.name, address }
  }

  /**
   * Asks the origin for the key each time: a key id naming another key (or none), or a frozen or archived
   * key, would make every signature fail while health still said ok.
   */
  health(): Promise<SignerHealth> {
    return healthOf({
      address: async () => {
        const { address: current, state } = await this.lookUpKey()
        if (state !== undefined && state !== 'active') {
          // Only the states the parent has: its other words stay out of /health, as they stay out of errors.
          const named = state === 'frozen' || state === 'archived' ? state : 'in a state this signer does not know'
          throw new SignerError(`keyless signer ${this.options.name}: key ${this.options.keyId} is ${named}, and signs nothing`)
        }
        if (current !== this.checksummed) {
          throw new SignerError(`keyless signer ${this.options.name}: key ${this.options.keyId} has address ${current}, but this signer signs as ${this.checksummed}`)
        }
        return current
      },
    })
  }

  describe(): SignerDescription {
    return { kind: 'keyless', name: this.options.name, securityLevel: 'enclave' }
  }
}

/**
 * The origin's `Retry-After-Ms`, else the standard `Retry-After` in whole
 * seconds; NaN when neither is usable. At least 10 ms, so that a 0 does not
 * turn the wait into a busy loop against the origin.
 */
function retryAfterMsOf(headers: Headers): number {
  const milliseconds = headers.get('retry-after-ms')?.trim()
  const seconds = headers.get('retry-after')?.trim()
  const wait = milliseconds && /^\d{1,9}$/.test(milliseconds) ? Number(milliseconds) : seconds && /^\d{1,6}$/.test(seconds) ? Number(seconds) * 1_000 : NaN
  return Math.max(wait, minimumRetryAfterMs)
}

const minimumRetryAfterMs = 10

/** What the parent's statuses mean for this backend's one key. */
const originStatusMeanings: Record<number, string> = {
  400: 'it could not read the request',
  401: "it refused this Worker's credentials",
  403: "this Worker's credentials may not do that",
  404: 'it has no such key',
  409: 'the key is frozen or archived',
  429: 'too many requests',
  503: 'the origin is unavailable',
}

/**
 * Time a retry needs after its wait to be worth making: a round trip to the origin and a signature. With
 * less, it would only time out, and fail later than failing now, which lets a fallback chain move on.
 */
const minimumRetryTimeMs = 50

/** Why no parent could share `secret`, if so: it could not hold it in its own settings, so every request would be a bare 401. */
function hmacSecretFault(secret: string | undefined): string | undefined {
  if (!secret) return 'is not set'
  if (secret.trim() !== secret) return 'begins or ends with white space (a newline from the input it was put with?), which the parent refuses'
  if (new TextEncoder().encode(secret).length < minimumHmacSecretBytes) return `is shorter than ${minimumHmacSecretBytes} bytes, which the parent refuses`
  if (secret.includes(',')) return 'holds ",", which the parent\'s ORIGIN_HMAC_KEYS cannot'
  return undefined
}
