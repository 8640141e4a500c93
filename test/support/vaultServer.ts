import { randomUUID } from 'node:crypto'
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http'
import { listenLocal, readBody } from './localHttp.js'

/**
 * A small stand-in for HashiCorp Vault, on 127.0.0.1 only, speaking the parts
 * of its HTTP API a signer uses: KV version 2 reads, AppRole login (mounted at
 * `approle/`), token lookup-self and renew-self, `{errors: [...]}` bodies with
 * Vault's status codes, and sealing.
 */
export type LocalVault = {
  url: string
  rootToken: string
  /**
   * Creates an AppRole role whose tokens may read `readablePaths`, written as
   * in a Vault policy: API paths (`secret/data/paymaster/signer` for KV v2), a
   * trailing `*` matching any suffix. Returns its role_id and a secret_id.
   * Tokens it issues have leaseSeconds (default 3600) and are renewable unless
   * told otherwise.
   */
  createAppRole(options: { readablePaths: string[]; leaseSeconds?: number; renewable?: boolean }): { roleId: string; secretId: string }
  /** Writes a new version of a KV v2 secret, e.g. putSecret('secret/paymaster/signer', { private_key: '0x…' }). */
  putSecret(mountAndPath: string, data: Record<string, string>): void
  seal(): void
  unseal(): void
  /** Holds every answer back this long (0: none), as a slow or distant Vault would. */
  setLatency(ms: number): void
  /** Requests received, by route: 'login' | 'read' | 'renew' | 'lookup'. */
  calls: Record<string, number>
  stop(): Promise<void>
}

type IssuedToken = { readablePaths: string[] | 'everything'; leaseSeconds: number; renewable: boolean; expiresAt: number | undefined; accessor: string }
type AppRole = { secretId: string; readablePaths: string[]; leaseSeconds: number; renewable: boolean; policy: string }
type StoredSecret = { data: Record<string, string>; version: number; createdTime: string }
type Reply = { status: number; body: unknown }

const permissionDenied: Reply = { status: 403, body: { errors: ['permission denied'] } }

/** `now` is the server's clock (for lease expiry); tests pass their own to expire tokens without waiting. */
export async function startLocalVault(options: { port: number; now?: () => number }): Promise<LocalVault> {
  const now = options.now ?? Date.now
  const rootToken = `hvs.root-${randomUUID()}`
  const tokens = new Map<string, IssuedToken>([
    [rootToken, { readablePaths: 'everything', leaseSeconds: 0, renewable: false, expiresAt: undefined, accessor: randomUUID() }],
  ])
  const roles = new Map<string, AppRole>()
  const secrets = new Map<string, StoredSecret>()
  const calls: Record<string, number> = { login: 0, read: 0, renew: 0, lookup: 0 }
  let sealed = false
  let latencyMs = 0

  /** The token named by X-Vault-Token (or Authorization: Bearer), if Vault would still honour it. */
  function callerToken(request: IncomingMessage): { token: string; issued: IssuedToken } | undefined {
    const header = request.headers['x-vault-token'] ?? request.headers.authorization?.replace(/^Bearer\s+/i, '')
    const token = Array.isArray(header) ? header[0] : header
    const issued = token === undefined ? undefined : tokens.get(token)
    if (!token || !issued) return undefined
    if (issued.expiresAt !== undefined && now() >= issued.expiresAt) return undefined
    return { token, issued }
  }

  function mayRead(issued: IssuedToken, apiPath: string): boolean {
    if (issued.readablePaths === 'everything') return true
    return issued.readablePaths.some((allowed) => (allowed.endsWith('*') ? apiPath.startsWith(allowed.slice(0, -1)) : apiPath === allowed))
  }

  /** Vault's common response envelope around a secret's `data` or a login's `auth`. */
  function ok(fields: { data: unknown; auth: unknown }): Reply {
    return { status: 200, body: { request_id: randomUUID(), lease_id: '', renewable: false, lease_duration: 0, wrap_info: null, warnings: null, ...fields } }
  }

  function login(body: unknown): Reply {
    const { role_id: roleId, secret_id: secretId } = (body ?? {}) as Record<string, unknown>
    const role = typeof roleId === 'string' ? roles.get(roleId) : undefined
    if (!role || secretId !== role.secretId) return { status: 400, body: { errors: ['invalid role or secret ID'] } }
    const token = `hvs.${randomUUID()}`
    const accessor = randomUUID()
    tokens.set(token, {
      readablePaths: role.readablePaths,
      leaseSeconds: role.leaseSeconds,
      renewable: role.renewable,
      expiresAt: now() + role.leaseSeconds * 1000,
      accessor,
    })
    return ok({
      data: null,
      auth: {
        client_token: token,
        accessor,
        policies: ['default', role.policy],
        token_policies: ['default', role.policy],
        metadata: null,
        lease_duration: role.leaseSeconds,
        renewable: role.renewable,
        entity_id: '',
        token_type: 'service',
        orphan: true,
      },
    })
  }

  function lookupSelf(request: IncomingMessage): Reply {
    const caller = callerToken(request)
    if (!caller) return permissionDenied
    const { issued } = caller
    const ttl = issued.expiresAt === undefined ? 0 : Math.max(0, Math.floor((issued.expiresAt - now()) / 1000))
    return {
      status: 200,
      body: {
        data: {
          accessor: issued.accessor,
          id: caller.token,
          creation_ttl: issued.leaseSeconds,
          expire_time: issued.expiresAt === undefined ? null : new Date(issued.expiresAt).toISOString(),
          policies: issued.readablePaths === 'everything' ? ['root'] : ['default'],
          renewable: issued.renewable,
          ttl,
        },
      },
    }
  }

  function renewSelf(request: IncomingMessage): Reply {
    const caller = callerToken(request)
    if (!caller) return permissionDenied
    const { issued, token } = caller
    if (!issued.renewable) return { status: 400, body: { errors: ['lease is not renewable'] } }
    issued.expiresAt = now() + issued.leaseSeconds * 1000
    return {
      status: 200,
      body: {
        auth: { client_token: token, accessor: issued.accessor, policies: ['default'], lease_duration: issued.leaseSeconds, renewable: true },
      },
    }
  }

  function readSecret(request: IncomingMessage, mount: string, path: string): Reply {
    const caller = callerToken(request)
    // Vault checks the policy before it looks: a path one may not read is 403 whether or not it exists.
    if (!caller || !mayRead(caller.issued, `${mount}/data/${path}`)) return permissionDenied
    const secret = secrets.get(`${mount}/${path}`)
    if (!secret) return { status: 404, body: { errors: [] } }
    return ok({
      data: {
        data: secret.data,
        metadata: { created_time: secret.createdTime, custom_metadata: null, deletion_time: '', destroyed: false, version: secret.version },
      },
      auth: null,
    })
  }

  async function reply(request: IncomingMessage): Promise<Reply> {
    const pathname = new URL(request.url ?? '/', 'http://127.0.0.1').pathname
    const method = request.method ?? 'GET'
    const secretRoute = /^\/v1\/([^/]+)\/data\/(.+)$/.exec(pathname)
    const kind =
      pathname === '/v1/auth/approle/login' ? 'login'
      : pathname === '/v1/auth/token/renew-self' ? 'renew'
      : pathname === '/v1/auth/token/lookup-self' ? 'lookup'
      : secretRoute && !pathname.startsWith('/v1/auth/') ? 'read'
      : undefined
    if (kind) calls[kind] = (calls[kind] ?? 0) + 1
    if (sealed) return { status: 503, body: { errors: ['Vault is sealed'] } }

    const writes = method === 'POST' || method === 'PUT'
    if (kind === 'login' && writes) return login(await jsonBody(request))
    if (kind === 'renew' && writes) return renewSelf(request)
    if (kind === 'lookup' && method === 'GET') return lookupSelf(request)
    if (kind === 'read' && secretRoute && method === 'GET') {
      return readSecret(request, decodeURIComponent(secretRoute[1]!), secretRoute[2]!.split('/').map(decodeURIComponent).join('/'))
    }
    if (kind) return { status: 405, body: { errors: ['unsupported operation'] } }
    return { status: 404, body: { errors: [`no handler for route "${pathname.slice('/v1/'.length)}". route entry not found.`] } }
  }

  const server = createServer((request: IncomingMessage, response: ServerResponse) => {
    reply(request)
      .catch((): Reply => ({ status: 400, body: { errors: ['failed to parse JSON input'] } }))
      .then(async (answer) => {
        if (latencyMs > 0) await new Promise((resolve) => setTimeout(resolve, latencyMs))
        return answer
      })
      .then(({ status, body }) => {
        response.writeHead(status, { 'content-type': 'application/json' })
        response.end(JSON.stringify(body))
      })
  })
  const stop = await listenLocal(server, options.port)

  let roleCount = 0
  return {
    url: `http://127.0.0.1:${options.port}`,
    rootToken,
    calls,
    createAppRole({ readablePaths, leaseSeconds = 3600, renewable = true }) {
      const roleId = randomUUID()
      const secretId = randomUUID()
      roles.set(roleId, { secretId, readablePaths, leaseSeconds, renewable, policy: `role-${++roleCount}` })
      return { roleId, secretId }
    },
    putSecret(mountAndPath, data) {
      const [mount, ...path] = mountAndPath.split('/')
      const key = `${mount}/${path.join('/')}`
      secrets.set(key, { data: { ...data }, version: (secrets.get(key)?.version ?? 0) + 1, createdTime: new Date(now()).toISOString() })
    },
    seal: () => void (sealed = true),
    unseal: () => void (sealed = false),
    setLatency(ms) {
      latencyMs = ms
    },
    stop,
  }
}

async function jsonBody(request: IncomingMessage): Promise<unknown> {
  const text = (await readBody(request)).toString('utf8')
  return text === '' ? {} : JSON.parse(text)
}
