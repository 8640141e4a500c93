import { spawn, type ChildProcess } from 'node:child_process'
import { createRequire } from 'node:module'
import path from 'node:path'

/** A real anvil node from the @foundry-rs/anvil npm package, on 127.0.0.1 only. */
export type Anvil = { rpcUrl: string; stop(): Promise<void> }

function anvilBinary(): string {
  const require = createRequire(import.meta.url)
  const platformPackage = `@foundry-rs/anvil-${process.platform}-${process.arch === 'x64' ? 'amd64' : process.arch}`
  try {
    return path.join(path.dirname(require.resolve(`${platformPackage}/package.json`)), 'bin', 'anvil')
  } catch {
    return path.join(process.cwd(), 'node_modules', '.bin', 'anvil')
  }
}

export async function startAnvil(options: { port: number }): Promise<Anvil> {
  const child = spawn(anvilBinary(), ['--host', '127.0.0.1', '--port', String(options.port), '--silent'], {
    stdio: ['ignore', 'pipe', 'pipe'],
  })
  const rpcUrl = `http://127.0.0.1:${options.port}`
  await waitForRpc(rpcUrl, child)
  return { rpcUrl, stop: () => stopProcess(child) }
}

async function waitForRpc(rpcUrl: string, child: ChildProcess): Promise<void> {
  const deadline = Date.now() + 20_000
  let exited = false
  child.once('exit', () => (exited = true))
  while (Date.now() < deadline && !exited) {
    try {
      const response = await fetch(rpcUrl, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ jsonrpc: '2.0', id: 1, method: 'eth_chainId', params: [] }),
      })
      if (response.ok) return
    } catch {
      // not listening yet
    }
    await new Promise((resolve) => setTimeout(resolve, 100))
  }
  child.kill('SIGKILL')
  throw new Error(`anvil did not start on ${rpcUrl}`)
}

/** Ends a process this test started, by its own handle, and waits for it. */
export function stopProcess(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve()
  return new Promise((resolve) => {
    const timer = setTimeout(() => child.kill('SIGKILL'), 5_000)
    child.once('exit', () => {
      clearTimeout(timer)
      resolve()
    })
    child.kill('SIGTERM')
  })
}
