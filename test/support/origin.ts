import { execFileSync, spawn, type ChildProcess } from 'node:child_process'
import path from 'node:path'
import { recoverAddress, type Address, type Hex } from 'viem'
import { signRequest } from '../../enclave-origin/protocol/requestSigning.js'
import { stopProcess } from './anvil.js'
import type { LocalKms } from './kmsServer.js'

/**
 * The enclave origin as operators run it: the enclave and the parent as two
 * child processes (`npm run origin enclave|parent`), on 127.0.0.1, the
 * enclave's data key from the local KMS server. Each can be killed (-9) and
 * started again on the same store.
 */

/** The operators' key: every right. */
export const originHmac = { keyId: 'operator', secret: 'hmac-secret-made-for-tests' }
/** The Worker's key, as a deployment gives it: sign and read keys only (ORIGIN_SIGN_ONLY_KEY_IDS). */
export const workerHmac = { keyId: 'worker', secret: 'worker-hmac-secret-made-for-tests' }

/**
 * The address a sign answer of the parent's API (`{signature: r ‖ s, recoveryId}`) recovers to for `digest`; an answer
 * of another shape (a recovery id as a string, say) fails the test.
 */
export function recoveredFromAnswer(digest: Hex, answer: { signature: unknown; recoveryId: unknown }): Promise<Address> {
  // Thrown, not expect()ed: origin-local.ts imports this file outside vitest.
  if (typeof answer.signature !== 'string' || !/^0x[0-9a-f]{128}$/.test(answer.signature) || (answer.recoveryId !== 0 && answer.recoveryId !== 1))
    throw new Error(`not a sign answer: ${JSON.stringify(answer)}`)
  return recoverAddress({ hash: digest, signature: `${answer.signature as Hex}${(27 + (answer.recoveryId as number)).toString(16)}` as Hex })
}

/**
 * The origin built as production runs it (`scripts/build-origin.mjs`: plain JavaScript) into dist/test-builds/`name`,
 * once per test file: the path of its cli.js. Under the project, as dist/enclave-origin is, so that its files are ES
 * modules by the project's package.json and import from its node_modules. Run through tsx instead, each start of the
 * CLI or of a process pays about 2 s of CPU for the TypeScript loader; the build takes under one.
 */
export function buildOrigin(name: string): string {
  const outdir = path.resolve('dist/test-builds', name)
  execFileSync(process.execPath, ['scripts/build-origin.mjs', outdir], { stdio: 'pipe' })
  return path.join(outdir, 'cli.js')
}

/** The KMS key that wraps the enclave's data key. */
export async function symmetricKmsKey(kms: LocalKms): Promise<string> {
  return kms.createSymmetricKey()
}

/**
 * One origin process: from the TypeScript sources through tsx, or from a
 * build (`npm run build:origin`) when `builtCli` names its cli.js, as in
 * production. ORIGIN_NODE_FLAGS (space-separated) go to node for both
 * processes, e.g. `--cpu-prof` or `--trace-gc` when profiling a benchmark.
 */
function cli(command: string, extraEnv: Record<string, string>, builtCli: string | undefined): ChildProcess {
  const env: Record<string, string | undefined> = { ...process.env, ...extraEnv }
  // Only the credentials a test gives: none from the shell that runs it.
  for (const name of ['AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY', 'AWS_SESSION_TOKEN', 'AWS_PROFILE']) if (!(name in extraEnv)) delete env[name]
  const nodeFlags = env.ORIGIN_NODE_FLAGS ? env.ORIGIN_NODE_FLAGS.split(' ').filter(Boolean) : []
  const entry = builtCli ? [builtCli] : ['--import', 'tsx', 'enclave-origin/cli.ts']
  return spawn(process.execPath, [...nodeFlags, ...entry, command], {
    env,
    stdio: ['ignore', 'pipe', 'pipe'],
  })
}

async function until(check: () => Promise<boolean>, what: string, child: ChildProcess, output: () => string): Promise<void> {
  const deadline = Date.now() + 30_000
  while (Date.now() < deadline) {
    // Once it has exited, and its last words are read: its output may still be draining.
    if ((child.exitCode !== null || child.signalCode !== null) && child.stdout!.readableEnded && child.stderr!.readableEnded) break
    if (await check().catch(() => false)) return
    await new Promise((resolve) => setTimeout(resolve, 100))
  }
  throw new Error(`${what} did not start:\n${output().slice(-2_000)}`)
}

export type Origin = {
  url: string
  startEnclave(): Promise<void>
  /** `once`: settings for this start alone, over the origin's own. */
  startParent(once?: Record<string, string>): Promise<void>
  /** SIGKILL, resolved once the process is gone. */
  kill(which: 'enclave' | 'parent'): Promise<void>
  pids(): { enclave?: number; parent?: number }
  /** What the process has written (stdout and stderr) since it last started. */
  output(which: 'enclave' | 'parent'): string
  stop(): Promise<void>
  request(method: 'GET' | 'POST', path: string, body?: unknown): Promise<{ status: number; body: Record<string, unknown>; headers: Headers }>
}

export async function startOrigin(options: {
  kms: LocalKms
  kmsKeyId: string
  enclavePort: number
  parentPort: number
  storeDir: string
  extraEnv?: Record<string, string>
  builtCli?: string
  /** Each piece of either process's output (stdout and stderr) as it comes. */
  onOutput?: (which: 'enclave' | 'parent', text: string) => void
  /** A process ended that neither `kill` nor `stop` ended, its output all read: `how` is its exit code or signal. */
  onExit?: (which: 'enclave' | 'parent', how: string) => void
}): Promise<Origin> {
  const env = {
    ORIGIN_PROFILE: 'development',
    ENCLAVE_LISTEN: `127.0.0.1:${options.enclavePort}`,
    KMS_KEY_ID: options.kmsKeyId,
    KMS_REGION: options.kms.credentials.region,
    KMS_ENDPOINT: options.kms.url,
    AWS_ACCESS_KEY_ID: options.kms.credentials.accessKeyId,
    AWS_SECRET_ACCESS_KEY: options.kms.credentials.secretAccessKey,
    PARENT_LISTEN: `127.0.0.1:${options.parentPort}`,
    ENCLAVES: `enclave-1=127.0.0.1:${options.enclavePort}`,
    STORE_DIR: options.storeDir,
    ORIGIN_HMAC_KEYS: `${originHmac.keyId}:${originHmac.secret},${workerHmac.keyId}:${workerHmac.secret}`,
    ORIGIN_SIGN_ONLY_KEY_IDS: workerHmac.keyId,
    ...options.extraEnv,
  }
  const url = `http://127.0.0.1:${options.parentPort}`
  const children: Partial<Record<'enclave' | 'parent', ChildProcess>> = {}
  const outputs: Record<string, string> = { enclave: '', parent: '' }
  /** Processes `kill` or `stop` is ending: their exit was asked for. */
  const ending = new WeakSet<ChildProcess>()
  const start = (which: 'enclave' | 'parent', once: Record<string, string> = {}) => {
    // The enclave has no credentials of its own, as in a Nitro Enclave: its KMS calls sign with those the parent delivers.
    const { AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...enclaveEnv } = env
    const child = cli(which, which === 'enclave' ? { ...enclaveEnv, ...once } : { ...env, ...once }, options.builtCli)
    outputs[which] = ''
    const take = (chunk: Buffer) => {
      // A killed predecessor's last words are not this process's.
      if (children[which] !== child) return
      const text = chunk.toString('utf8')
      outputs[which] = outputs[which]! + text
      options.onOutput?.(which, text)
    }
    child.stdout!.on('data', take)
    child.stderr!.on('data', take)
    // 'close', not 'exit': its last words are read by then.
    child.once('close', (code, signal) => {
      if (!ending.has(child)) options.onExit?.(which, signal === null ? `exit code ${code}` : `signal ${signal}`)
    })
    children[which] = child
    return child
  }
  const origin: Origin = {
    url,
    startEnclave: async () => {
      const child = start('enclave')
      // The process says so once it listens; a port check could reach a predecessor still dying.
      await until(async () => outputs.enclave!.includes('"enclave_listening"'), 'the enclave', child, () => outputs.enclave!)
    },
    startParent: async (once) => {
      const child = start('parent', once)
      // Listening, not healthy: a preload enclave is unhealthy until its unlock.
      await until(async () => outputs.parent!.includes('"parent_listening"'), 'the parent', child, () => outputs.parent!)
    },
    kill: (which) =>
      new Promise<void>((resolve) => {
        const child = children[which]
        if (!child || child.exitCode !== null || child.signalCode !== null) return resolve()
        ending.add(child)
        // Once its output is all read: what it wrote last must not count as its successor's.
        child.once('close', () => resolve())
        child.kill('SIGKILL')
      }),
    pids: () => ({ enclave: children.enclave?.pid, parent: children.parent?.pid }),
    output: (which) => outputs[which]!,
    stop: async () => {
      await Promise.all(
        Object.values(children).map((child) => {
          if (!child) return
          ending.add(child)
          return stopProcess(child)
        }),
      )
    },
    request: async (method, path, body) => {
      const payload = new TextEncoder().encode(body === undefined ? '' : JSON.stringify(body))
      const headers = await signRequest({ ...originHmac, method, path, body: payload })
      const response = await fetch(`${url}${path}`, { method, headers, body: method === 'POST' ? payload : undefined })
      return { status: response.status, body: (await response.json()) as Record<string, unknown>, headers: response.headers }
    },
  }
  try {
    await origin.startEnclave()
    await origin.startParent()
  } catch (error) {
    // Whichever started goes: nothing else would stop it, and it holds its port.
    await origin.stop()
    throw error
  }
  return origin
}
