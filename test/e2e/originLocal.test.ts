import { execFile, execFileSync, spawn } from 'node:child_process'
import { existsSync, readdirSync } from 'node:fs'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { promisify } from 'node:util'
import { beforeAll, expect, it } from 'vitest'
import { keccak256, toHex, type Address, type Hex } from 'viem'
import { recoveredFromAnswer } from '../support/origin.js'

/**
 * `npm run origin:local` (README, "Enclave origin"): the local KMS, an enclave and a parent from the build, whose
 * printed settings the CLI works with as they stand, and which Ctrl-C stops, its store removed.
 */
// The build that `npm run origin:local` makes first, which the script runs.
beforeAll(() => {
  execFileSync(process.execPath, ['scripts/build-origin.mjs'], { stdio: 'pipe' })
}, 120_000)

/** How many stores origin:local runs have left in the temporary directory. */
const originLocalStores = () => readdirSync(tmpdir()).filter((name) => name.startsWith('origin-local-')).length

/** `npm run origin:local` on these ports: what it prints (stdout and stderr), and its exit code and signal. */
function spawnOriginLocal(ports: { parent: number; enclave: number; kms: number }) {
  const env = { ...process.env, ORIGIN_LOCAL_PARENT_PORT: String(ports.parent), ORIGIN_LOCAL_ENCLAVE_PORT: String(ports.enclave), ORIGIN_LOCAL_KMS_PORT: String(ports.kms) }
  const child = spawn(process.execPath, ['--import', 'tsx', 'scripts/origin-local.ts'], { env, stdio: ['ignore', 'pipe', 'pipe'] })
  let output = ''
  child.stdout.on('data', (chunk: Buffer) => (output += chunk))
  child.stderr.on('data', (chunk: Buffer) => (output += chunk))
  const ended = new Promise<[number | null, NodeJS.Signals | null]>((resolve) => child.on('exit', (code, signal) => resolve([code, signal])))
  return { child, output: () => output, ended }
}

/**
 * `npm run origin:local` on these ports, once it has printed its settings: what it printed and what it prints next
 * (stdout and stderr), the settings its export line gives, its store, and the CLI with those settings.
 */
async function startOriginLocal(ports: { parent: number; enclave: number; kms: number }) {
  const { child, output: printed, ended } = spawnOriginLocal(ports)
  const exited = ended.then(([code]) => code)
  const stop = async () => {
    if (child.exitCode !== null) return
    child.kill('SIGINT')
    await exited
  }
  try {
    const exportLine = /export (ORIGIN_URL=\S+ ORIGIN_HMAC_KEY_ID=\S+ ORIGIN_HMAC_SECRET=\S+)\n/
    const deadline = Date.now() + 60_000
    while (!exportLine.test(printed()) && child.exitCode === null && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 100))
    const exported = exportLine.exec(printed())
    expect(exported, printed()).not.toBeNull()
    const settings = Object.fromEntries(exported![1]!.split(' ').map((pair) => pair.split('=') as [string, string]))
    const store = /Its store is (\S+), removed/.exec(printed())![1]!
    // The build beforeAll made, as `npm run origin` runs it.
    const cli = (...args: string[]) => promisify(execFile)(process.execPath, ['dist/enclave-origin/cli.js', ...args], { env: { ...process.env, ...settings }, timeout: 30_000 })
    return { child, output: printed, exited, stop, settings, store, cli }
  } catch (error) {
    await stop()
    throw error
  }
}

it('runs the origin on 127.0.0.1 with the settings it prints, and stops everything at Ctrl-C', { timeout: 120_000 }, async () => {
  const { child, output, exited, stop, settings, store, cli } = await startOriginLocal({ parent: 18681, enclave: 18682, kms: 18683 })
  try {
    expect(settings.ORIGIN_URL).toBe('http://127.0.0.1:18681')
    // Each process's lines come prefixed with its name.
    expect(output()).toMatch(/^\[parent\] \{.*"event":"parent_listening"/m)
    expect(existsSync(store)).toBe(true)
    const key = JSON.parse((await cli('create-keys', '--count', '1')).stdout) as { keyId: string; address: Address }
    const digest = keccak256(toHex('origin:local'))
    const signed = JSON.parse((await cli('sign', '--key', key.keyId, '--digest', digest)).stdout) as { signature: Hex; recoveryId: number }
    expect(await recoveredFromAnswer(digest, signed)).toBe(key.address)

    child.kill('SIGINT')
    expect(await exited).toBe(0)
    expect(existsSync(store)).toBe(false)
    // Its processes are gone with it: nothing answers on the parent's port.
    await expect(cli('status')).rejects.toThrow('cannot reach the parent at http://127.0.0.1:18681: ECONNREFUSED')
  } finally {
    await stop()
  }
})

it('stops everything, saying which, when a process it started ends on its own (the enclave, killed)', { timeout: 120_000 }, async () => {
  const { output, exited, stop, store, cli } = await startOriginLocal({ parent: 18687, enclave: 18688, kms: 18689 })
  try {
    const pid = (which: string) => Number(new RegExp(`the ${which} \\(pid (\\d+)\\)`).exec(output())![1])
    const parentPid = pid('parent')
    // The process that origin:local started, by the id it printed.
    process.kill(pid('enclave'), 'SIGKILL')
    expect(await exited).toBe(1)
    expect(output()).toContain('origin:local: the enclave ended (signal SIGKILL); its last lines are above. Stopping the rest.')
    expect(output()).not.toContain('stopping failed')
    expect(existsSync(store)).toBe(false)
    // The parent went with it.
    expect(() => process.kill(parentPid, 0)).toThrow(expect.objectContaining({ code: 'ESRCH' }))
    await expect(cli('status')).rejects.toThrow('cannot reach the parent at http://127.0.0.1:18687: ECONNREFUSED')
  } finally {
    await stop()
  }
})

it('stops at Ctrl-C while it starts, once the start is over, leaving nothing behind', { timeout: 90_000 }, async () => {
  const storesBefore = originLocalStores()
  const { child, output, ended: exited } = spawnOriginLocal({ parent: 18690, enclave: 18691, kms: 18692 })
  try {
    // The enclave has started, the parent not yet.
    const deadline = Date.now() + 60_000
    while (!output().includes('[enclave] ') && child.exitCode === null && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 20))
    expect(output()).not.toContain('export ORIGIN_URL')
    child.kill('SIGINT')
    expect(await exited, output()).toEqual([0, null])
    expect(output()).toContain('origin:local: stopping once the start is over')
    expect(output()).not.toContain('could not start')
    expect(output()).not.toContain('export ORIGIN_URL')
    expect(originLocalStores()).toBe(storesBefore)
    // Its processes went with it: the parent's port is free to take.
    const free = createServer()
    await new Promise<void>((listening, failed) => free.once('error', failed).listen(18690, '127.0.0.1', listening))
    await new Promise((closed) => free.close(closed))
  } finally {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGKILL')
      await exited
    }
  }
})

it('says why it could not start (a port in use), and leaves no store behind', { timeout: 90_000 }, async () => {
  // The enclave's port: the local KMS and the store are made by then, and must go.
  const taken = createServer()
  await new Promise<void>((resolve) => taken.listen(18686, '127.0.0.1', resolve))
  const storesBefore = originLocalStores()
  try {
    const failed = await promisify(execFile)(process.execPath, ['--import', 'tsx', 'scripts/origin-local.ts'], {
      env: { ...process.env, ORIGIN_LOCAL_PARENT_PORT: '18685', ORIGIN_LOCAL_ENCLAVE_PORT: '18686', ORIGIN_LOCAL_KMS_PORT: '18684' },
      timeout: 60_000,
    }).catch((error: { code: number; stdout: string; stderr: string }) => error)
    expect(failed).toMatchObject({ code: 1, stderr: expect.stringMatching(/^origin:local could not start: the enclave did not start:[\s\S]*EADDRINUSE/) })
    // Its cleanup went through: nothing said of it.
    expect((failed as { stderr: string }).stderr).not.toContain('and stopping what had started failed')
    expect(originLocalStores()).toBe(storesBefore)
  } finally {
    await new Promise((resolve) => taken.close(resolve))
  }
})

it('refuses a port setting that is not a port, before it starts anything', async () => {
  const refused = await promisify(execFile)(process.execPath, ['--import', 'tsx', 'scripts/origin-local.ts'], { env: { ...process.env, ORIGIN_LOCAL_KMS_PORT: '99999' }, timeout: 30_000 }).catch(
    (error: { code: number; stdout: string; stderr: string }) => error,
  )
  expect(refused).toMatchObject({ code: 2, stdout: '', stderr: 'ORIGIN_LOCAL_KMS_PORT must be a port from 1 to 65535, got 99999\n' })
})
