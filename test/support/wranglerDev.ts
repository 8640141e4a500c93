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

  const stop = async () => {
    if (child.exitCode === null && child.signalCode === null) {
      const exited = new Promise((resolve) => child.once('exit', resolve))
      try {
        process.kill(-child.pid!, 'SIGTERM')
      } catch {
        // already gone
      }
      const timer = setTimeout(() => {
        try {
          process.kill(-child.pid!, 'SIGKILL')
        } catch {
          // already gone
        }
      }, 5_000)
      await exited
      clearTimeout(timer)
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
