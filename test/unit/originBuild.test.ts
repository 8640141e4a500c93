import { execFileSync } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { rmSync } from 'node:fs'
import path from 'node:path'
import { pathToFileURL } from 'node:url'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { bytesToHex, recoverAddress } from 'viem'
import { privateKeyToAddress } from 'viem/accounts'
import type { SignEngine } from '../../enclave-origin/enclave/engine.js'

/**
 * `npm run build:origin`, what the origin's processes run in production: the
 * build must run on its own. Built under node_modules/.cache so that its
 * imports resolve to the project's node_modules, as in dist/.
 */
const outdir = path.resolve('node_modules/.cache/origin-build-test/enclave-origin')

beforeAll(() => {
  execFileSync(process.execPath, ['scripts/build-origin.mjs', outdir], { stdio: 'pipe' })
})
afterAll(() => rmSync(path.dirname(outdir), { recursive: true, force: true }))

describe('the enclave origin build', () => {
  it('runs the operators\u2019 CLI', () => {
    const printed = JSON.parse(execFileSync(process.execPath, [path.join(outdir, 'cli.js'), 'preload-identity'], { encoding: 'utf8' })) as { identity: string; recipient: string }
    expect(printed.identity).toMatch(/^AGE-SECRET-KEY-1[0-9A-Z]+$/)
    expect(printed.recipient).toMatch(/^age1[0-9a-z]+$/)
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
})
