import { env } from 'cloudflare:workers'
import { afterEach, describe, expect, inject, it, vi } from 'vitest'
import { app } from '../../worker/app.js'
import { backendConfig } from '../support/backendConfig.js'
import { rpcUserOperationV07 } from '../support/userOperations.js'
import { apiKey, entryPoints, operatorKey } from './helpers.js'

/**
 * The KMS, Vault and HTTP backends and the fallback chain, inside workerd, with
 * the real @aws-sdk/client-kms and fetch against local servers that speak the
 * services' wire protocols with real cryptography (test/support/*Server.ts).
 */

/** n, the order of secp256k1's group. */
const secp256k1Order = 0xfffffffffffffffffffffffffffffffebaaedce6af48a03bbfd25e8cd0364141n

const servers = inject('backendServers')
const { secrets, backends: configured } = backendConfig(servers)
// No retries and a short deadline: each injected KMS fault is one quick failure.
const backends = { ...configured, kms: { ...configured.kms, maxAttempts: 1, deadlineMs: 2_000 } }

/** An env whose configuration uses these signers; each env object gets its own isolate-level services. */
function envWith(signers: Record<string, unknown>, extra: Record<string, unknown> = {}) {
  const base = JSON.parse((env as unknown as { PAYMASTER_CONFIG: string }).PAYMASTER_CONFIG) as Record<string, unknown>
  return { ...env, ...secrets, ...extra, PAYMASTER_CONFIG: JSON.stringify({ ...base, signers }) }
}

/** A pm_getPaymasterData answer, and (`detail`) why the signer failed as the Worker logged it, which the answer leaves out. */
async function sponsorThrough(workerEnv: object) {
  const log = vi.spyOn(console, 'log')
  const linesBefore = log.mock.calls.length
  const response = await app.fetch(
    new Request('http://paymaster.test/rpc', {
      method: 'POST',
      headers: { 'x-api-key': apiKey, 'content-type': 'application/json' },
      body: JSON.stringify({ jsonrpc: '2.0', id: 1, method: 'pm_getPaymasterData', params: [rpcUserOperationV07(), entryPoints['0.7'], '0x7a69'] }),
    }),
    workerEnv,
  )
  const answer = (await response.json()) as { result?: { paymasterData: string }; error?: { code: number; message: string; data?: { reason: string } } }
  const failure = log.mock.calls
    .slice(linesBefore)
    .map(([line]) => JSON.parse(String(line)) as Record<string, unknown>)
    .find((entry) => entry.event === 'rpc' && entry.errorKind === 'signer_unavailable')
  if (answer.error?.code === -32003) {
    expect(failure, 'a signer failure is logged with why').toBeDefined()
    expect(answer.error.message).not.toContain(String(failure!.detail))
  }
  return { ...answer, detail: failure?.detail as string | undefined }
}

/** A GET with the key its path takes: /health's details need an operator key, the rest an API key. */
async function get(path: string, workerEnv: object) {
  const key = path === '/health' ? operatorKey : apiKey
  const response = await app.fetch(new Request(`http://paymaster.test${path}`, { headers: { 'x-api-key': key } }), workerEnv)
  return { status: response.status, text: await response.text() }
}

const control = (path: string, body: Record<string, string> = {}) =>
  fetch(`${servers.controlUrl}${path}`, { method: 'POST', body: JSON.stringify(body) }).then((r) => r.json() as Promise<Record<string, string>>)

/** The backend named in the sponsorship log line of the last sponsorship. */
function signedByIn(log: { mock: { calls: unknown[][] } }): string | undefined {
  const lines = log.mock.calls
    .map(([line]) => JSON.parse(String(line)) as Record<string, unknown>)
    .filter((entry) => entry.event === 'sponsorship')
  return lines.at(-1)?.signedBy as string | undefined
}

afterEach(async () => {
  vi.restoreAllMocks()
  await control('/reset')
})

describe('each backend signs sponsorships with the same key', () => {
  it.each(['kms', 'vault', 'http'])('%s', async (name) => {
    const workerEnv = envWith({ primary: (backends as Record<string, unknown>)[name] })
    const { text } = await get(`/api/v1/paymaster/signer`, workerEnv)
    expect(JSON.parse(text).signers[0]).toMatchObject({ kind: name === 'kms' ? 'aws-kms' : name, address: servers.address })
    const answer = await sponsorThrough(workerEnv)
    expect(answer.error).toBeUndefined()
    expect(answer.result!.paymasterData).toMatch(/^0x01[0-9a-f]{24}[0-9a-f]{130}$/)
  })

  it('the HTTP signer accepts r‖s and base64 DER with a high s, and normalises both', async () => {
    const workerEnv = envWith({ primary: backends.http })
    for (const format of ['hex65', 'hex64', 'der']) {
      await control('/http/format', { format })
      const answer = await sponsorThrough(workerEnv)
      expect(answer.error).toBeUndefined()
      const signature = answer.result!.paymasterData.slice(-130, -2)
      // Low s, as the DER answer's high s must be folded to (the EntryPoint's ECDSA.recover refuses a high one).
      expect(BigInt(`0x${signature.slice(64)}`) <= secp256k1Order / 2n).toBe(true)
    }
  })

  it('the HTTP signer takes its url with a trailing slash', async () => {
    const answer = await sponsorThrough(envWith({ primary: { ...backends.http, url: `${backends.http.url}/` } }))
    expect(answer.error).toBeUndefined()
  })
})

describe('/health', () => {
  it('answers a caller without an operator key from a report at most a few seconds old, and an operator from a fresh one', async () => {
    const workerEnv = envWith({ primary: backends.http })
    const anonymous = async () => (await app.fetch(new Request('http://paymaster.test/health'), workerEnv)).json()
    const fetches = vi.spyOn(globalThis, 'fetch')
    const probes = () => fetches.mock.calls.filter(([url]) => String(url).endsWith('/health')).length
    // Callers that come while the report is made share it: one probe of the key server, not one each.
    expect(await Promise.all([anonymous(), anonymous(), anonymous()])).toEqual([{ status: 'ok' }, { status: 'ok' }, { status: 'ok' }])
    expect(probes()).toBe(1)
    await control('/http/fault', { fault: 'down' })
    expect(await anonymous()).toEqual({ status: 'ok' })
    expect(JSON.parse((await get('/health', workerEnv)).text)).toMatchObject({ status: 'unavailable', signers: [{ name: 'primary', ok: false }] })
  })
})

describe('clear configuration errors from KMS', () => {
  it('a key with the wrong key spec', async () => {
    const { keyId } = await control('/kms/keys', { keySpec: 'ECC_NIST_P256' })
    const answer = await sponsorThrough(envWith({ primary: { ...backends.kms, keyId } }))
    expect(answer.error).toMatchObject({ code: -32003, message: 'signer unavailable: signer primary could not sign', data: { reason: 'signer_unavailable', signer: 'primary', retryable: false } })
    expect(answer.detail).toContain('has key spec ECC_NIST_P256; Ethereum needs ECC_SECG_P256K1')
  })

  it('access denied', async () => {
    await control('/kms/fault', { fault: 'access-denied' })
    const answer = await sponsorThrough(envWith({ primary: backends.kms }))
    expect(answer.detail).toContain('AWS KMS denied access to key')
  })

  it('wrong credentials', async () => {
    const answer = await sponsorThrough(envWith({ primary: backends.kms }, { AWS_SECRET_ACCESS_KEY: 'not-the-secret' }))
    expect(answer.detail).toContain('rejected the request signature')
  })
})

describe('fallback: the client never notices a failing primary', () => {
  const chainOf = (overrides: Record<string, unknown> = {}) =>
    envWith({
      primary: { kind: 'fallback', members: ['kms', 'http'], timeoutMs: 400, failureThreshold: 2, coolDownSeconds: 1, ...overrides },
      kms: backends.kms,
      http: backends.http,
    })

  it.each([
    ['down', 'internal-error'],
    ['throttling', 'throttle'],
    ['returning a signature from the wrong key', 'wrong-key'],
  ])('primary %s: the backup signs, the breaker opens, and later closes', async (_, fault) => {
    const log = vi.spyOn(console, 'log')
    const workerEnv = chainOf()
    expect((await sponsorThrough(workerEnv)).error).toBeUndefined()
    expect(signedByIn(log)).toBe('kms')
    await control('/kms/fault', { fault })
    for (let i = 0; i < 3; i++) {
      expect((await sponsorThrough(workerEnv)).error).toBeUndefined()
      expect(signedByIn(log)).toBe('http')
    }
    const health = JSON.parse((await get('/health', workerEnv)).text)
    expect(health.status).toBe('degraded')
    expect(health.signers.find((s: { name: string }) => s.name === 'primary').members[0]).toMatchObject({ name: 'kms', state: 'open' })
    const metrics = (await get('/metrics', workerEnv)).text
    expect(metrics).toContain('paymaster_signer_requests_total{backend="kms",outcome="skipped"} 1')
    expect(metrics).toContain('paymaster_signer_requests_total{backend="http",outcome="success"} 3')

    await control('/kms/fault', { fault: 'none' })
    await new Promise((resolve) => setTimeout(resolve, 1_100))
    expect((await sponsorThrough(workerEnv)).error).toBeUndefined()
    expect(signedByIn(log)).toBe('kms')
  })

  it('a hanging primary costs its timeout only until its breaker opens', async () => {
    // A timeout far above any pause of a busy machine, so "waited for it" and "did not" cannot be confused.
    const workerEnv = chainOf({ timeoutMs: 1_500 })
    await sponsorThrough(workerEnv)
    await control('/kms/fault', { fault: 'hang' })
    const durations: number[] = []
    for (let i = 0; i < 4; i++) {
      const started = Date.now()
      expect((await sponsorThrough(workerEnv)).error).toBeUndefined()
      durations.push(Date.now() - started)
    }
    expect(durations[0]).toBeGreaterThanOrEqual(1_500)
    expect(durations[3]).toBeLessThan(1_500)
  })

  it('with hedging, a slow primary does not make the client wait for its timeout', async () => {
    const workerEnv = chainOf({ timeoutMs: 5_000, hedgeAfterMs: 50, failureThreshold: 100 })
    await sponsorThrough(workerEnv)
    await control('/kms/fault', { fault: 'hang' })
    const started = Date.now()
    expect((await sponsorThrough(workerEnv)).error).toBeUndefined()
    // Without hedging the backup would be asked only once the KMS attempt's own 2 s deadline had passed.
    expect(Date.now() - started).toBeLessThan(1_500)
  })

  it('when every backend fails, a clear error, not a hang', async () => {
    await control('/kms/fault', { fault: 'hang' })
    await control('/http/fault', { fault: 'down' })
    const started = Date.now()
    const answer = await sponsorThrough(chainOf())
    expect(Date.now() - started).toBeLessThan(2_000)
    expect(answer.error).toMatchObject({ code: -32003, message: 'signer unavailable: signer primary could not sign; try again shortly', data: { retryable: true } })
    expect(answer.detail).toContain('every signer backend failed')
    expect(answer.detail).toContain('key server answered 503')
  })
})

describe('keyless: a parent that requires client certificates (TLS_REQUIRE_CLIENT_CERT=1)', () => {
  const origin = inject('tlsOrigin')
  const keylessThrough = (clientCertificate: string) =>
    envWith(
      { primary: { kind: 'keyless', url: origin.url, keyId: origin.keyId, address: origin.address, hmacKeyId: origin.hmacKeyId, clientCertificate } },
      { ORIGIN_HMAC_SECRET: origin.hmacSecret },
    )

  it('signs through the mtls_certificates binding that clientCertificate names, and its health asks the origin through it', async () => {
    const workerEnv = keylessThrough('ORIGIN_CLIENT_CERT')
    const answer = await sponsorThrough(workerEnv)
    expect(answer.error).toBeUndefined()
    expect(answer.result!.paymasterData).toMatch(/^0x01[0-9a-f]{24}[0-9a-f]{130}$/)
    const health = JSON.parse((await get('/health', workerEnv)).text)
    expect(health.signers[0]).toMatchObject({ name: 'primary', ok: true, address: origin.address })
  })

  it('is refused by the parent when its binding presents no certificate', async () => {
    const answer = await sponsorThrough(keylessThrough('ORIGIN_NO_CLIENT_CERT'))
    // The handshake fails in certificateFetcher, which miniflare hands the Worker as a 500 (Cloudflare's binding throws).
    expect(answer.error).toMatchObject({ code: -32003 })
    expect(answer.detail).toContain('keyless signer primary: the origin answered 500')
  })

  it('names a clientCertificate binding the Worker does not have, as a configuration error', async () => {
    const answer = await sponsorThrough(keylessThrough('NOT_BOUND_HERE'))
    expect(answer.detail).toContain('clientCertificate names NOT_BOUND_HERE, which is not an mtls_certificates binding of this Worker')
  })
})
