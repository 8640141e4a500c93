/**
 * `npm run origin:local`: the enclave origin on this machine, to try it out. It starts the local KMS server (AWS KMS's
 * wire protocol with real cryptography, from the tests: no AWS account), one enclave and a parent in the development
 * profile on 127.0.0.1, with a store in a new temporary directory and new HMAC secrets, and prints the settings the
 * CLI's client commands need, then both processes' log lines. Ctrl-C stops them all and removes the store: its data
 * key is wrapped under a KMS key that lives only in this run's local KMS. So does the end of the enclave or the parent
 * (a crash, a kill), which it reports and exits 1: half an origin left running would only answer 503s.
 *
 * Ports: ORIGIN_LOCAL_PARENT_PORT (8443, the CLI's default ORIGIN_URL), ORIGIN_LOCAL_ENCLAVE_PORT (7000) and
 * ORIGIN_LOCAL_KMS_PORT (8444). It runs the build `npm run build:origin` made, as production does.
 */
import { randomBytes } from 'node:crypto'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import path from 'node:path'
import { fileURLToPath } from 'node:url'
import { startLocalKms, type LocalKms } from '../test/support/kmsServer.js'
import { startOrigin, symmetricKmsKey, type Origin } from '../test/support/origin.js'

/** A port setting; a bad one ends the run before anything starts, saying which. */
function portSetting(name: string, fallback: number): number {
  const raw = process.env[name] ?? String(fallback)
  const port = Number(raw)
  if (!/^\d+$/.test(raw) || port < 1 || port > 65_535) {
    console.error(`${name} must be a port from 1 to 65535, got ${raw}`)
    process.exit(2)
  }
  return port
}

const ports = { parent: portSetting('ORIGIN_LOCAL_PARENT_PORT', 8443), enclave: portSetting('ORIGIN_LOCAL_ENCLAVE_PORT', 7000), kms: portSetting('ORIGIN_LOCAL_KMS_PORT', 8444) }
const builtCli = fileURLToPath(new URL('../dist/enclave-origin/cli.js', import.meta.url))
// Made for this run, printed for the CLI and the Worker, and gone with it.
const operator = { keyId: 'operator', secret: randomBytes(32).toString('hex') }
const worker = { keyId: 'worker', secret: randomBytes(32).toString('hex') }

/** Each process's lines, prefixed with its name; a piece that ends mid-line waits for the rest, or for the process's end. */
const pending = { enclave: '', parent: '' }
const printLines = (which: 'enclave' | 'parent', text: string) => {
  const lines = (pending[which] + text).split('\n')
  pending[which] = lines.pop()!
  for (const line of lines) if (line !== '') console.log(`[${which}] ${line}`)
}

let kms: LocalKms | undefined
let storeDir: string | undefined
let origin: Origin | undefined
/** One stop, whatever asks for it (Ctrl-C, a process that ended); a process it ends is not reported as ending on its own. */
let stopped: Promise<void> | undefined
const stop = () =>
  (stopped ??= (async () => {
    await origin?.stop()
    await kms?.stop()
    if (storeDir) rmSync(storeDir, { recursive: true, force: true })
  })())
/** Stops everything, then exits with `code` (1 if stopping failed). */
const stopAndExit = (code: number) =>
  void stop().then(
    () => process.exit(code),
    (error: unknown) => {
      console.error(`stopping failed: ${error instanceof Error ? error.message : String(error)}`)
      process.exit(1)
    },
  )
/**
 * Ctrl-C (or SIGTERM) while it starts is acted on once the start has succeeded or failed, as only then are the
 * processes known; another meanwhile changes nothing (Node's default, to end at once, would leave them running).
 */
let interrupted = false
const onSignal = () => {
  if (origin) return stopAndExit(0)
  if (!interrupted) console.error('origin:local: stopping once the start is over')
  interrupted = true
}
process.on('SIGINT', onSignal)
process.on('SIGTERM', onSignal)
/** A process that ended on its own while the other started, said once the start is over. */
let endedWhileStarting: string | undefined
/**
 * A process that ended on its own stops the rest. Said a moment later, and only if nothing stopped them meanwhile:
 * Ctrl-C in a terminal reaches every process of the group, and a child may end on it before this process reads it.
 */
const ended = (which: 'enclave' | 'parent', how: string) => {
  printLines(which, '\n')
  const report = `the ${which} ended (${how}); its last lines are above. Stopping the rest.`
  if (origin === undefined) endedWhileStarting ??= report
  else
    setTimeout(() => {
      if (stopped) return
      console.error(`origin:local: ${report}`)
      stopAndExit(1)
    }, 200)
}
try {
  kms = await startLocalKms({ port: ports.kms })
  storeDir = mkdtempSync(path.join(tmpdir(), 'origin-local-'))
  origin = await startOrigin({
    kms,
    kmsKeyId: await symmetricKmsKey(kms),
    enclavePort: ports.enclave,
    parentPort: ports.parent,
    storeDir,
    builtCli,
    extraEnv: { ORIGIN_HMAC_KEYS: `${operator.keyId}:${operator.secret},${worker.keyId}:${worker.secret}`, ORIGIN_SIGN_ONLY_KEY_IDS: worker.keyId },
    onOutput: printLines,
    onExit: ended,
  })
} catch (error) {
  // As it stood when the start failed: a Ctrl-C during the cleanup does not make a failure a success.
  const asked = interrupted
  // A port in use, say: the ORIGIN_LOCAL_*_PORT settings move them. Said before the cleanup, which could fail too.
  if (!asked) console.error(`origin:local could not start: ${error instanceof Error ? error.message : String(error)}`)
  await stop().catch((stopping: unknown) => console.error(`and stopping what had started failed: ${stopping instanceof Error ? stopping.message : String(stopping)}`))
  process.exit(asked ? 0 : 1)
}
if (interrupted) stopAndExit(0)
else if (endedWhileStarting) {
  console.error(`origin:local: ${endedWhileStarting}`)
  stopAndExit(1)
} else {
  console.log(
    [
      '',
      `The enclave origin runs on 127.0.0.1 (development profile): the parent (pid ${origin.pids().parent}) at ${origin.url}, the enclave (pid ${origin.pids().enclave}) at 127.0.0.1:${ports.enclave}, the local KMS at ${kms.url}.`,
      `Its store is ${storeDir}, removed when this stops (Ctrl-C).`,
      'For the CLI, in another shell:',
      `  export ORIGIN_URL=${origin.url} ORIGIN_HMAC_KEY_ID=${operator.keyId} ORIGIN_HMAC_SECRET=${operator.secret}`,
      '  npm run -s origin create-keys -- --count 3',
      '  npm run -s origin sign -- --key <keyId> --digest 0x<64 hex digits>',
      `For the Worker's keyless backend (sign and read only): url ${origin.url}, HMAC key id ${worker.keyId}, secret ${worker.secret}.`,
      '',
    ].join('\n'),
  )
}
