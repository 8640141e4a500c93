import { createServer, type Server } from 'node:http'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { hexToBigInt, keccak256, recoverAddress, slice, toHex } from 'viem'
import { generatePrivateKey, privateKeyToAddress } from 'viem/accounts'
import { SignerError } from '../../backends/signer.js'
import { VaultSigner, type VaultSignerOptions } from '../../backends/vault.js'
import { startLocalVault, type LocalVault } from '../support/vaultServer.js'

const vaultPort = 18630
const hangingPort = 18631
/** Nothing listens here: the unreachable-Vault case. */
const closedPort = 18639

const halfOrder = 0x7fffffffffffffffffffffffffffffff5d576e7357a4501ddfe92f46681b20a0n
const digest = keccak256(toHex('digest'))

let vault: LocalVault
let hanging: Server
/** The local Vault's clock, which decides lease expiry; tests move it to expire tokens. */
let vaultNow = 1_700_000_000_000

beforeAll(async () => {
  vault = await startLocalVault({ port: vaultPort, now: () => vaultNow })
  hanging = createServer(() => {
    // never answers: the timeout case
  })
  await new Promise<void>((resolve) => hanging.listen(hangingPort, '127.0.0.1', resolve))
})

afterAll(async () => {
  await vault?.stop()
  hanging?.closeAllConnections()
  await new Promise((resolve) => hanging?.close(resolve))
})

let secretCount = 0
/** A fresh key stored at a path no other test uses. */
function storeKey(field = 'private_key'): { key: `0x${string}`; path: string } {
  const key = generatePrivateKey()
  const path = `paymaster/signer-${++secretCount}`
  vault.putSecret(`secret/${path}`, { [field]: key })
  return { key, path }
}

function signer(options: Partial<VaultSignerOptions> & Pick<VaultSignerOptions, 'auth' | 'path'>): VaultSigner {
  return new VaultSigner({ name: 'vault-primary', address: vault.url, kvMount: 'secret', field: 'private_key', ...options })
}

/** Counts calls to the local Vault from now on: the returned function gives how many of each kind since. */
function countCalls(): () => Record<string, number> {
  const before = { ...vault.calls }
  return () => Object.fromEntries(Object.entries(vault.calls).map(([kind, count]) => [kind, count - (before[kind] ?? 0)]))
}

/** How many calls of each kind `run` made to the local Vault. */
async function callsDuring(run: () => Promise<unknown>): Promise<Record<string, number>> {
  const since = countCalls()
  await run()
  return since()
}

async function failureOf(promise: Promise<unknown>): Promise<SignerError> {
  try {
    await promise
  } catch (error) {
    if (error instanceof SignerError) return error
    throw error
  }
  throw new Error('expected a SignerError')
}

describe('Vault signer', () => {
  it('signs with the key from KV v2 under a token: canonical, low-s, and recovering to the key', async () => {
    const { key, path } = storeKey()
    const token = signer({ auth: { method: 'token', token: vault.rootToken }, path })
    const { signature, signedBy, address } = await token.signDigest(digest)
    expect({ signedBy, address }).toEqual({ signedBy: 'vault-primary', address: privateKeyToAddress(key) })
    expect(signature).toMatch(/^0x[0-9a-f]{130}$/)
    expect(hexToBigInt(slice(signature, 32, 64))).toBeLessThanOrEqual(halfOrder)
    expect(await recoverAddress({ hash: digest, signature })).toBe(privateKeyToAddress(key))
    expect(await token.health()).toEqual({ ok: true, address: privateKeyToAddress(key) })
    expect(token.describe()).toEqual({ kind: 'vault', name: 'vault-primary', securityLevel: 'software' })
  })

  it('reads the key once within the cache TTL, with concurrent callers sharing the read, and again after it', async () => {
    const { key, path } = storeKey()
    let now = 0
    const cached = signer({ auth: { method: 'token', token: vault.rootToken }, path, cacheTtlMs: 60_000, now: () => now })
    const first = await callsDuring(() => Promise.all([cached.signDigest(digest), cached.signDigest(digest), cached.address(), cached.health()]))
    expect(first.read).toBe(1)

    now = 59_999
    expect((await callsDuring(() => cached.signDigest(digest))).read).toBe(0)

    // A rotated key takes effect at the next read, without a redeploy.
    const rotated = generatePrivateKey()
    vault.putSecret(`secret/${path}`, { private_key: rotated })
    now = 60_000
    expect((await callsDuring(() => cached.address())).read).toBe(1)
    expect(await cached.address()).toBe(privateKeyToAddress(rotated))
    expect(privateKeyToAddress(rotated)).not.toBe(privateKeyToAddress(key))
  })

  it('logs in with AppRole, then signs', async () => {
    const { key, path } = storeKey()
    const { roleId, secretId } = vault.createAppRole({ readablePaths: [`secret/data/${path}`] })
    const appRole = signer({ auth: { method: 'approle', roleId, secretId }, path })
    let signed: Awaited<ReturnType<VaultSigner['signDigest']>> | undefined
    expect(await callsDuring(async () => (signed = await appRole.signDigest(digest)))).toEqual({ login: 1, read: 1, renew: 0, lookup: 0 })
    expect(await recoverAddress({ hash: digest, signature: signed!.signature })).toBe(privateKeyToAddress(key))
  })

  it('renews a renewable AppRole token before its lease runs out', async () => {
    const { path } = storeKey()
    const { roleId, secretId } = vault.createAppRole({ readablePaths: ['secret/data/paymaster/*'], leaseSeconds: 60 })
    const start = vaultNow
    let now = start
    const appRole = signer({ auth: { method: 'approle', roleId, secretId }, path, cacheTtlMs: 10_000, now: () => now })
    await appRole.address()

    // Past the cache TTL, before two thirds of the lease: the token is used as it is.
    now = vaultNow = start + 30_000
    expect(await callsDuring(() => appRole.address())).toEqual({ login: 0, read: 1, renew: 0, lookup: 0 })

    // Past two thirds of the lease: renewed, not replaced.
    now = vaultNow = start + 45_000
    expect(await callsDuring(() => appRole.address())).toEqual({ login: 0, read: 1, renew: 1, lookup: 0 })

    // The renewal restarted the lease, so the token outlives its first 60 s.
    now = vaultNow = start + 75_000
    expect(await callsDuring(() => appRole.address())).toEqual({ login: 0, read: 1, renew: 0, lookup: 0 })
  })

  it('logs in again when the token is not renewable, or Vault refuses to renew it', async () => {
    const { path } = storeKey()
    const start = vaultNow
    let now = start

    const fixed = vault.createAppRole({ readablePaths: [`secret/data/${path}`], leaseSeconds: 60, renewable: false })
    const notRenewable = signer({ auth: { method: 'approle', ...fixed }, path, cacheTtlMs: 10_000, now: () => now })
    await notRenewable.address()
    now = vaultNow = start + 45_000
    expect(await callsDuring(() => notRenewable.address())).toEqual({ login: 1, read: 1, renew: 0, lookup: 0 })

    // Our clock says the lease has time left; Vault's says it is gone, so renew-self is refused.
    const renewable = vault.createAppRole({ readablePaths: [`secret/data/${path}`], leaseSeconds: 60 })
    now = vaultNow
    const refused = signer({ auth: { method: 'approle', ...renewable }, path, cacheTtlMs: 10_000, now: () => now })
    await refused.address()
    now += 45_000
    vaultNow += 61_000
    expect(await callsDuring(() => refused.address())).toEqual({ login: 1, read: 1, renew: 1, lookup: 0 })
  })

  it('answers a 403 on a held token with one fresh login and one retry', async () => {
    const { key, path } = storeKey()
    const { roleId, secretId } = vault.createAppRole({ readablePaths: [`secret/data/${path}`], leaseSeconds: 3600 })
    let now = vaultNow
    const appRole = signer({ auth: { method: 'approle', roleId, secretId }, path, cacheTtlMs: 1_000, now: () => now })
    await appRole.address()

    // The token expired inside Vault while our lease arithmetic still trusted it.
    now += 2_000
    vaultNow += 3_601_000
    expect(await callsDuring(() => appRole.address())).toEqual({ login: 1, read: 2, renew: 0, lookup: 0 })
    expect(await appRole.address()).toBe(privateKeyToAddress(key))

    // A policy that really denies the path: a fresh token's 403 is final, and
    // a held token's 403 costs one re-login, not a loop.
    const denied = vault.createAppRole({ readablePaths: ['secret/data/elsewhere'] })
    const deniedSigner = signer({ auth: { method: 'approle', ...denied }, path, now: () => now })
    let since = countCalls()
    await expect(deniedSigner.address()).rejects.toThrow('Vault denied access')
    expect(since()).toEqual({ login: 1, read: 1, renew: 0, lookup: 0 })
    since = countCalls()
    await expect(deniedSigner.address()).rejects.toThrow('Vault denied access')
    expect(since()).toEqual({ login: 1, read: 2, renew: 0, lookup: 0 })
  })

  describe('failures', () => {
    it('give distinct messages that name the problem and never the token, secret id or key', async () => {
      const { key, path } = storeKey()
      const { roleId, secretId } = vault.createAppRole({ readablePaths: ['secret/data/*'] })
      const withToken = (overrides: Partial<VaultSignerOptions>) => signer({ auth: { method: 'token', token: vault.rootToken }, path, ...overrides })
      const secrets = [vault.rootToken, roleId, secretId, key, key.slice(2), key.slice(2, 18)]
      const failures: SignerError[] = []
      const expectFailure = async (vaultSigner: VaultSigner, message: string, retryable: boolean) => {
        const failure = await failureOf(vaultSigner.signDigest(digest))
        expect(failure.message).toBe(message)
        expect(failure.options.retryable).toBe(retryable)
        expect(await vaultSigner.health()).toEqual({ ok: false, error: message })
        failures.push(failure)
      }

      vault.seal()
      try {
        await expectFailure(withToken({}), `Vault at ${vault.url} is sealed`, true)
        await expectFailure(signer({ auth: { method: 'approle', roleId, secretId }, path }), `Vault at ${vault.url} is sealed`, true)
      } finally {
        vault.unseal()
      }

      const forbidden = vault.createAppRole({ readablePaths: ['secret/data/somewhere-else'] })
      await expectFailure(
        signer({ auth: { method: 'approle', ...forbidden }, path }),
        `Vault denied access to secret/${path} (check the policy of the token/role)`,
        false,
      )
      await expectFailure(
        withToken({ auth: { method: 'token', token: 'hvs.not-a-token' } }),
        `Vault denied access to secret/${path} (check the policy of the token/role)`,
        false,
      )
      await expectFailure(withToken({ path: 'paymaster/never-written' }), 'no secret at secret/data/paymaster/never-written in Vault', false)
      await expectFailure(withToken({ field: 'signing_key' }), `Vault secret secret/${path} field signing_key is not a 32-byte hex private key`, false)

      vault.putSecret('secret/paymaster/malformed', { private_key: `${key}ff` })
      await expectFailure(
        withToken({ path: 'paymaster/malformed' }),
        'Vault secret secret/paymaster/malformed field private_key is not a 32-byte hex private key',
        false,
      )

      await expectFailure(
        signer({ auth: { method: 'approle', roleId, secretId: `${secretId}-wrong` }, path }),
        `Vault at ${vault.url} refused the AppRole login at auth/approle/login (HTTP 400; check the role_id and secret_id)`,
        false,
      )
      await expectFailure(withToken({ auth: { method: 'token', token: undefined } }), 'Vault token for signer vault-primary is not set', false)
      await expectFailure(
        signer({ auth: { method: 'approle', roleId, secretId: undefined }, path }),
        'Vault AppRole role_id and secret_id for signer vault-primary are not both set',
        false,
      )

      const hangingUrl = `http://127.0.0.1:${hangingPort}`
      await expectFailure(withToken({ address: hangingUrl, readTimeoutMs: 200 }), `Vault at ${hangingUrl}: reading the key took longer than 200 ms`, true)
      const closedUrl = `http://127.0.0.1:${closedPort}`
      await expectFailure(withToken({ address: closedUrl }), `Vault at ${closedUrl} could not be reached`, true)

      expect(new Set(failures.map((failure) => failure.message)).size).toBe(failures.length - 2) // sealed and denied each appear twice
      for (const failure of failures) {
        for (const secret of secrets) expect(failure.message).not.toContain(secret)
      }
    })

    it("stop a caller's wait for a read when its signal aborts; the read goes on for the others", async () => {
      const hangingUrl = `http://127.0.0.1:${hangingPort}`
      const waiting = signer({ auth: { method: 'token', token: vault.rootToken }, path: storeKey().path, address: hangingUrl, readTimeoutMs: 1_000 })
      const caller = new AbortController()
      const stopped = waiting.signDigest(digest, { signal: caller.signal })
      const patient = failureOf(waiting.signDigest(digest))
      setTimeout(() => caller.abort(), 50)
      const failure = await failureOf(stopped)
      expect(failure.message).toBe('Vault signer vault-primary: reading the key: stopped waiting, as its caller no longer waits')
      expect(failure.options.retryable).toBe(true)
      // The shared read was not cut short by that caller: the other waits for its own timeout.
      expect((await patient).message).toBe(`Vault at ${hangingUrl}: reading the key took longer than 1000 ms`)
    })

    it("bound a whole read of the key by one deadline: a login and a read each within it, but not together, fail it", async () => {
      const { key, path } = storeKey()
      const { roleId, secretId } = vault.createAppRole({ readablePaths: [`secret/data/${path}`] })
      const appRole = signer({ auth: { method: 'approle', roleId, secretId }, path, readTimeoutMs: 600 })
      vault.setLatency(400)
      const startedAt = performance.now()
      let failure: SignerError
      try {
        failure = await failureOf(appRole.signDigest(digest))
      } finally {
        vault.setLatency(0)
      }
      expect(failure.message).toBe(`Vault at ${vault.url}: reading the key took longer than 600 ms`)
      expect(failure.options.retryable).toBe(true)
      // Ended at the read's deadline, not at the second request's own.
      expect(performance.now() - startedAt).toBeLessThan(1_000)
      // The login it made is kept: the next read within the lease only reads.
      expect(await callsDuring(() => appRole.signDigest(digest))).toEqual({ login: 0, read: 1, renew: 0, lookup: 0 })
      expect(await appRole.address()).toBe(privateKeyToAddress(key))
    })

    it('are not cached: a fixed Vault is read on the next call', async () => {
      const { key, path } = storeKey()
      const token = signer({ auth: { method: 'token', token: vault.rootToken }, path })
      vault.seal()
      try {
        await expect(token.address()).rejects.toThrow('is sealed')
      } finally {
        vault.unseal()
      }
      expect(await token.address()).toBe(privateKeyToAddress(key))
    })
  })
})

describe('local Vault', () => {
  it('speaks Vault: lookup-self, renew-self, {errors} bodies, and 503 for everything while sealed', async () => {
    const { roleId, secretId } = vault.createAppRole({ readablePaths: [], leaseSeconds: 120, renewable: false })
    const login = await fetch(`${vault.url}/v1/auth/approle/login`, { method: 'POST', body: JSON.stringify({ role_id: roleId, secret_id: secretId }) })
    const { auth } = (await login.json()) as { auth: { client_token: string; lease_duration: number; renewable: boolean } }
    expect({ lease_duration: auth.lease_duration, renewable: auth.renewable }).toEqual({ lease_duration: 120, renewable: false })

    const headers = { 'X-Vault-Token': auth.client_token }
    const lookup = await fetch(`${vault.url}/v1/auth/token/lookup-self`, { headers })
    expect(((await lookup.json()) as { data: { ttl: number } }).data.ttl).toBe(120)
    const renew = await fetch(`${vault.url}/v1/auth/token/renew-self`, { method: 'POST', headers })
    expect({ status: renew.status, body: await renew.json() }).toEqual({ status: 400, body: { errors: ['lease is not renewable'] } })
    const forbidden = await fetch(`${vault.url}/v1/secret/data/anything`, { headers })
    expect({ status: forbidden.status, body: await forbidden.json() }).toEqual({ status: 403, body: { errors: ['permission denied'] } })

    vault.seal()
    try {
      const sealed = await fetch(`${vault.url}/v1/auth/token/lookup-self`, { headers })
      expect({ status: sealed.status, body: await sealed.json() }).toEqual({ status: 503, body: { errors: ['Vault is sealed'] } })
    } finally {
      vault.unseal()
    }
  })
})
