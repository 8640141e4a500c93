import { spawn } from 'node:child_process'
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import { tmpdir } from 'node:os'
import path from 'node:path'

/**
 * The Worker under `wrangler dev` (real workerd), on 127.0.0.1, with vars and
 * secrets from a temporary env file. Stopped by killing the process group it
 * was started in, so wrangler's workerd child goes with it.
 */
export type RunningWorker = { url: string; pid: number; stop(): Promise<void> }

export async function startWorker(options: { port: number; vars: Record<string, string>; environment?: string }): Promise<RunningWorker> {
  const dir = mkdtempSync(path.join(tmpdir(), 'paymaster-worker-'))
  const envFile = path.join(dir, 'worker.env')
  writeFileSync(envFile, Object.entries(options.vars).map(([key, value]) => `${key}='${value}'`).join('\n'))
  const wrangler = path.join(path.dirname(createRequire(import.meta.url).resolve('wrangler/package.json')), 'bin', 'wrangler.js')
  const args = [
    wrangler,
    'dev',
    '--ip', '127.0.0.1',
    '--port', String(options.port),
    '--inspector-port', String(options.port + 1),
    '--env-file', envFile,
    '--persist-to', path.join(dir, 'state'),
    '--show-interactive-dev-session=false',
    '--log-level', 'warn',
    ...(options.environment ? ['--env', options.environment] : []),
  ]
  const child = spawn(process.execPath, args, {
    detached: true,
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, WRANGLER_SEND_METRICS: 'false', CLOUDFLARE_CF_FETCH_ENABLED: 'false', CI: 'true' },
  })
  let output = ''
  child.stdout!.on('data', (chunk) => (output += chunk))
  child.stderr!.on('data', (chunk) => (output += chunk))
  const url = `http://127.0.0.1:${options.port}`

  /** Signals the whole process group and returns once every process in it (wrangler, workerd) is gone. */
  const stop = async () => {
    const signalGroup = (signal: NodeJS.Signals | 0) => {
      try {
        process.kill(-child.pid!, signal)
        return true
      } catch {
        return false // ESRCH: nothing left in the group
      }
    }
    signalGroup('SIGTERM')
    const killAt = Date.now() + 5_000
    const giveUpAt = Date.now() + 15_000
    while (signalGroup(0) && Date.now() < giveUpAt) {
      if (Date.now() > killAt) signalGroup('SIGKILL')
      await new Promise((resolve) => setTimeout(resolve, 100))
    }
    rmSync(dir, { recursive: true, force: true })
  }

  const deadline = Date.now() + 60_000
  while (Date.now() < deadline) {
    if (child.exitCode !== null) break
    try {
      await fetch(`${url}/health`)
      return { url, pid: child.pid!, stop }
    } catch {
      await new Promise((resolve) => setTimeout(resolve, 200))
    }
  }
  await stop()
  throw new Error(`wrangler dev did not start on ${url}:\n${output.slice(-2_000)}`)
}
