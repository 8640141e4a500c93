/**
 * Operators' command line for the enclave origin:
 *
 *   origin enclave                 start the enclave process (settings: enclave/main.ts)
 *   origin parent                  start the parent process (settings: parent/main.ts)
 *   origin create-keys --count N   create keys in bulk through the parent, with a progress bar;
 *                                  prints one JSON line {keyId, address} per key
 *   origin unlock [--preload-identity-file F (--nitro-root-file R --pcr0 HEX | --allow-unattested)]
 *                                  have every enclave unwrap the data key again (and, in preload
 *                                  mode, load its share file with the age identity in F, sealed to
 *                                  each enclave's recipient once its attestation document checks
 *                                  out against the Nitro root certificate R and the image's PCR0;
 *                                  --allow-unattested: development enclaves, no document)
 *   origin rotate-data-key         re-seal every key under a new data key from KMS, then forget the old
 *                                  one; run it again to finish one that was interrupted
 *   origin preload-identity        a new age identity for a share file: prints {identity, recipient}
 *   origin seal-shares --in F --recipient R --out G
 *                                  age-encrypt a [{account_id, share}] JSON file for preload mode
 *   origin status                  the parent's /healthz
 *
 * The client commands use ORIGIN_URL, ORIGIN_HMAC_KEY_ID and ORIGIN_HMAC_SECRET.
 */
import { X509Certificate } from 'node:crypto'
import { readFileSync, writeFileSync } from 'node:fs'
import { logLine, setting, wholeNumberIn } from './config.js'
import { messageOf, parseJsonQuietly } from './errors.js'
import { generatePreloadIdentity, sealPreloadIdentity, sealShareFile, type RecipientTrust, type ShareFileEntry } from './preloadFiles.js'
import { runEnclave } from './enclave/main.js'
import { runParent } from './parent/main.js'
import { signRequest } from './protocol/requestSigning.js'

/** How long one command waits in all for an origin that answers 503 with a Retry-After-Ms (overloaded, or unlocking). */
const retryBudgetMs = 30_000

/**
 * One request to the parent. A 503 with a `Retry-After-Ms` (the parent shed it for load, or the key waits
 * for an unlock: either way nothing was done) is asked again after that wait, within `retryBudgetMs`.
 */
async function call(method: 'GET' | 'POST', path: string, json?: unknown): Promise<Record<string, unknown>> {
  const body = new TextEncoder().encode(json === undefined ? '' : JSON.stringify(json))
  const giveUpAt = Date.now() + retryBudgetMs
  let response: Response
  for (;;) {
    // Signed again each time: the parent refuses a nonce it has seen.
    const headers = await signRequest({ keyId: setting('ORIGIN_HMAC_KEY_ID', 'operator'), secret: setting('ORIGIN_HMAC_SECRET'), method, path, body })
    response = await fetch(`${setting('ORIGIN_URL', 'http://127.0.0.1:8443')}${path}`, { method, headers, body: method === 'POST' ? body : undefined })
    const retryAfterMs = Number(response.headers.get('retry-after-ms') ?? NaN)
    if (response.status !== 503 || !(retryAfterMs >= 0) || Date.now() + retryAfterMs > giveUpAt) break
    await response.body?.cancel()
    // At least 10 ms: a 0 must not turn the wait into a busy loop against the parent.
    await new Promise((resolve) => setTimeout(resolve, Math.max(retryAfterMs, 10)))
  }
  const text = await response.text()
  let answer: Record<string, unknown> | undefined
  try {
    answer = JSON.parse(text) as Record<string, unknown>
  } catch {
    // A proxy's error page, say: the status says more than a parse error would.
  }
  if (!response.ok || answer === undefined) throw new Error(`${method} ${path}: ${response.status} ${answer === undefined ? '(not JSON)' : JSON.stringify(answer)}`)
  return answer
}

function progress(done: number, total: number, startedAt: number): void {
  const width = 30
  const filled = Math.round((done / total) * width)
  const rate = done / Math.max((Date.now() - startedAt) / 1_000, 0.001)
  process.stderr.write(`\r[${'#'.repeat(filled)}${'.'.repeat(width - filled)}] ${done}/${total} keys, ${rate.toFixed(0)}/s`)
  if (done === total) process.stderr.write('\n')
}

/**
 * Creates `count` keys, `concurrency` at a time, printing each as it is made.
 * After a failure, or Ctrl-C, it starts no more but lets those under way
 * finish and prints them too: no route lists keys, so an id not printed
 * would be lost. Then it fails, saying how many it made.
 */
async function createKeys(count: number, concurrency = 64): Promise<void> {
  let next = 0
  let done = 0
  let failure: unknown
  let interrupted = false
  const interrupt = () => {
    interrupted = true
  }
  process.once('SIGINT', interrupt)
  const startedAt = Date.now()
  const worker = async () => {
    while (next < count && failure === undefined && !interrupted) {
      next++
      try {
        const key = await call('POST', '/v1/keys')
        console.log(JSON.stringify({ keyId: key.keyId, address: key.address }))
        progress(++done, count, startedAt)
      } catch (error) {
        failure ??= error
      }
    }
  }
  try {
    await Promise.all(Array.from({ length: Math.min(concurrency, count) }, worker))
  } finally {
    process.off('SIGINT', interrupt)
  }
  if (done === count) return
  if (done > 0) process.stderr.write('\n')
  throw new Error(`created ${done} of ${count} keys, each printed above; stopped ${failure === undefined ? 'at an interrupt' : `after a failure: ${messageOf(failure)}`}`)
}

async function serve(start: () => Promise<() => Promise<void>>): Promise<void> {
  const stop = await start()
  const shutdown = () =>
    void stop().then(
      () => process.exit(0),
      (error: unknown) => {
        logLine({ level: 'error', event: 'shutdown_failed', error: messageOf(error) })
        process.exit(1)
      },
    )
  process.once('SIGTERM', shutdown)
  process.once('SIGINT', shutdown)
}

const [command, ...args] = process.argv.slice(2)
const option = (name: string) => {
  const index = args.indexOf(`--${name}`)
  if (index < 0) return undefined
  const value = args[index + 1]
  if (value === undefined || value.startsWith('--')) throw new Error(`--${name} needs a value`)
  return value
}

const wholeNumberOption = (name: string, fallback: number) => {
  const raw = option(name)
  if (raw === undefined) return fallback
  const value = wholeNumberIn(raw, 1, 999_999_999)
  if (value === undefined) throw new Error(`--${name} must be a whole number of at least 1, got ${raw}`)
  return value
}

/** `--nitro-root-file R --pcr0 HEX`, or `--allow-unattested`: how `unlock` trusts the enclaves' recipients. */
function recipientTrust(): RecipientTrust {
  const rootFile = option('nitro-root-file')
  const pcr0 = option('pcr0')
  if (args.includes('--allow-unattested')) {
    if (rootFile || pcr0) throw new Error('--allow-unattested takes neither --nitro-root-file nor --pcr0')
    return 'unattested'
  }
  if (!rootFile || !pcr0) {
    throw new Error('--preload-identity-file needs --nitro-root-file (the AWS Nitro root certificate, PEM) and --pcr0 (the enclave image), or, for development enclaves, --allow-unattested')
  }
  if (!/^([0-9a-fA-F]{2}){32,64}$/.test(pcr0)) throw new Error('--pcr0 must be the image measurement in hex')
  return { roots: [new X509Certificate(readFileSync(rootFile))], pcr0: Buffer.from(pcr0, 'hex') }
}

const commands: Record<string, () => Promise<unknown>> = {
  enclave: () => serve(runEnclave),
  parent: () => serve(runParent),
  'create-keys': async () => createKeys(wholeNumberOption('count', 1), wholeNumberOption('concurrency', 64)),
  unlock: async () => {
    const identityFile = option('preload-identity-file')
    if (!identityFile) return console.log(JSON.stringify(await call('POST', '/v1/unlock')))
    const { enclaves } = (await call('GET', '/v1/attestation')) as { enclaves: Array<{ id: string; recipient: string; attestationDocument: string | null }> }
    const sealed = await sealPreloadIdentity({
      identity: readFileSync(identityFile, 'utf8').trim(),
      enclaves: enclaves.map((enclave) => ({ ...enclave, attestationDocument: enclave.attestationDocument === null ? undefined : Buffer.from(enclave.attestationDocument, 'base64') })),
      trust: recipientTrust(),
    })
    const sealedPreloadIdentities = Object.fromEntries([...sealed].map(([id, bytes]) => [id, Buffer.from(bytes).toString('base64')]))
    console.log(JSON.stringify(await call('POST', '/v1/unlock', { sealedPreloadIdentities })))
  },
  'rotate-data-key': async () => console.log(JSON.stringify(await call('POST', '/v1/data-key/rotate'))),
  'preload-identity': async () => console.log(JSON.stringify(await generatePreloadIdentity())),
  'seal-shares': async () => {
    const [input, output, recipient] = ['in', 'out', 'recipient'].map((name) => {
      const value = option(name)
      if (!value) throw new Error('seal-shares needs --in (the share file, JSON), --out and --recipient (age1…)')
      return value
    }) as [string, string, string]
    const entries = parseJsonQuietly(readFileSync(input, 'utf8'), `the share file ${input}`) as ShareFileEntry[]
    writeFileSync(output, await sealShareFile({ entries, recipient }))
    console.error(`sealed ${entries.length} entries`)
  },
  status: async () => console.log(JSON.stringify(await (await fetch(`${setting('ORIGIN_URL', 'http://127.0.0.1:8443')}/healthz`)).json(), null, 2)),
}

const run = command ? commands[command] : undefined
if (!run) {
  console.error(`usage: origin <${Object.keys(commands).join('|')}> (see enclave-origin/cli.ts)`)
  process.exit(2)
}
run().catch((error: unknown) => {
  console.error(error instanceof Error ? error.message : error)
  process.exit(1)
})
