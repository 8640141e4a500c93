import { execFile, execFileSync, spawnSync } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { existsSync, mkdirSync, readdirSync, rmSync, statSync, utimesSync } from 'node:fs'
import path from 'node:path'
import { pathToFileURL } from 'node:url'
import { promisify } from 'node:util'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { bytesToHex, recoverAddress } from 'viem'
import { privateKeyToAddress } from 'viem/accounts'
import type { SignEngine } from '../../enclave-origin/enclave/engine.js'

/**
 * `npm run build:origin`, what the origin's processes run in production: the
 * build must run on its own. Built under dist/, as the real one, so that its
 * files are ES modules by the project's package.json and its imports resolve
 * to the project's node_modules.
 */
const outdir = path.resolve('dist/test-builds/origin-build-test/enclave-origin')

beforeAll(() => {
  // Under an owner-only umask, which the build must not pass on: another user runs what root built.
  execFileSync('sh', ['-c', 'umask 077 && exec "$0" "$@"', process.execPath, 'scripts/build-origin.mjs', outdir], { stdio: 'pipe' })
})
afterAll(() => rmSync(path.dirname(outdir), { recursive: true, force: true }))

describe('the enclave origin build', () => {
  it('runs the operators\u2019 CLI, which any user may read (an image built as root runs as another)', () => {
    for (const directory of [outdir, path.join(outdir, 'enclave')]) expect(statSync(directory).mode & 0o777).toBe(0o755)
    for (const file of ['cli.js', 'enclave/signWorker.mjs']) expect(statSync(path.join(outdir, file)).mode & 0o777).toBe(0o644)
    const printed = JSON.parse(execFileSync(process.execPath, [path.join(outdir, 'cli.js'), 'preload-identity', '--print'], { encoding: 'utf8' })) as { identity: string; recipient: string }
    expect(printed.identity).toMatch(/^AGE-SECRET-KEY-1[0-9A-Z]+$/)
    expect(printed.recipient).toMatch(/^age1[0-9a-z]+$/)
  })

  it('refuses to start a production enclave without a Nitro Secure Module, a profile it does not know, and settings it cannot use', { timeout: 60_000 }, () => {
    const enclave = (env: Record<string, string>) => {
      const run = spawnSync(process.execPath, [path.join(outdir, 'cli.js'), 'enclave'], { env: { PATH: process.env.PATH, ...env }, encoding: 'utf8', timeout: 30_000 })
      return { status: run.status, stderr: run.stderr.trim() }
    }
    // The real addon, loaded from the built layout, finds no /dev/nsm here.
    expect(enclave({ ORIGIN_PROFILE: 'production' })).toEqual({ status: 1, stderr: 'no Nitro Secure Module: /dev/nsm cannot be opened (this is not a Nitro Enclave, or its nsm driver is not loaded)' })
    expect(enclave({ ORIGIN_PROFILE: 'prod' })).toEqual({ status: 1, stderr: 'ORIGIN_PROFILE must be one of development, production, got prod' })
    expect(enclave({ ENCLAVE_ATTESTATION: 'tpm' })).toEqual({ status: 1, stderr: 'ENCLAVE_ATTESTATION must be one of nitro, none, got tpm' })
    // Settings named in their refusals, before the signing threads start: a listen address, and a preload file that cannot be read.
    expect(enclave({ KMS_KEY_ID: 'alias/any', ENCLAVE_LISTEN: '19412' })).toEqual({ status: 1, stderr: 'ENCLAVE_LISTEN: 19412 is neither host:port nor a Unix socket path (one with a /)' })
    expect(enclave({ KMS_KEY_ID: 'alias/any', PRELOAD_FILE: '/nonexistent/shares.age' })).toEqual({ status: 1, stderr: 'PRELOAD_FILE: cannot read /nonexistent/shares.age: ENOENT' })
    expect(enclave({ KMS_KEY_ID: 'alias/any', PRELOAD_FILE: path.dirname(outdir) })).toEqual({ status: 1, stderr: `PRELOAD_FILE: ${path.dirname(outdir)} is not a file` })
    // A FIFO with no writer: opened, it would hold the start for good.
    const fifo = path.join(path.dirname(outdir), 'shares.fifo')
    // One a killed run left would make mkfifo fail.
    rmSync(fifo, { force: true })
    execFileSync('mkfifo', [fifo])
    try {
      expect(enclave({ KMS_KEY_ID: 'alias/any', PRELOAD_FILE: fifo })).toEqual({ status: 1, stderr: `PRELOAD_FILE: ${fifo} is not a file` })
    } finally {
      rmSync(fifo)
    }
  })

  it('signs on the engine\u2019s worker thread, whose script it carries next to the engine', async () => {
    const { SignEngine: BuiltEngine } = (await import(pathToFileURL(path.join(outdir, 'enclave/engine.js')).href)) as { SignEngine: typeof SignEngine }
    // No inline signing: the request must cross to the worker.
    const engine = new BuiltEngine({ threads: 1, inlinePerTurn: 0 })
    await engine.start()
    try {
      const privateKey = new Uint8Array(randomBytes(32))
      const digest = new Uint8Array(randomBytes(32))
      const { signature, recoveryId } = await engine.sign({ privateKey, digest })
      expect(engine.stats().inline).toBe(0)
      const recovered = await recoverAddress({ hash: bytesToHex(digest), signature: bytesToHex(new Uint8Array([...signature, 27 + recoveryId])) })
      expect(recovered).toBe(privateKeyToAddress(bytesToHex(privateKey)))
    } finally {
      await engine.stop()
    }
  })

  it('builds again beside the last build and swaps it in: the files a running process loads later never go missing for the build\u2019s length', { timeout: 60_000 }, async () => {
    const worker = path.join(outdir, 'enclave', 'signWorker.mjs')
    let checks = 0
    let missing = 0
    const watch = setInterval(() => {
      checks += 1
      if (!existsSync(worker)) missing += 1
    }, 2)
    try {
      await promisify(execFile)(process.execPath, ['scripts/build-origin.mjs', outdir])
    } finally {
      clearInterval(watch)
    }
    // The build takes hundreds of checks; only the moment between two renames could catch one.
    expect(checks).toBeGreaterThan(50)
    expect(missing).toBeLessThanOrEqual(1)
    expect(readdirSync(path.dirname(outdir)).sort()).toEqual(['enclave-origin'])
    // What a build killed half-way left an hour ago goes; a younger one (a build under way) stays.
    const stale = `${outdir}.building-killed`
    mkdirSync(stale)
    utimesSync(stale, new Date(Date.now() - 3_600_000), new Date(Date.now() - 3_600_000))
    const underWay = `${outdir}.building-under-way`
    mkdirSync(underWay)
    await promisify(execFile)(process.execPath, ['scripts/build-origin.mjs', outdir])
    expect(readdirSync(path.dirname(outdir)).sort()).toEqual(['enclave-origin', 'enclave-origin.building-under-way'])
    rmSync(underWay, { recursive: true })
    // Two at once (two commands started together each build first): both succeed, and one whole build is left.
    const files = readdirSync(outdir, { recursive: true }).map(String).sort()
    await Promise.all([0, 1].map(() => promisify(execFile)(process.execPath, ['scripts/build-origin.mjs', `${outdir}/`])))
    expect(readdirSync(path.dirname(outdir)).sort()).toEqual(['enclave-origin'])
    expect(readdirSync(outdir, { recursive: true }).map(String).sort()).toEqual(files)
  })
})
