import { parsePrivateKey } from './privateKey.js'
import { KeyHoldingSigner, PrivateKeySigning } from './privateKeySigner.js'
import { SharedLoad } from './sharedLoad.js'
import { SignerError, type SignerDescription } from './signer.js'

export type VaultAuth =
  | { method: 'token'; token: string | undefined }
  | { method: 'approle'; roleId: string | undefined; secretId: string | undefined; /** Where AppRole is enabled; default 'approle'. */ mount?: string }

export type VaultSignerOptions = {
  name: string
  /** Vault's base URL, e.g. http://127.0.0.1:8200 */
  address: string
  auth: VaultAuth
  /** The KV version 2 mount, e.g. 'secret'. */
  kvMount: string
  /** The secret's path inside the mount, e.g. 'paymaster/signer'. */
  path: string
  /** The secret's field holding the hex private key, e.g. 'private_key'. */
  field: string
  /** Sent as X-Vault-Namespace when set (Vault Enterprise / HCP). */
  namespace?: string
  /** How long the key stays in isolate memory before it is read again. */
  cacheTtlMs?: number
  /** Everything one read of the key may take: its renewal or login and the read itself, together. */
  readTimeoutMs?: number
  fetch?: typeof fetch
  now?: () => number
}

/** An AppRole client token and when to renew it. */
type Session = { token: string; renewAt: number; expiresAt: number; renewable: boolean }

type VaultAnswer = { status: number; body: unknown }

/** Renew a lease once this much of it has passed, leaving a third for renewal to fail and a login to follow. */
const renewAtFraction = 2 / 3

/**
 * A key held in HashiCorp Vault's KV version 2 engine. Vault's transit
 * engine has no secp256k1, so Vault stores the key and this isolate signs
 * with it: the key is read over HTTP, kept in memory for `cacheTtlMs`
 * (so a rotated or revoked key takes effect without a redeploy), and read
 * again after that. Concurrent callers share one read.
 *
 * AppRole tokens are renewed (or replaced by a fresh login) only when a read
 * needs one: Workers have no background timers, and a read happens at most
 * once per `cacheTtlMs` anyway.
 */
export class VaultSigner extends KeyHoldingSigner {
  private cached: { signing: PrivateKeySigning; readAt: number } | undefined
  /** The read under way, shared. Its requests (a renewal, a login and a read; or a read, a login and a read) share one deadline. */
  private readonly reading: SharedLoad<PrivateKeySigning>
  private session: Session | undefined
  private readonly baseUrl: string
  private readonly kvMount: string
  private readonly path: string

  constructor(private readonly options: VaultSignerOptions) {
    super()
    this.reading = new SharedLoad({
      load: () => this.readAndCache(),
      abandonAfterMs: this.readTimeoutMs() + 1_000,
      keepMs: 0,
      what: `Vault signer ${options.name}: reading the key`,
      now: options.now,
    })
    this.baseUrl = options.address.replace(/\/+$/, '')
    this.kvMount = trimSlashes(options.kvMount)
    this.path = trimSlashes(options.path)
  }

  private now(): number {
    return (this.options.now ?? Date.now)()
  }

  private readTimeoutMs(): number {
    return this.options.readTimeoutMs ?? 5_000
  }

  protected signing(signal?: AbortSignal): Promise<PrivateKeySigning> {
    const startedAt = this.now()
    if (this.cached && startedAt - this.cached.readAt < (this.options.cacheTtlMs ?? 300_000)) {
      return Promise.resolve(this.cached.signing)
    }
    return this.reading.get(signal)
  }

  /** The key read from Vault, cached from when the read started. */
  private async readAndCache(): Promise<PrivateKeySigning> {
    const startedAt = this.now()
    const signing = await this.readKey()
    this.cached = { signing, readAt: startedAt }
    return signing
  }

  private async readKey(): Promise<PrivateKeySigning> {
    // The read's own deadline, not a caller's: the callers that share it each stop waiting on theirs.
    const deadline = AbortSignal.timeout(this.readTimeoutMs())
    const secretPath = `${this.kvMount}/data/${this.path.split('/').map(encodeURIComponent).join('/')}`
    const first = await this.clientToken(deadline)
    let answer = await this.send('GET', secretPath, deadline, { token: first.token })
    // A token we held on to may have expired or been revoked inside Vault
    // before its lease said so; one fresh login tells that apart from a policy
    // that really denies the path.
    if (answer.status === 403 && first.reused) {
      this.session = undefined
      answer = await this.send('GET', secretPath, deadline, { token: (await this.clientToken(deadline)).token })
    }
    if (answer.status === 403) {
      throw new SignerError(`Vault denied access to ${this.kvMount}/${this.path} (check the policy of the token/role)`)
    }
    if (answer.status === 404) throw new SignerError(`no secret at ${this.kvMount}/data/${this.path} in Vault`)
    if (answer.status !== 200) throw this.unexpected(answer.status)

    const source = `Vault secret ${this.kvMount}/${this.path} field ${this.options.field}`
    const value = field(field(field(answer.body, 'data'), 'data'), this.options.field)
    if (typeof value !== 'string') throw new SignerError(`${source} is not a 32-byte hex private key`)
    return new PrivateKeySigning(parsePrivateKey(value, source))
  }

  /** The token to read with, and whether it was held from an earlier call (and so may have gone stale inside Vault). */
  private async clientToken(deadline: AbortSignal): Promise<{ token: string; reused: boolean }> {
    const { auth, name } = this.options
    if (auth.method === 'token') {
      if (!auth.token) throw new SignerError(`Vault token for signer ${name} is not set`)
      return { token: auth.token, reused: false }
    }
    const now = this.now()
    const session = this.session
    if (session && now < session.renewAt) return { token: session.token, reused: true }
    if (session && session.renewable && now < session.expiresAt) {
      const renewed = await this.renewSelf(session, deadline)
      if (renewed) {
        this.session = renewed
        return { token: renewed.token, reused: false }
      }
    }
    this.session = await this.login(auth, deadline)
    return { token: this.session.token, reused: false }
  }

  private async login(auth: Extract<VaultAuth, { method: 'approle' }>, deadline: AbortSignal): Promise<Session> {
    const mount = trimSlashes(auth.mount ?? 'approle')
    if (!auth.roleId || !auth.secretId) {
      throw new SignerError(`Vault AppRole role_id and secret_id for signer ${this.options.name} are not both set`)
    }
    const startedAt = this.now()
    const answer = await this.send('POST', `auth/${mount}/login`, deadline, { body: { role_id: auth.roleId, secret_id: auth.secretId } })
    if (answer.status === 400 || answer.status === 403) {
      throw new SignerError(`Vault at ${this.baseUrl} refused the AppRole login at auth/${mount}/login (HTTP ${answer.status}; check the role_id and secret_id)`)
    }
    if (answer.status === 404) {
      throw new SignerError(`Vault at ${this.baseUrl} has no AppRole login at auth/${mount}/login (is AppRole enabled at that mount?)`)
    }
    if (answer.status !== 200) throw this.unexpected(answer.status)
    const session = sessionFrom(field(answer.body, 'auth'), startedAt)
    if (!session) throw new SignerError(`Vault at ${this.baseUrl} answered the AppRole login without a client token and lease`)
    return session
  }

  /**
   * Extends the session's lease. Undefined when Vault refuses (the token is
   * gone or at its maximum TTL), so the caller logs in afresh; a sealed or
   * unreachable Vault is thrown instead, as a login would fail the same way.
   */
  private async renewSelf(session: Session, deadline: AbortSignal): Promise<Session | undefined> {
    const startedAt = this.now()
    const answer = await this.send('POST', 'auth/token/renew-self', deadline, { token: session.token, body: {} })
    if (answer.status >= 500) throw this.unexpected(answer.status)
    if (answer.status !== 200) return undefined
    // renew-self may leave client_token out: the token is the one we sent.
    return sessionFrom({ client_token: session.token, ...asRecord(field(answer.body, 'auth')) }, startedAt)
  }

  /** One request to Vault, aborted by `deadline`, the read's. */
  private async send(method: 'GET' | 'POST', apiPath: string, deadline: AbortSignal, request: { token?: string; body?: unknown }): Promise<VaultAnswer> {
    const headers: Record<string, string> = {}
    if (request.token) headers['x-vault-token'] = request.token
    if (this.options.namespace) headers['x-vault-namespace'] = this.options.namespace
    if (request.body !== undefined) headers['content-type'] = 'application/json'
    // A bare reference, not this.options.fetch(...): workerd refuses a fetch called with another `this`.
    const send = this.options.fetch ?? fetch
    try {
      const response = await send(`${this.baseUrl}/v1/${apiPath}`, {
        method,
        headers,
        body: request.body === undefined ? undefined : JSON.stringify(request.body),
        signal: deadline,
      })
      const text = await response.text()
      return { status: response.status, body: parseJson(text) }
    } catch (error) {
      const name = typeof error === 'object' && error !== null && 'name' in error ? error.name : undefined
      if (name === 'TimeoutError' || name === 'AbortError') {
        throw new SignerError(`Vault at ${this.baseUrl}: reading the key took longer than ${this.readTimeoutMs()} ms`, { retryable: true })
      }
      throw new SignerError(`Vault at ${this.baseUrl} could not be reached`, { retryable: true })
    }
  }

  /** A status no caller expected: sealed, a server-side failure, or something else worth naming. */
  private unexpected(status: number): SignerError {
    if (status === 503) return new SignerError(`Vault at ${this.baseUrl} is sealed`, { retryable: true })
    return new SignerError(`Vault at ${this.baseUrl} answered HTTP ${status}`, { retryable: status >= 500 || status === 429 })
  }

  describe(): SignerDescription {
    // Vault guards the key at rest, but signing happens with the key in this
    // isolate's memory: as strong as any software key, no stronger.
    return { kind: 'vault', name: this.options.name, securityLevel: 'software' }
  }
}

/** A session from an `auth` block (login or renew-self); a lease of 0 means the token does not expire. */
function sessionFrom(auth: unknown, issuedAt: number): Session | undefined {
  const token = field(auth, 'client_token')
  const lease = field(auth, 'lease_duration')
  if (typeof token !== 'string' || token === '' || typeof lease !== 'number') return undefined
  const leaseMs = lease > 0 ? lease * 1000 : Infinity
  return {
    token,
    renewAt: issuedAt + leaseMs * renewAtFraction,
    expiresAt: issuedAt + leaseMs,
    renewable: field(auth, 'renewable') === true,
  }
}

function field(value: unknown, name: string): unknown {
  return asRecord(value)[name]
}

function asRecord(value: unknown): Record<string, unknown> {
  return typeof value === 'object' && value !== null ? (value as Record<string, unknown>) : {}
}

function parseJson(text: string): unknown {
  try {
    return JSON.parse(text)
  } catch {
    return undefined
  }
}

function trimSlashes(value: string): string {
  return value.replace(/^\/+|\/+$/g, '')
}
