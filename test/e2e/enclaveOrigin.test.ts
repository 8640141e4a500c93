import { execFile, spawn } from 'node:child_process'
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { createServer } from 'node:http'
import { createServer as createNetServer, type AddressInfo } from 'node:net'
import { promisify } from 'node:util'
import { tmpdir } from 'node:os'
import path from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { getAddress, keccak256, toHex, type Address, type Hex } from 'viem'
import { jsonObjectOf } from '../../enclave-origin/errors.js'
import { startAnvil, type Anvil } from '../support/anvil.js'
import { deployDevnet, devnetChainConfig, type Devnet } from '../support/devnet.js'
import { prepareSponsored, signAndSubmit } from '../support/e2eFlow.js'
import { startLocalKms, type LocalKms } from '../support/kmsServer.js'
import { mutated, strangeValue } from '../support/mutations.js'
import { buildOrigin, originHmac, recoveredFromAnswer, startOrigin, symmetricKmsKey, workerHmac, type Origin } from '../support/origin.js'
import { seededRandom } from '../support/seededRandom.js'
import { startWorker } from '../support/wranglerDev.js'

/**
 * The enclave origin end to end: enclave and parent as real processes over
 * TCP, the data key from the local KMS server, the Worker's keyless backend
 * signing through the parent, and the sponsorship accepted on anvil.
 */

let kms: LocalKms
let kmsKeyId: string
let origin: Origin
let storeDir: string
let anvil: Anvil
let builtCli: string
const operatorPort = 18654

beforeAll(async () => {
  // The CLI and both processes run from the build, as in production.
  builtCli = buildOrigin('enclaveOrigin')
  kms = await startLocalKms({ port: 18651 })
  kmsKeyId = await symmetricKmsKey(kms)
  storeDir = mkdtempSync(path.join(tmpdir(), 'origin-store-'))
  // Operators have a listener of their own (OPERATOR_LISTEN), which a flood of client connections cannot fill.
  origin = await startOrigin({ kms, kmsKeyId, enclavePort: 18652, parentPort: 18653, storeDir, builtCli, extraEnv: { OPERATOR_LISTEN: `127.0.0.1:${operatorPort}` } })
  anvil = await startAnvil({ port: 18549 })
})

afterAll(async () => {
  await origin?.stop()
  await anvil?.stop()
  await kms?.stop()
  rmSync(storeDir, { recursive: true, force: true })
})

async function signWithOrigin(keyId: string, digest: Hex) {
  return origin.request('POST', `/v1/keys/${keyId}/sign`, { digest })
}

describe('the enclave origin API', () => {
  it('creates a key inside the enclave and signs with it; the signature recovers to the returned address', async () => {
    const created = await origin.request('POST', '/v1/keys')
    expect(created.status).toBe(201)
    const digest = keccak256(toHex('origin'))
    const signed = await signWithOrigin(created.body.keyId as string, digest)
    expect(signed.status).toBe(200)
    expect(await recoveredFromAnswer(digest, signed.body as never)).toBe(created.body.address)
    expect((await origin.request('GET', `/v1/keys/${created.body.keyId}`)).body).toMatchObject({ state: 'active', cacheState: 'WARM', address: created.body.address })
  })

  it('a frozen or archived key never signs; unfreezing restores a frozen one, and nothing an archived one', async () => {
    const { body } = await origin.request('POST', '/v1/keys')
    const keyId = body.keyId as string
    const digest = keccak256(toHex('frozen'))
    expect((await origin.request('POST', `/v1/keys/${keyId}/freeze`)).status).toBe(200)
    expect((await signWithOrigin(keyId, digest)).status).toBe(409)
    expect((await origin.request('POST', `/v1/keys/${keyId}/unfreeze`)).status).toBe(200)
    expect((await signWithOrigin(keyId, digest)).status).toBe(200)
    expect((await origin.request('POST', `/v1/keys/${keyId}/archive`)).status).toBe(200)
    expect((await signWithOrigin(keyId, digest)).status).toBe(409)
    for (const action of ['unfreeze', 'freeze']) {
      const refused = await origin.request('POST', `/v1/keys/${keyId}/${action}`)
      expect(refused.status).toBe(409)
      expect(refused.body.error).toBe(`key ${keyId} is archived, which is final: it cannot be made ${action === 'freeze' ? 'frozen' : 'active'}`)
    }
    expect((await origin.request('POST', `/v1/keys/${keyId}/archive`)).status).toBe(200)
    expect((await origin.request('GET', `/v1/keys/${keyId}`)).body).toMatchObject({ state: 'archived' })
    expect((await signWithOrigin(keyId, digest)).status).toBe(409)
  })

  it('refuses unsigned, wrongly signed and replayed requests', async () => {
    const unsigned = await fetch(`${origin.url}/v1/keys`, { method: 'POST' })
    expect(unsigned.status).toBe(401)
    const { body } = await origin.request('POST', '/v1/keys')
    const digest = keccak256(toHex('replay'))
    const payload = new TextEncoder().encode(JSON.stringify({ digest }))
    const { signRequest } = await import('../../enclave-origin/protocol/requestSigning.js')
    const headers = await signRequest({ ...workerHmac, method: 'POST', path: `/v1/keys/${body.keyId}/sign`, body: payload })
    const first = await fetch(`${origin.url}/v1/keys/${body.keyId}/sign`, { method: 'POST', headers, body: payload })
    const replay = await fetch(`${origin.url}/v1/keys/${body.keyId}/sign`, { method: 'POST', headers, body: payload })
    expect([first.status, replay.status]).toEqual([200, 401])
  })

  it("keeps the Worker's sign-only key (ORIGIN_SIGN_ONLY_KEY_IDS) from unfreezing a key an operator froze on the operators' listener", async () => {
    const { body } = await origin.request('POST', '/v1/keys')
    const { signRequest } = await import('../../enclave-origin/protocol/requestSigning.js')
    const post = async (base: string, who: { keyId: string; secret: string }, path: string) =>
      fetch(`${base}${path}`, { method: 'POST', headers: await signRequest({ ...who, method: 'POST', path, body: new Uint8Array() }) })
    expect((await post(`http://127.0.0.1:${operatorPort}`, originHmac, `/v1/keys/${body.keyId}/freeze`)).status).toBe(200)
    const unfreeze = await post(origin.url, workerHmac, `/v1/keys/${body.keyId}/unfreeze`)
    expect({ status: unfreeze.status, body: await unfreeze.json() }).toEqual({ status: 403, body: { error: 'this HMAC key may only sign and read keys' } })
    expect((await origin.request('GET', `/v1/keys/${body.keyId}`)).body).toMatchObject({ state: 'frozen' })
  })

  it('answers malformed requests with a status and a message that say what was wrong', async () => {
    const { body } = await origin.request('POST', '/v1/keys')
    const badDigest = await origin.request('POST', `/v1/keys/${body.keyId}/sign`, { digest: '0x1234' })
    expect(badDigest).toMatchObject({ status: 400, body: { error: expect.stringMatching(/digest.*32 bytes/) } })
    const notJson = await origin.request('POST', `/v1/keys/${body.keyId}/sign`, 'not json')
    expect(notJson.status).toBe(400)
    expect((await origin.request('POST', '/v1/keys/no-such-key/sign', { digest: keccak256(toHex('x')) })).status).toBe(404)
    expect((await origin.request('GET', '/v1/nothing')).status).toBe(404)
    expect(await origin.request('GET', '/v1/keys/%E0%A4%A')).toMatchObject({ status: 400, body: { error: 'the key id in the path is not valid percent-encoding' } })
    // A body to a route that reads none is refused, not ignored: `{"count": 2}` made one key.
    expect(await origin.request('POST', '/v1/keys', { count: 2 })).toEqual(expect.objectContaining({ status: 400, body: { error: 'POST /v1/keys takes no body' } }))
    expect(await origin.request('POST', `/v1/keys/${body.keyId}/freeze`, { now: true })).toEqual(expect.objectContaining({ status: 400, body: { error: `POST /v1/keys/${body.keyId}/freeze takes no body` } }))
    expect((await origin.request('GET', `/v1/keys/${body.keyId}`)).body).toMatchObject({ state: 'active' })
    // Over the 16 KiB limit (by little, so the whole body is sent before the parent closes the connection):
    // refused before authentication or parsing, and the parent keeps serving.
    const large = await fetch(`${origin.url}/v1/keys`, { method: 'POST', body: 'x'.repeat(20 * 1024) })
    expect(large.status).toBe(413)
    expect(await large.json()).toEqual({ error: 'body too large (limit 16384 bytes)' })
    expect((await origin.request('GET', `/v1/keys/${body.keyId}`)).status).toBe(200)
  })

  it('takes a relative STORE_DIR from its working directory, not from INIT_CWD, and names its store in full when it listens', async () => {
    // As under `npm run origin parent` run from a directory below the project's: a setting is still the process's own
    // path. Taken from INIT_CWD, it would name another directory (one level deeper, wherever the checkout is): a new,
    // empty store.
    const relative = path.relative(process.cwd(), storeDir)
    const initCwd = path.join(process.cwd(), 'elsewhere')
    expect(path.resolve(initCwd, relative)).not.toBe(storeDir)
    const { body } = await origin.request('POST', '/v1/keys')
    await origin.kill('parent')
    await origin.startParent({ STORE_DIR: relative, npm_lifecycle_event: 'origin', INIT_CWD: initCwd })
    const listening = origin
      .output('parent')
      .split('\n')
      .map((line) => jsonObjectOf(line))
      .find((line) => line?.event === 'parent_listening')
    expect(listening?.store).toEqual({ kind: 'disk', directory: storeDir })
    expect(listening?.signOnlyKeyIds).toEqual([workerHmac.keyId])
    const digest = keccak256(toHex('the same store'))
    expect(await recoveredFromAnswer(digest, (await signWithOrigin(body.keyId as string, digest)).body as never)).toBe(body.address)
  })

  it('an enclave restarted alone has lost keys and data key: the parent reloads the key, answers 503 with a Retry-After while it unlocks, then signs', async () => {
    const { body } = await origin.request('POST', '/v1/keys')
    await origin.kill('enclave')
    await origin.startEnclave()
    const digest = keccak256(toHex('after an enclave restart'))
    const first = await signWithOrigin(body.keyId as string, digest)
    expect(first.status).toBe(503)
    const retryAfterMs = Number(first.headers.get('retry-after-ms'))
    expect(retryAfterMs).toBeGreaterThanOrEqual(50)
    expect(retryAfterMs).toBeLessThanOrEqual(200)
    expect(first.headers.get('retry-after')).toBe('1')
    let answer = first
    for (let attempt = 0; attempt < 20 && answer.status === 503; attempt++) {
      await new Promise((resolve) => setTimeout(resolve, Number(answer.headers.get('retry-after-ms') ?? 100)))
      answer = await signWithOrigin(body.keyId as string, digest)
    }
    expect(answer.status).toBe(200)
    expect(await recoveredFromAnswer(digest, answer.body as never)).toBe(body.address)
    expect(await (await fetch(`${origin.url}/metrics`)).text()).toMatch(/origin_needs_unlock_total [1-9]/)
  })

  it('/metrics exposes sign latency, requests, the enclave cache state and the parent process\u2019s GC pauses', async () => {
    const text = await (await fetch(`${origin.url}/metrics`)).text()
    expect(text).toContain('# TYPE nodejs_gc_duration_seconds histogram')
    expect(text).toMatch(/process_cpu_seconds_total \d/)
    for (const phase of ['enclave', 'queue', 'rpc', 'total']) {
      expect(text).toMatch(new RegExp(`^origin_sign_latency_seconds_count\\{phase="${phase}"\\} [1-9]`, 'm'))
      // Observed, not only counted: a phase left at zero would have everything in its first bucket.
      expect(Number(new RegExp(`^origin_sign_latency_seconds_sum\\{phase="${phase}"\\} (\\S+)`, 'm').exec(text)?.[1])).toBeGreaterThan(0)
    }
    expect(text).toMatch(/^origin_requests_total\{route="sign",status="200"\} [1-9]/m)
    expect(text).toMatch(/origin_enclave_keys\{enclave="enclave-1",state="WARM"\} [1-9]/)
    expect(text).toMatch(/origin_enclave_key_refreshes_total\{enclave="enclave-1"\} \d+/)
    expect(text).toMatch(/origin_enclave_engine_batch_size_count\{enclave="enclave-1"\} \d+/)
    expect(text).toContain('origin_enclave_up{enclave="enclave-1"} 1')
  })
})

describe('malformed input, many shapes (seeded)', () => {
  it('every mutated request to the parent gets a clear 4xx, harms no key, and leaves no stack trace in a log', async () => {
    const { body: created } = await origin.request('POST', '/v1/keys')
    const keyId = created.keyId as string
    const digest = keccak256(toHex('before the sweep'))
    const seed = 0x0a11
    const random = seededRandom(seed)
    const keyIdOf = () => {
      const value = strangeValue(random)
      const text = typeof value === 'string' ? value : JSON.stringify(value)
      // A lone surrogate has no UTF-8: sent as the bytes such a one would take, which are not UTF-8 either.
      return text === '\ud800' ? '%ED%A0%80' : encodeURIComponent(text)
    }
    const cases: Array<() => [method: 'GET' | 'POST', path: string, body?: unknown]> = [
      () => ['POST', `/v1/keys/${keyId}/sign`, mutated({ digest }, random)],
      () => ['POST', `/v1/keys/${keyId}/sign`, strangeValue(random)],
      () => ['POST', `/v1/keys/${keyIdOf()}/sign`, { digest }],
      () => ['GET', `/v1/keys/${keyIdOf()}`],
      () => ['POST', `/v1/keys/${keyIdOf()}/freeze`],
      () => ['POST', '/v1/unlock', mutated({ sealedPreloadIdentities: { 'enclave-1': 'AAAA' } }, random)],
    ]
    for (let n = 0; n < 150; n++) {
      const [method, requestPath, body] = cases[n % cases.length]!()
      const where = `seed ${seed}, case ${n}: ${method} ${requestPath.slice(0, 200)} ${JSON.stringify(body)?.slice(0, 200)}`
      const answer = await origin.request(method, requestPath, body)
      const digestSent = (body as { digest?: unknown } | null)?.digest
      const stillValid = requestPath === `/v1/keys/${keyId}/sign` && typeof digestSent === 'string' && /^0x[0-9a-fA-F]{64}$/.test(digestSent)
      // An unlock whose mutation left `{}` (its one field removed) is a plain unlock: `{}` is no body.
      const plainUnlock = requestPath === '/v1/unlock' && typeof body === 'object' && body !== null && !Array.isArray(body) && Object.keys(body).length === 0
      if (stillValid || plainUnlock) {
        // A strange value that is a valid request after all: served, as it should be.
        expect(answer.status, where).toBe(200)
        continue
      }
      // Never 401: every request here is signed, so each reaches the check it is about.
      expect([400, 404, 413, 414, 431], where).toContain(answer.status)
      expect(typeof answer.body.error, where).toBe('string')
      expect(answer.body.error, where).not.toMatch(/(\n|\\n)\s+at /)
    }
    // Harmed nothing: the key still signs as its address, and both processes are up, their logs free of stack traces.
    const signed = await signWithOrigin(keyId, digest)
    expect(signed.status).toBe(200)
    expect(await recoveredFromAnswer(digest, signed.body as never)).toBe(created.address)
    expect((await origin.request('GET', `/v1/keys/${keyId}`)).body).toMatchObject({ state: 'active' })
    for (const pid of Object.values(origin.pids())) expect(() => process.kill(pid!, 0)).not.toThrow()
    // Its lines are JSON (Node's own warnings too, such as the AWS SDK's about Node versions): a stack in one would show as an escaped newline.
    for (const which of ['enclave', 'parent'] as const) {
      expect(origin.output(which)).not.toMatch(/(\n|\\n)\s+at /)
      for (const line of origin.output(which).split('\n').filter(Boolean)) expect(() => JSON.parse(line), `${which}: ${line}`).not.toThrow()
    }
  })
})

describe('the operators\u2019 CLI', () => {
  const cliAt = (url: string, ...args: string[]) =>
    promisify(execFile)(process.execPath, [builtCli, ...args], {
      env: { ...process.env, ORIGIN_URL: url, ORIGIN_HMAC_KEY_ID: originHmac.keyId, ORIGIN_HMAC_SECRET: originHmac.secret },
      timeout: 30_000,
    })
  const cli = (...args: string[]) => cliAt(origin.url, ...args)

  it('creates keys in bulk, one JSON line per key, each of which signs; its progress, off a terminal, in plain lines', async () => {
    const { stdout, stderr } = await cli('create-keys', '--count', '5', '--concurrency', '2')
    const keys = stdout.trim().split('\n').map((line) => JSON.parse(line) as { keyId: string; address: Address })
    expect(keys).toHaveLength(5)
    // A line at each tenth done: no bar redrawn with \r into a CI log, or into the keys' lines when both streams are merged.
    expect(stderr).toMatch(/^(created [1-5]\/5 keys, \d+\/s\n){5}$/)
    const digest = keccak256(toHex('made by the CLI'))
    for (const key of keys) expect(await recoveredFromAnswer(digest, (await signWithOrigin(key.keyId, digest)).body as never)).toBe(key.address)
  })

  it('unlocks every enclave and shows the status: signed with the HMAC secret, the enclaves\u2019 figures too', async () => {
    expect(JSON.parse((await cli('unlock')).stdout)).toEqual({ ok: true })
    expect(JSON.parse((await cli('status')).stdout)).toMatchObject({ ok: true, enclaves: [{ id: 'enclave-1', ok: true, stats: { cacheStates: expect.any(Object) } }] })
    const { stdout } = await promisify(execFile)(process.execPath, [builtCli, 'status'], { env: { PATH: process.env.PATH, ORIGIN_URL: origin.url }, timeout: 30_000 })
    expect(JSON.parse(stdout)).toEqual({ ok: true, status: 'ok', enclaves: [{ id: 'enclave-1', answered: true, ok: true, held: false }], store: { ok: true } })
  })

  it('reads, signs with, freezes, unfreezes and archives a key by its id', async () => {
    const [key] = (await cli('create-keys', '--count', '1')).stdout.trim().split('\n').map((line) => JSON.parse(line) as { keyId: string; address: Address })
    const run = async (...args: string[]) => JSON.parse((await cli(...args, '--key', key!.keyId)).stdout) as Record<string, unknown>
    expect(await run('get-key')).toMatchObject({ keyId: key!.keyId, address: key!.address, state: 'active' })
    const digest = keccak256(toHex('signed by the CLI'))
    expect(await recoveredFromAnswer(digest, (await run('sign', '--digest', digest)) as never)).toBe(key!.address)
    expect(await run('freeze')).toEqual({ keyId: key!.keyId, state: 'frozen' })
    const refused = await cli('sign', '--key', key!.keyId, '--digest', digest).catch((error: { code: number; stderr: string }) => error)
    expect(refused).toMatchObject({ code: 1, stderr: expect.stringContaining(`POST /v1/keys/${key!.keyId}/sign: 409`) })
    expect(await run('unfreeze')).toEqual({ keyId: key!.keyId, state: 'active' })
    expect(await recoveredFromAnswer(digest, (await run('sign', '--digest', digest)) as never)).toBe(key!.address)
    expect(await run('archive')).toEqual({ keyId: key!.keyId, state: 'archived' })
    expect(await run('get-key')).toMatchObject({ state: 'archived' })
  })

  it('says what to check when the parent refuses its signature', async () => {
    const withWrongSecret = (...args: string[]) =>
      promisify(execFile)(process.execPath, [builtCli, ...args], {
        env: { ...process.env, ORIGIN_URL: origin.url, ORIGIN_HMAC_KEY_ID: originHmac.keyId, ORIGIN_HMAC_SECRET: 'not-the-secret-the-parent-has' },
        timeout: 30_000,
      }).catch((error: { code: number; stdout: string; stderr: string }) => error)
    const hint = " (check ORIGIN_HMAC_KEY_ID and ORIGIN_HMAC_SECRET against the parent's ORIGIN_HMAC_KEYS, and this host's clock: the parent's log says which failed)\n"
    expect(await withWrongSecret('create-keys', '--count', '1')).toMatchObject({
      code: 1,
      stderr: `created 0 of 1 keys; stopped after a failure: POST /v1/keys: 401 {"error":"request authentication failed"}${hint}`,
    })
    // status too: a refused signature is no verdict on the origin's health.
    expect(await withWrongSecret('status')).toMatchObject({ code: 1, stdout: '', stderr: `GET /healthz: 401 {"error":"request authentication failed"}${hint}` })
  })

  it('rotates the data key: every key the origin holds is sealed again and still signs as its address', async () => {
    const { stdout } = await cli('create-keys', '--count', '3')
    const keys = stdout.trim().split('\n').map((line) => JSON.parse(line) as { keyId: string; address: Address })
    const { resealed } = JSON.parse((await cli('rotate-data-key')).stdout) as { resealed: number }
    expect(resealed).toBeGreaterThanOrEqual(keys.length)
    const digest = keccak256(toHex('after the rotation'))
    for (const key of keys) {
      expect(await recoveredFromAnswer(digest, (await signWithOrigin(key.keyId, digest)).body as never)).toBe(key.address)
      expect((await origin.request('GET', `/v1/keys/${key.keyId}`)).status).toBe(200)
    }
  })

  it('after a failed create, starts no more, prints every key the creates under way made, and says how many it made', async () => {
    // An origin that answers each create after 300 ms, but the third at once with a 503.
    let requests = 0
    const created: string[] = []
    const flaky = createServer((request, response) => {
      request.resume()
      const number = ++requests
      if (number === 3) return void response.writeHead(503, { 'content-type': 'application/json' }).end('{"error":"no enclave can take it now"}')
      const keyId = `made-${number}`
      created.push(keyId)
      setTimeout(() => response.writeHead(201, { 'content-type': 'application/json' }).end(JSON.stringify({ keyId, address: '0x0000000000000000000000000000000000000001' })), 300)
    })
    await new Promise<void>((resolve) => flaky.listen(0, '127.0.0.1', resolve))
    try {
      const failed = await cliAt(`http://127.0.0.1:${(flaky.address() as AddressInfo).port}`, 'create-keys', '--count', '10', '--concurrency', '5').catch(
        (error: { code: number; stdout: string; stderr: string }) => error,
      )
      const printed = (failed as { stdout: string }).stdout.trim().split('\n').map((line) => (JSON.parse(line) as { keyId: string }).keyId)
      // Five under way when the third failed: the other four finish and are printed; no sixth is started.
      expect(requests).toBe(5)
      expect(printed.sort()).toEqual(created.sort())
      expect(failed).toMatchObject({ code: 1 })
      expect((failed as { stderr: string }).stderr).toContain('created 4 of 10 keys, each printed above; stopped after a failure: POST /v1/keys: 503 {"error":"no enclave can take it now"}')
    } finally {
      flaky.close()
    }
  })

  /** The CLI as its own process against `url`, with what it writes and how it ends. */
  const cliProcess = (url: string, args: string[], env: Record<string, string> = {}) => {
    const child = spawn(process.execPath, [builtCli, ...args], {
      env: { ...process.env, ORIGIN_URL: url, ORIGIN_HMAC_KEY_ID: originHmac.keyId, ORIGIN_HMAC_SECRET: originHmac.secret, ...env },
      stdio: ['ignore', 'pipe', 'pipe'],
    })
    let stdout = ''
    let stderr = ''
    child.stdout.on('data', (chunk: Buffer) => (stdout += chunk))
    child.stdout.on('error', () => {})
    child.stderr.on('data', (chunk: Buffer) => (stderr += chunk))
    const ended = new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve) => child.on('close', (code) => resolve({ code, stdout, stderr })))
    return { child, ended, stderr: () => stderr }
  }
  /** An origin that answers each create with a new key id after `delayMs` (for the nth, from 1), and counts them. */
  const keyMakingOrigin = async (delayMs: number | ((nth: number) => number)) => {
    const made: string[] = []
    const server = createServer((request, response) => {
      request.resume()
      const keyId = `made-${made.length + 1}`
      made.push(keyId)
      const delay = typeof delayMs === 'number' ? delayMs : delayMs(made.length)
      setTimeout(() => response.writeHead(201, { 'content-type': 'application/json' }).end(JSON.stringify({ keyId, address: '0x0000000000000000000000000000000000000001' })), delay)
    })
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
    return { made, url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`, close: () => (server.closeAllConnections(), server.close()) }
  }

  it('stops at a stdout that takes no more lines, and gives the keys it made on stderr instead: no route lists them', async () => {
    const origin = await keyMakingOrigin(0)
    try {
      const run = cliProcess(origin.url, ['create-keys', '--count', '50', '--concurrency', '1'])
      // The reader goes away (a `| head` that is done): each write now fails with EPIPE.
      run.child.stdout.destroy()
      const { code, stderr } = await run.ended
      expect(code).toBe(1)
      const lost = /these keys were made, but stdout would not take them:\n((?:\{[^\n]*\}\n)+)/.exec(stderr)
      expect(lost).not.toBeNull()
      const onStderr = lost![1]!.trim().split('\n').map((line) => (JSON.parse(line) as { keyId: string }).keyId)
      // Every key the origin made is on stderr (none reached stdout), and it stopped at the first that could not be written.
      expect(onStderr).toEqual(origin.made)
      expect(onStderr).toHaveLength(1)
      expect(stderr).toContain(`created 1 of 50 keys, each printed above (1 on stderr); stopped after a failure: stdout would not take a key's line (EPIPE)`)
    } finally {
      origin.close()
    }
  })

  it('at Ctrl-C, starts no more creates and prints the keys of those under way; at a second, quits and says what it leaves', async () => {
    const origin = await keyMakingOrigin(1_500)
    try {
      const once = cliProcess(origin.url, ['create-keys', '--count', '50', '--concurrency', '3'])
      await expect.poll(() => origin.made.length, { timeout: 10_000 }).toBe(3)
      once.child.kill('SIGINT')
      const stopped = await once.ended
      expect(stopped.code).toBe(1)
      expect(stopped.stderr).toContain('stopping: waiting for the 3 creates under way, whose keys are printed too (Ctrl-C again to quit without them)')
      expect(stopped.stdout.trim().split('\n').map((line) => (JSON.parse(line) as { keyId: string }).keyId).sort()).toEqual(origin.made.slice().sort())
      expect(stopped.stderr).toContain('created 3 of 50 keys, each printed above; stopped at an interrupt')

      const twice = cliProcess(origin.url, ['create-keys', '--count', '50', '--concurrency', '2'])
      await expect.poll(() => origin.made.length, { timeout: 10_000 }).toBe(5)
      twice.child.kill('SIGINT')
      await expect.poll(() => twice.stderr()).toContain('stopping: waiting for the 2 creates under way')
      twice.child.kill('SIGINT')
      const quit = await twice.ended
      expect({ code: quit.code, stdout: quit.stdout }).toEqual({ code: 130, stdout: '' })
      expect(quit.stderr).toContain('quit with 2 creates under way: keys they make will not be printed, and no route lists keys')
    } finally {
      origin.close()
    }
  })

  it('at a second Ctrl-C, writes the keys it made that stdout would not take before it quits', async () => {
    // The first create answers at once, the other two only after the test is over.
    const origin = await keyMakingOrigin((nth) => (nth === 1 ? 0 : 10_000))
    try {
      const run = cliProcess(origin.url, ['create-keys', '--count', '3', '--concurrency', '3'])
      run.child.stdout.destroy()
      await expect.poll(() => origin.made.length, { timeout: 10_000 }).toBe(3)
      // Let the first key's line fail on the closed stdout.
      await new Promise((resolve) => setTimeout(resolve, 500))
      run.child.kill('SIGINT')
      await expect.poll(() => run.stderr()).toContain('stopping: waiting for the 2 creates under way')
      run.child.kill('SIGINT')
      const { code, stderr } = await run.ended
      expect(code).toBe(130)
      expect(stderr).toContain(`quit with 2 creates under way: keys they make will not be printed, and no route lists keys\nthese keys were made, but may not have reached stdout:\n{"keyId":"${origin.made[0]}","address":"0x0000000000000000000000000000000000000001"}\n`)
    } finally {
      origin.close()
    }
  })

  it('says a create it gave up on, or that failed in the origin, may still have made a key; one the parent refused did not', async () => {
    const origin = await keyMakingOrigin(2_000)
    try {
      const { code, stderr } = await cliProcess(origin.url, ['create-keys', '--count', '1'], { ORIGIN_TIMEOUT_MS: '300' }).ended
      expect(code).toBe(1)
      expect(stderr).toMatch(/created 0 of 1 keys; stopped after a failure: the parent at \S+ sent nothing for 0\.3 s: POST \/v1\/keys given up\. A failed create may still have made a key, whose id was not printed\n/)
    } finally {
      origin.close()
    }
    const answers: Array<[number, string, boolean]> = [
      [503, '{"error":"origin unavailable: the disk is full"}', true],
      [502, '<html>bad gateway</html>', true],
      [403, '{"error":"this HMAC key may only sign and read keys"}', false],
      [503, '{"error":"no key is created while the store has not confirmed earlier writes (1 still waiting after 10000 ms)"}', false],
      // A success that names no key: what became of the create is unknown.
      [201, '{}', true],
    ]
    for (const [status, body, mayHaveMade] of answers) {
      const answering = createServer((request, response) => {
        request.resume()
        response.writeHead(status, { 'content-type': 'application/json' }).end(body)
      })
      await new Promise<void>((resolve) => answering.listen(0, '127.0.0.1', resolve))
      try {
        const { code, stderr } = await cliProcess(`http://127.0.0.1:${(answering.address() as AddressInfo).port}`, ['create-keys', '--count', '1']).ended
        expect({ code, status, note: stderr.includes('may still have made a key') }).toEqual({ code: 1, status, note: mayHaveMade })
      } finally {
        answering.close()
      }
    }
  })

  it('lists what every failed create that may still have made a key was told, so no key id the parent named is lost', async () => {
    let answered = 0
    // A parent whose store does not confirm in time: each create's 503 names its key.
    const answering = createServer((request, response) => {
      request.resume()
      answered += 1
      const error = `the record of new key key-${answered} was not confirmed durable within 10000 ms; it may still take effect`
      setTimeout(() => response.writeHead(503, { 'content-type': 'application/json' }).end(JSON.stringify({ error })), 50)
    })
    await new Promise<void>((resolve) => answering.listen(0, '127.0.0.1', resolve))
    try {
      const { code, stderr } = await cliProcess(`http://127.0.0.1:${(answering.address() as AddressInfo).port}`, ['create-keys', '--count', '8', '--concurrency', '4']).ended
      expect(code).toBe(1)
      expect(answered).toBe(4)
      for (let key = 1; key <= 4; key++) expect(stderr).toContain(`new key key-${key} was not confirmed`)
      expect(stderr).toContain('4 failed creates may still have made keys, whose ids were not printed (their answers are listed above)')
    } finally {
      answering.close()
    }
  })

  it('says no key was made when nothing was sent: a client setting refused before any request, or a parent not reached', async () => {
    let requests = 0
    const answering = createServer((request, response) => {
      requests += 1
      request.resume()
      response.writeHead(201, { 'content-type': 'application/json' }).end(JSON.stringify({ keyId: 'k', address: '0x0000000000000000000000000000000000000001' }))
    })
    await new Promise<void>((resolve) => answering.listen(0, '127.0.0.1', resolve))
    const url = `http://127.0.0.1:${(answering.address() as AddressInfo).port}`
    try {
      for (const [args, env, refusal] of [
        [['create-keys', '--count', '100'], { ORIGIN_TIMEOUT_MS: 'abc' }, 'ORIGIN_TIMEOUT_MS must be a whole number'],
        [['rotate-data-key'], { ORIGIN_TIMEOUT_MS: 'abc' }, 'ORIGIN_TIMEOUT_MS must be a whole number'],
        [['create-keys', '--count', '100'], { ORIGIN_URL: 'notaurl' }, 'ORIGIN_URL must be an http:// or https:// URL, got notaurl'],
        [['create-keys', '--count', '100'], { ORIGIN_HMAC_SECRET: '' }, 'ORIGIN_HMAC_SECRET is not set'],
        [['create-keys', '--count', '100'], { ORIGIN_HMAC_KEY_ID: '' }, 'ORIGIN_HMAC_KEY_ID is not set'],
        [['create-keys', '--count', '100'], { ORIGIN_HMAC_KEY_ID: 'ops team' }, 'ORIGIN_HMAC_KEY_ID must be visible ASCII characters'],
      ] as const) {
        const { code, stderr } = await cliProcess(url, [...args], env).ended
        expect({ code, refused: stderr.startsWith(refusal), note: stderr.includes('may still have made') }).toEqual({ code: 1, refused: true, note: false })
      }
    } finally {
      answering.close()
    }
    expect(requests).toBe(0)
    // No one listens there now: every create fails before a byte of it leaves.
    const { code, stderr } = await cliProcess(url, ['create-keys', '--count', '100', '--concurrency', '4']).ended
    expect(code).toBe(1)
    expect(stderr).toMatch(/^created 0 of 100 keys; stopped after a failure: cannot reach the parent at http:\/\/127\.0\.0\.1:\d+: ECONNREFUSED\n$/)
  })

  it.each([20, 0])('asks again, after its Retry-After-Ms (%i, and never sooner than 10 ms), for a create the origin shed for load', async (retryAfterMs) => {
    // An origin that sheds every other create, as a parent whose enclave is full does.
    let requests = 0
    const nonces = new Set<string>()
    const arrivals: number[] = []
    const shedding = createServer((request, response) => {
      request.resume()
      arrivals.push(performance.now())
      nonces.add(String(request.headers['x-origin-nonce']))
      if (++requests % 2 === 1) {
        return void response.writeHead(503, { 'content-type': 'application/json', 'retry-after': '1', 'retry-after-ms': String(retryAfterMs) }).end(JSON.stringify({ error: 'overloaded', retryAfterMs }))
      }
      response.writeHead(201, { 'content-type': 'application/json' }).end(JSON.stringify({ keyId: `made-${requests}`, address: '0x0000000000000000000000000000000000000001' }))
    })
    await new Promise<void>((resolve) => shedding.listen(0, '127.0.0.1', resolve))
    try {
      const { stdout } = await cliAt(`http://127.0.0.1:${(shedding.address() as AddressInfo).port}`, 'create-keys', '--count', '4', '--concurrency', '1')
      expect(stdout.trim().split('\n').map((line) => (JSON.parse(line) as { keyId: string }).keyId)).toEqual(['made-2', 'made-4', 'made-6', 'made-8'])
      // Each attempt signed afresh: a parent refuses a nonce it has seen.
      expect(nonces.size).toBe(8)
      // From each shed attempt to the one after it: the wait asked for, and at least 10 ms (a 0 is no busy loop).
      const waits = [0, 2, 4, 6].map((shed) => arrivals[shed + 1]! - arrivals[shed]!)
      for (const wait of waits) expect(wait).toBeGreaterThanOrEqual(Math.max(retryAfterMs, 10))
    } finally {
      shedding.close()
    }
  })

  it('refuses a share file that is not JSON without echoing any of it', async () => {
    const directory = mkdtempSync(path.join(tmpdir(), 'shares-'))
    try {
      const shares = path.join(directory, 'shares.json')
      // A trailing comma: V8's own message would quote the share before it.
      writeFileSync(shares, '[{"account_id":"a","share":"0x5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed"},]')
      const { recipient } = JSON.parse((await cli('preload-identity', '--print')).stdout) as { recipient: string }
      const failed = await cli('seal-shares', '--in', shares, '--out', path.join(directory, 'sealed.age'), '--recipient', recipient).catch((error: { code: number; stderr: string }) => error)
      expect(failed).toMatchObject({ code: 1, stderr: `the share file ${shares} is not valid JSON\n` })
      expect((failed as { stderr: string }).stderr).not.toContain('5eed')
    } finally {
      rmSync(directory, { recursive: true, force: true })
    }
  })

  it('reads a relative file option from where `npm run origin` was run (INIT_CWD), and writes no file over another', async () => {
    const directory = mkdtempSync(path.join(tmpdir(), 'cli-paths-'))
    try {
      const fromThere = (...args: string[]) =>
        promisify(execFile)(process.execPath, [builtCli, ...args], { env: { ...process.env, npm_lifecycle_event: 'origin', INIT_CWD: directory }, timeout: 30_000 })
      const { recipient } = JSON.parse((await fromThere('preload-identity', '--out', 'identity.txt')).stdout) as { recipient: string }
      expect(recipient).toMatch(/^age1/)
      expect(existsSync(path.join(directory, 'identity.txt'))).toBe(true)
      const again = await fromThere('preload-identity', '--out', 'identity.txt').catch((error: { code: number; stderr: string }) => error)
      expect(again).toMatchObject({ code: 1, stderr: `--out: ${path.join(directory, 'identity.txt')} exists; it is not overwritten: name a new file\n` })
      writeFileSync(path.join(directory, 'shares.json'), JSON.stringify([{ account_id: 'a', share: `0x${'5e'.repeat(32)}` }]))
      await fromThere('seal-shares', '--in', 'shares.json', '--recipient', recipient, '--out', 'shares.age')
      expect(existsSync(path.join(directory, 'shares.age'))).toBe(true)
      const over = await fromThere('seal-shares', '--in', 'shares.json', '--recipient', recipient, '--out', 'shares.age').catch((error: { code: number; stderr: string }) => error)
      expect(over).toMatchObject({ code: 1, stderr: `--out: ${path.join(directory, 'shares.age')} exists; it is not overwritten: name a new file\n` })
      // An INIT_CWD inherited from another npm script names some other directory: the working directory counts then.
      const elsewhere = mkdtempSync(path.join(tmpdir(), 'cli-cwd-'))
      try {
        await promisify(execFile)(process.execPath, [builtCli, 'preload-identity', '--out', 'other.txt'], {
          cwd: elsewhere,
          env: { ...process.env, npm_lifecycle_event: 'deploy', INIT_CWD: directory },
          timeout: 30_000,
        })
        expect([existsSync(path.join(elsewhere, 'other.txt')), existsSync(path.join(directory, 'other.txt'))]).toEqual([true, false])
      } finally {
        rmSync(elsewhere, { recursive: true, force: true })
      }
    } finally {
      rmSync(directory, { recursive: true, force: true })
    }
  })

  it('refuses a count that is not a whole number, saying so, without a stack trace', async () => {
    const failed = await cli('create-keys', '--count', 'many').catch((error: { code: number; stderr: string }) => error)
    expect(failed).toMatchObject({ code: 1, stderr: '--count must be a whole number from 1 to 999999999, got many\n' })
  })

  it('sends nothing for --help, an option a command does not take, or a missing one; reads --name=value', async () => {
    const paths: string[] = []
    const recording = createServer((request, response) => {
      request.resume()
      paths.push(String(request.url))
      response.writeHead(201, { 'content-type': 'application/json' }).end(JSON.stringify({ keyId: 'k', address: '0x0000000000000000000000000000000000000001' }))
    })
    await new Promise<void>((resolve) => recording.listen(0, '127.0.0.1', resolve))
    const at = `http://127.0.0.1:${(recording.address() as AddressInfo).port}`
    const failed = (...args: string[]) => cliAt(at, ...args).then(() => 'succeeded', (error: { code: number; stderr: string }) => ({ code: error.code, stderr: error.stderr }))
    try {
      for (const command of ['rotate-data-key', 'unlock', 'create-keys']) {
        expect((await cliAt(at, command, '--help')).stdout).toMatch(new RegExp(`^usage: origin ${command}`))
      }
      expect(await failed('create-keys', '--cuont', '5')).toEqual({ code: 1, stderr: 'create-keys: unknown option --cuont (it takes --count, --concurrency)\n' })
      expect(await failed('create-keys')).toEqual({ code: 1, stderr: '--count is required\n' })
      // At most 256 at a time: more would run out of descriptors, and crowd the operators' listener a freeze needs.
      expect(await failed('create-keys', '--count', '5', '--concurrency', '257')).toEqual({ code: 1, stderr: '--concurrency must be a whole number from 1 to 256, got 257\n' })
      expect(await failed('rotate-data-key', '--now')).toEqual({ code: 1, stderr: 'rotate-data-key: unknown option --now (it takes none)\n' })
      expect(await failed('unlock', '--allow-unattested')).toEqual({ code: 1, stderr: '--nitro-root-file, --pcr0 and --allow-unattested go with --preload-identity-file\n' })
      expect(await failed('unlock', '--preload-identity-file', '/nonexistent/identity.txt', '--allow-unattested')).toEqual({ code: 1, stderr: '--preload-identity-file: cannot read /nonexistent/identity.txt: ENOENT\n' })
      // The Nitro root certificate: one that cannot be read, and a file that is no certificate.
      const identityDirectory = mkdtempSync(path.join(tmpdir(), 'cli-identity-'))
      try {
        const identity = path.join(identityDirectory, 'identity.txt')
        await cliAt(at, 'preload-identity', '--out', identity)
        const withRoot = (root: string) => failed('unlock', '--preload-identity-file', identity, '--nitro-root-file', root, '--pcr0', 'ab'.repeat(48))
        expect(await withRoot('/nonexistent/root.pem')).toEqual({ code: 1, stderr: '--nitro-root-file: cannot read /nonexistent/root.pem: ENOENT\n' })
        expect(await withRoot(identity)).toEqual({ code: 1, stderr: `--nitro-root-file: ${identity} is not a certificate (PEM or DER)\n` })
      } finally {
        rmSync(identityDirectory, { recursive: true, force: true })
      }
      for (const command of ['get-key', 'freeze', 'unfreeze', 'archive', 'sign']) expect(await failed(command)).toEqual({ code: 1, stderr: '--key is required (a key id, as create-keys printed it)\n' })
      expect(await failed('sign', '--key', 'k')).toEqual({ code: 1, stderr: '--digest is required\n' })
      expect(await failed('sign', '--key', 'k', '--digest', '0x12')).toEqual({ code: 1, stderr: '--digest must be 0x and 32 bytes in hex, got 0x12\n' })
      const unknown = await failed('frezee', '--key', 'k')
      expect(unknown).toMatchObject({ code: 2, stderr: expect.stringMatching(/^origin: unknown command "frezee"\nusage:\n/) })
      expect((unknown as { stderr: string }).stderr).toContain('ORIGIN_URL (http://127.0.0.1:8443)')
      // A new identity is printed only when asked: it opens every share sealed to it.
      for (const args of [[], ['--print', '--out', '/nonexistent/identity.txt']]) {
        expect(await failed('preload-identity', ...args)).toEqual({ code: 1, stderr: 'preload-identity needs --out F (the identity written to F, owner-only) or --print (the identity printed), one of them\n' })
      }
      expect(paths).toEqual([])
      expect((await cliAt(at, 'create-keys', '--count=2', '--concurrency=1')).stdout.trim().split('\n')).toHaveLength(2)
      expect(paths).toEqual(['/v1/keys', '/v1/keys'])
    } finally {
      recording.close()
    }
  })

  it('takes ORIGIN_URL with a trailing slash, says which parent it cannot reach and why, and exits 1 from status unless the origin is ok', async () => {
    expect(JSON.parse((await cliAt(`${origin.url}/`, 'unlock')).stdout)).toEqual({ ok: true })
    const unreachable = await cliAt('http://127.0.0.1:1', 'unlock').catch((error: { code: number; stderr: string }) => error)
    expect(unreachable).toMatchObject({ code: 1, stderr: 'cannot reach the parent at http://127.0.0.1:1: ECONNREFUSED\n' })
    const down = createServer((request, response) => {
      request.resume()
      response.writeHead(503, { 'content-type': 'application/json' }).end(JSON.stringify({ ok: false, status: 'down' }))
    })
    // One that takes the connection and never answers: status gives up (after ORIGIN_TIMEOUT_MS) rather than hang a health check.
    const silent = createServer((request) => request.resume())
    await new Promise<void>((resolve) => down.listen(0, '127.0.0.1', resolve))
    await new Promise<void>((resolve) => silent.listen(0, '127.0.0.1', resolve))
    try {
      const status = await cliAt(`http://127.0.0.1:${(down.address() as AddressInfo).port}`, 'status').catch((error: { code: number; stdout: string }) => error)
      expect(status).toMatchObject({ code: 1 })
      expect(JSON.parse((status as { stdout: string }).stdout)).toEqual({ ok: false, status: 'down' })
      const silentAt = `http://127.0.0.1:${(silent.address() as AddressInfo).port}`
      const givenUp = await promisify(execFile)(process.execPath, [builtCli, 'status'], { env: { ...process.env, ORIGIN_URL: silentAt, ORIGIN_TIMEOUT_MS: '1500' } }).catch((error: { code: number; stderr: string }) => error)
      expect(givenUp).toMatchObject({ code: 1, stderr: `the parent at ${silentAt} sent nothing for 1.5 s: GET /healthz given up\n` })
      // A host that takes the connection but never begins TLS: given up within ORIGIN_TIMEOUT_MS too, as a parent not
      // reached (nothing was sent, so a create there made no key), not as one that went quiet after a request.
      const mute = createNetServer((socket) => socket.on('error', () => {}))
      await new Promise<void>((resolve) => mute.listen(0, '127.0.0.1', resolve))
      try {
        const muteAt = `https://127.0.0.1:${(mute.address() as AddressInfo).port}`
        const { code, stderr } = await cliProcess(muteAt, ['create-keys', '--count', '1'], { ORIGIN_TIMEOUT_MS: '300' }).ended
        expect({ code, stderr }).toEqual({ code: 1, stderr: `created 0 of 1 keys; stopped after a failure: cannot reach the parent at ${muteAt}: no TLS session within 0.3 s\n` })
      } finally {
        mute.close()
      }
      // A rotation answers when it is done, however long that is: it waits, ORIGIN_TIMEOUT_MS or not, until the test stops it.
      const rotating = await promisify(execFile)(process.execPath, [builtCli, 'rotate-data-key'], {
        env: { ...process.env, ORIGIN_URL: silentAt, ORIGIN_HMAC_KEY_ID: originHmac.keyId, ORIGIN_HMAC_SECRET: originHmac.secret, ORIGIN_TIMEOUT_MS: '300' },
        timeout: 4_000,
      }).catch((error: { killed: boolean; stderr: string }) => error)
      expect(rotating).toMatchObject({ killed: true, stderr: '' })
      // TLS settings with a plain http:// ORIGIN_URL would be ignored: refused instead.
      const plainWithTls = await promisify(execFile)(process.execPath, [builtCli, 'status'], { env: { ...process.env, ORIGIN_URL: silentAt, ORIGIN_TLS_CA_FILE: '/etc/ssl/ca.pem' } }).catch((error: { code: number; stderr: string }) => error)
      expect(plainWithTls).toMatchObject({ code: 1, stderr: `ORIGIN_TLS_CA_FILE, ORIGIN_TLS_CERT_FILE, ORIGIN_TLS_KEY_FILE are for an https:// ORIGIN_URL, and ${silentAt} is not one\n` })
    } finally {
      down.close()
      silent.closeAllConnections()
      silent.close()
    }
  })
})

describe('the Worker signs through the origin, and the chain accepts it', () => {
  let devnet: Devnet
  let keyId: string
  let address: Address

  beforeAll(async () => {
    const { body } = await origin.request('POST', '/v1/keys')
    keyId = body.keyId as string
    address = getAddress(body.address as string)
    devnet = await deployDevnet({ rpcUrl: anvil.rpcUrl, paymasterSigner: address })
  })

  it('keyless backend → parent → enclave over TCP: handleOps accepts the sponsorship', async () => {
    const config = {
      chains: [devnetChainConfig(devnet, 'pimlico-singleton')],
      // The address the parent gave when the key was made, as an operator records it: the Worker checks every signature against it.
      signers: { primary: { kind: 'keyless', url: origin.url, keyId, address, hmacKeyId: workerHmac.keyId } },
    }
    const worker = await startWorker({ port: 18861, vars: { ORIGIN_HMAC_SECRET: workerHmac.secret, PAYMASTER_CONFIG: JSON.stringify(config) } })
    try {
      for (const version of ['0.7', '0.8'] as const) {
        const { account, prepared } = await prepareSponsored({ devnet, workerUrl: worker.url, version })
        const { event } = await signAndSubmit({ devnet, version, account, userOperation: prepared })
        expect(event.args).toMatchObject({ success: true, paymaster: getAddress(devnet.singletonPaymasters[version]) })
      }
    } finally {
      await worker.stop()
    }
  })
})

describe('the parent process', () => {
  it('writes the enclave\u2019s log lines into its own log (no one reads a production enclave\u2019s console), each once', async () => {
    const fromEnclave = () => origin.output('parent').split('\n').filter((line) => line.includes('"source":"enclave"'))
    const listened = () => fromEnclave().some((line) => line.includes('"event":"enclave_listening"'))
    for (let attempt = 0; attempt < 100 && !listened(); attempt++) await new Promise((resolve) => setTimeout(resolve, 50))
    const lines = fromEnclave().map((line) => JSON.parse(line) as Record<string, unknown>)
    expect(lines).toContainEqual(expect.objectContaining({ event: 'enclave_listening', source: 'enclave', enclave: 'enclave-1', address: expect.anything() }))
    expect(new Set(fromEnclave()).size).toBe(fromEnclave().length)
  })

  it('stops, naming the setting, and never says it listens, when a listener cannot listen (a busy port): before it makes a store', async () => {
    const busy = createServer()
    await new Promise<void>((listening) => busy.listen(0, '127.0.0.1', listening))
    const busyAt = `127.0.0.1:${(busy.address() as AddressInfo).port}`
    const stores = mkdtempSync(path.join(tmpdir(), 'origin-busy-port-'))
    try {
      await origin.kill('parent')
      // Another process's port for either, or the operators' listener on the clients' address (operators listen first).
      const cases: Array<[Record<string, string>, string]> = [
        [{ OPERATOR_LISTEN: busyAt }, 'OPERATOR_LISTEN'],
        [{ PARENT_LISTEN: busyAt }, 'PARENT_LISTEN'],
        [{ OPERATOR_LISTEN: new URL(origin.url).host }, 'PARENT_LISTEN'],
      ]
      for (const [index, [settings, refused]] of cases.entries()) {
        // A first start: its store would be made, and a data key asked of KMS, were the ports not tried first.
        const storeDir = path.join(stores, String(index))
        const started = origin.startParent({ ...settings, STORE_DIR: storeDir })
        await expect(started).rejects.toThrow(`${refused}: cannot listen there: listen EADDRINUSE`)
        await expect(started).rejects.not.toThrow('"parent_listening"')
        expect(existsSync(storeDir)).toBe(false)
      }
    } finally {
      busy.close()
      rmSync(stores, { recursive: true, force: true })
      await origin.startParent()
    }
    const created = await origin.request('POST', '/v1/keys')
    expect(created.status).toBe(201)
  })
})

describe('crash safety', () => {
  it('after kill -9 of the enclave and the parent during a stream of creates, every acknowledged key signs as its address', async () => {
    const acknowledged: Array<{ keyId: string; address: Address }> = []
    let stop = false
    const creator = async () => {
      while (!stop) {
        const answer = await origin.request('POST', '/v1/keys').catch(() => undefined)
        if (answer?.status === 201) acknowledged.push({ keyId: answer.body.keyId as string, address: answer.body.address as Address })
        else if (!answer) return
      }
    }
    const creators = Array.from({ length: 16 }, creator)
    // Killed mid-stream, once some keys are acknowledged (however slow this machine's fsync) and more are on their way.
    await expect.poll(() => acknowledged.length, { timeout: 30_000, interval: 20 }).toBeGreaterThan(20)
    await Promise.all([origin.kill('enclave'), origin.kill('parent')])
    stop = true
    await Promise.all(creators)
    expect(acknowledged.length).toBeGreaterThan(20)

    await origin.startEnclave()
    await origin.startParent()
    const digest = keccak256(toHex('after the crash'))
    for (const key of acknowledged) {
      const signed = await signWithOrigin(key.keyId, digest)
      expect(signed.status).toBe(200)
      expect(await recoveredFromAnswer(digest, signed.body as never)).toBe(key.address)
    }
  })
})
