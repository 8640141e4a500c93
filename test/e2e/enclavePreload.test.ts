import { execFile } from 'node:child_process'
import { mkdtempSync, rmSync, statSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import path from 'node:path'
import { promisify } from 'node:util'
import { afterAll, beforeAll, expect, it } from 'vitest'
import { keccak256, toHex } from 'viem'
import { generatePrivateKey, privateKeyToAddress } from 'viem/accounts'
import { generatePreloadIdentity, sealPreloadIdentity } from '../../enclave-origin/preloadFiles.js'
import { startLocalKms, type LocalKms } from '../support/kmsServer.js'
import { buildOrigin, originHmac, recoveredFromAnswer, startOrigin, symmetricKmsKey, type Origin } from '../support/origin.js'

/**
 * Preload mode: the enclave serves custodial account keys from an
 * age-encrypted file, once an unlock delivers the identity. The operator's
 * CLI makes the identity, seals the share file and delivers the unlock, the
 * identity sealed to the enclave's own recipient. This enclave is a
 * development one, with no attestation: the CLI must be told to seal to an
 * unattested recipient (the attested path is in test/unit/preloadDelivery).
 */

let kms: LocalKms
let origin: Origin
let dir: string
const accounts = Array.from({ length: 50 }, (_, i) => ({ account_id: `account-${i}`, share: generatePrivateKey() }))

/** The CLI and both processes run from the build, as in production. */
let builtCli: string

beforeAll(async () => {
  builtCli = buildOrigin('enclavePreload')
  kms = await startLocalKms({ port: 18656 })
  dir = mkdtempSync(path.join(tmpdir(), 'origin-preload-'))
  // The identity goes to an owner-only file, never to the screen.
  const { recipient, ...printedToo } = JSON.parse((await cli('preload-identity', '--out', path.join(dir, 'identity.txt'))).stdout) as { recipient: string }
  expect(printedToo).toEqual({})
  expect(statSync(path.join(dir, 'identity.txt')).mode & 0o777).toBe(0o600)
  writeFileSync(path.join(dir, 'shares.json'), JSON.stringify(accounts))
  const sealed = await cli('seal-shares', '--in', path.join(dir, 'shares.json'), '--recipient', recipient, '--out', path.join(dir, 'shares.age'))
  expect(sealed.stderr).toBe('sealed 50 entries\n')
  rmSync(path.join(dir, 'shares.json'))
  origin = await startOrigin({
    builtCli,
    kms,
    kmsKeyId: await symmetricKmsKey(kms),
    enclavePort: 18657,
    parentPort: 18658,
    storeDir: dir,
    extraEnv: { PRELOAD_FILE: path.join(dir, 'shares.age') },
  })
})

afterAll(async () => {
  await origin?.stop()
  await kms?.stop()
  rmSync(dir, { recursive: true, force: true })
})

function cli(...args: string[]) {
  return promisify(execFile)(process.execPath, [builtCli, ...args], {
    env: { ...process.env, ORIGIN_URL: origin?.url ?? '', ORIGIN_HMAC_KEY_ID: originHmac.keyId, ORIGIN_HMAC_SECRET: originHmac.secret },
    timeout: 30_000,
  })
}

const digest = keccak256(toHex('custodial'))
const sign = (accountId: string) => origin.request('POST', `/v1/keys/${accountId}/sign`, { digest })

// Signed: the enclaves' refusals are for authenticated callers.
const health = async () => {
  const { status, body } = await origin.request('GET', '/healthz')
  return { status, body: body as { enclaves: Array<{ ok: boolean; error?: string }> } }
}

it('refuses preloaded accounts until unlocked, then signs each with its own key', async () => {
  const before = await sign('account-3')
  expect(before.status).toBe(503)
  expect(before.body.error).toContain('preload file is not loaded yet')
  const unhealthy = await health()
  expect(unhealthy.status).toBe(503)
  expect(unhealthy.body.enclaves[0]).toMatchObject({ ok: false, error: expect.stringContaining('preload file is not loaded yet') })

  // A plain unlock unwraps the data key but brings no identity: the CLI says the accounts still wait, and fails.
  const plain = await cli('unlock').catch((error: { code: number; stdout: string; stderr: string }) => error)
  expect(plain).toMatchObject({ code: 1 })
  expect(JSON.parse((plain as { stdout: string }).stdout)).toEqual({ ok: true, preloadNotServed: [{ enclave: 'enclave-1', reason: 'the preload file is not loaded yet: UNLOCK with its age identity' }] })
  expect((plain as { stderr: string }).stderr).toBe(
    'the data key is unwrapped, but these enclaves serve no preloaded account: enclave-1 (the preload file is not loaded yet: UNLOCK with its age identity). Deliver the identity the share file was sealed to: origin unlock --preload-identity-file F …\n',
  )
  expect((await origin.request('GET', '/v1/keys/account-3')).body.error).toContain('preload file is not loaded yet')

  // The parent never takes an identity it could read.
  const clear = await origin.request('POST', '/v1/unlock', { preloadIdentity: (await generatePreloadIdentity()).identity })
  expect(clear.status).toBe(400)
  expect(clear.body.error).toContain('a preload identity in the clear is refused')

  const attestation = await origin.request('GET', '/v1/attestation')
  expect(attestation.status).toBe(200)
  const [enclave] = attestation.body.enclaves as Array<{ id: string; recipient: string; attestationDocument: string | null }>
  expect(enclave).toEqual({ id: 'enclave-1', recipient: expect.stringMatching(/^age1/), attestationDocument: null })
  const sealedWrong = await sealPreloadIdentity({ identity: (await generatePreloadIdentity()).identity, enclaves: [{ ...enclave!, attestationDocument: undefined }], trust: 'unattested' })
  const wrong = await origin.request('POST', '/v1/unlock', { sealedPreloadIdentities: { 'enclave-1': Buffer.from(sealedWrong.get('enclave-1')!).toString('base64') } })
  expect(wrong.status).toBe(400)
  expect(wrong.body.error).toContain('preload failed')
  expect((await sign('account-3')).body.error).toContain('preload failed')
  expect((await health()).body.enclaves[0]).toMatchObject({ ok: false, error: expect.stringContaining('preload failed') })
  for (const malformed of [{ sealedPreloadIdentities: [] }, { sealedPreloadIdentities: { 'enclave-1': 'not base64!' } }, 'text']) {
    expect(await origin.request('POST', '/v1/unlock', malformed)).toMatchObject({ status: 400, body: { error: expect.stringContaining('the unlock body must be empty or') } })
  }
  const noSuchEnclave = await origin.request('POST', '/v1/unlock', { sealedPreloadIdentities: { 'enclave-1': 'AAAA', e9: 'AAAA' } })
  expect(noSuchEnclave).toMatchObject({ status: 400, body: { error: 'a sealed preload identity is needed for each enclave: no enclave e9' } })

  // A file with no identity in it is refused before anything is sent (the enclave would refuse it only after a round trip).
  writeFileSync(path.join(dir, 'recipient.txt'), '# a recipient, not an identity\nage1zvkyg2lqzraa2lnjvqej32nkuu0ues2s82hzrye869xeexvn73equnujwj\n')
  await expect(cli('unlock', '--preload-identity-file', path.join(dir, 'recipient.txt'), '--allow-unattested')).rejects.toThrow(
    /--preload-identity-file: .*recipient\.txt holds no age identity \(one AGE-SECRET-KEY-1… line\): give the file `origin preload-identity --out` wrote/,
  )
  // Without a Nitro root to check a document against, the CLI seals only when told the enclave is unattested.
  await expect(cli('unlock', '--preload-identity-file', path.join(dir, 'identity.txt'))).rejects.toThrow(/needs --nitro-root-file .* and --pcr0 .*, or, for development enclaves, --allow-unattested/)
  const unlocked = await cli('unlock', '--preload-identity-file', path.join(dir, 'identity.txt'), '--allow-unattested')
  expect(JSON.parse(unlocked.stdout)).toEqual({ ok: true })
  expect((await health()).status).toBe(200)
  for (const account of [accounts[0]!, accounts[3]!, accounts[49]!]) {
    const signed = await sign(account.account_id)
    expect(signed.status).toBe(200)
    expect(await recoveredFromAnswer(digest, signed.body as never)).toBe(privateKeyToAddress(account.share))
  }
  expect((await sign('account-50')).status).toBe(404)
  // Each account reads as its address, active; the CLI's plain unlock now has nothing to wait for.
  expect((await origin.request('GET', '/v1/keys/account-3')).body).toEqual({
    keyId: 'account-3',
    publicKey: expect.stringMatching(/^0x04[0-9a-f]{128}$/),
    address: privateKeyToAddress(accounts[3]!.share),
    state: 'active',
    cacheState: 'WARM',
  })
  expect(JSON.parse((await cli('get-key', '--key', 'account-49')).stdout)).toMatchObject({ address: privateKeyToAddress(accounts[49]!.share) })
  expect((await origin.request('GET', '/v1/keys/account-50')).status).toBe(404)
  expect(JSON.parse((await cli('unlock')).stdout)).toEqual({ ok: true })
})

it('serves a stored key on a preload enclave that restarted and waits for its identity, and gives an unknown id 503 until its accounts are served', async () => {
  const [created, signedFirst] = [await origin.request('POST', '/v1/keys'), await origin.request('POST', '/v1/keys')]
  expect([created.status, signedFirst.status]).toEqual([201, 201])
  const keyId = created.body.keyId as string
  await origin.kill('enclave')
  await origin.startEnclave()
  /** The answer once the parent has unlocked the restarted enclave (503s with a Retry-After-Ms meanwhile). */
  const settled = async (request: () => ReturnType<Origin['request']>) => {
    let answer = await request()
    for (let attempt = 0; attempt < 20 && answer.status === 503; attempt++) {
      await new Promise((resolve) => setTimeout(resolve, Number(answer.headers.get('retry-after-ms') ?? 100)))
      answer = await request()
    }
    return answer
  }
  // A stored key's record is loaded from the store, by a sign as by a read: the enclave does not hold it, and it is
  // no preloaded account.
  const signed = await settled(() => sign(signedFirst.body.keyId as string))
  expect(signed.status).toBe(200)
  expect(await recoveredFromAnswer(digest, signed.body as never)).toBe(signedFirst.body.address)
  expect((await settled(() => origin.request('GET', `/v1/keys/${keyId}`))).body).toMatchObject({ keyId, address: created.body.address, state: 'active' })
  // An id the store does not hold may be an account of the file not loaded yet: 503, not 404.
  for (const answer of [await origin.request('GET', '/v1/keys/account-3'), await sign('account-3')]) {
    expect(answer).toMatchObject({ status: 503, body: { error: expect.stringContaining('preload file is not loaded yet') } })
  }
})
