/**
 * Operators' command line for the enclave origin: `origin help` prints every
 * command's usage, `origin <command> --help` one's. An option a command does
 * not take is refused before anything is sent.
 *
 * The client commands reach the parent at ORIGIN_URL (default
 * http://127.0.0.1:8443) and sign with ORIGIN_HMAC_KEY_ID (default
 * `operator`) and ORIGIN_HMAC_SECRET. Over https, ORIGIN_TLS_CA_FILE trusts
 * a private CA, and ORIGIN_TLS_CERT_FILE with ORIGIN_TLS_KEY_FILE present a
 * client certificate (to a parent started with TLS_REQUIRE_CLIENT_CERT=1).
 * ORIGIN_TIMEOUT_MS: how long a command waits for an answer (see answerTimeoutMs).
 */
import { X509Certificate } from 'node:crypto'
import { readFileSync, writeFileSync, writeSync } from 'node:fs'
import { resolve } from 'node:path'
import { request as httpRequest, type IncomingHttpHeaders } from 'node:http'
import { request as httpsRequest } from 'node:https'
import { cannotReadError, integerSetting, logLine, setting, wholeNumberIn } from './config.js'
import { codeOf, jsonObjectOf, messageOf, parseJsonQuietly } from './errors.js'
import { generatePreloadIdentity, sealPreloadIdentity, sealShareFile, type RecipientTrust, type ShareFileEntry } from './preloadFiles.js'
import { runEnclave } from './enclave/main.js'
import { runParent } from './parent/main.js'
import { signRequest } from './protocol/requestSigning.js'

/** How long one command waits in all for an origin that answers 503 with a Retry-After-Ms (overloaded, or unlocking). */
const retryBudgetMs = 30_000

/** ORIGIN_URL without a trailing slash: the path is signed as it is sent. */
const originUrl = () => setting('ORIGIN_URL', 'http://127.0.0.1:8443').replace(/\/+$/, '')

type HttpExchange = { status: number; headers: IncomingHttpHeaders; text: string }

/**
 * How long a command waits for the parent's answer, by default past the longest the parent may take with its own
 * settings at their maximum (the health it reports waits up to REQUEST_TIMEOUT_MS, 60 s; an unlock queued behind
 * another each up to KMS_REQUEST_TIMEOUT_MS, 300 s; a create up to STORE_TIMEOUT_MS, 300 s), so that no answer still
 * coming is given up on. ORIGIN_TIMEOUT_MS sets it for every command but a rotation (a health probe may want 10 s),
 * which waits as long as it takes; a bad value is refused all the same.
 */
function answerTimeoutMs(command: 'status' | 'rotation' | 'other'): number | undefined {
  const set = process.env.ORIGIN_TIMEOUT_MS ? integerSetting('ORIGIN_TIMEOUT_MS', { min: 100, max: 3_600_000 }) : undefined
  if (command === 'rotation') return undefined
  return set ?? (command === 'status' ? 70_000 : 660_000)
}

/** ORIGIN_HMAC_KEY_ID, as the parent takes key ids: a header could not carry another (and Node would throw sending it). */
function hmacKeyId(): string {
  const keyId = setting('ORIGIN_HMAC_KEY_ID', 'operator')
  if (!/^[\x21-\x7e]+$/.test(keyId)) throw new Error('ORIGIN_HMAC_KEY_ID must be visible ASCII characters, as the parent takes key ids')
  return keyId
}

/** The client settings, checked before a command sends anything: a bulk create's workers would each fail on one. */
function checkClientSettings(command: 'status' | 'rotation' | 'other'): void {
  connectionToParent()
  answerTimeoutMs(command)
  hmacKeyId()
  setting('ORIGIN_HMAC_SECRET')
}

const tlsSettings = ['ORIGIN_TLS_CA_FILE', 'ORIGIN_TLS_CERT_FILE', 'ORIGIN_TLS_KEY_FILE']

type ParentConnection = { base: string; https: boolean; tls: { ca?: Buffer; cert?: Buffer; key?: Buffer } }
let parentConnection: ParentConnection | undefined

/** ORIGIN_URL and the TLS settings, checked and their files read once: a bulk create makes thousands of requests. */
function connectionToParent(): ParentConnection {
  if (parentConnection) return parentConnection
  const base = originUrl()
  const { protocol } = urlOf(base)
  const https = protocol === 'https:'
  if (!https && protocol !== 'http:') throw new Error(`ORIGIN_URL must be an http:// or https:// URL, got ${base}`)
  if (!https && tlsSettings.some((name) => process.env[name])) throw new Error(`${tlsSettings.join(', ')} are for an https:// ORIGIN_URL, and ${base} is not one`)
  const file = (name: string) => (process.env[name] ? readNamedFile(name, process.env[name]) : undefined)
  const [cert, key] = [file('ORIGIN_TLS_CERT_FILE'), file('ORIGIN_TLS_KEY_FILE')]
  if (Boolean(cert) !== Boolean(key)) throw new Error('ORIGIN_TLS_CERT_FILE and ORIGIN_TLS_KEY_FILE go together: a client certificate and its key')
  return (parentConnection = { base, https, tls: https ? { ca: file('ORIGIN_TLS_CA_FILE'), cert, key } : {} })
}

function urlOf(base: string): URL {
  try {
    return new URL(base)
  } catch {
    throw new Error(`ORIGIN_URL must be an http:// or https:// URL, got ${base}`)
  }
}

/** The parent was not reached (no connection, no TLS session): nothing of the request was sent. */
class ParentUnreachableError extends Error {}

/**
 * One HTTP exchange with the parent, failing once `timeoutMs` passes without an answer (fetch would give up on a
 * long rotation after 300 s while the parent went on). The TLS settings apply over https.
 */
function exchange(options: { method: 'GET' | 'POST'; path: string; headers?: Record<string, string>; body?: Uint8Array; timeoutMs: number | undefined }): Promise<HttpExchange> {
  const { method, path, headers = {}, body, timeoutMs } = options
  const { base, https, tls } = connectionToParent()
  const url = new URL(`${base}${path}`)
  return new Promise((resolve, reject) => {
    const sent = (https ? httpsRequest : httpRequest)(url, { method, headers: { ...headers, 'content-length': String(body?.length ?? 0) }, ...tls }, (response) => {
      const chunks: Buffer[] = []
      response.on('data', (chunk: Buffer) => chunks.push(chunk))
      response.on('error', reject)
      response.on('end', () => resolve({ status: response.statusCode ?? 0, headers: response.headers, text: Buffer.concat(chunks).toString('utf8') }))
    })
    // Connected once a kept-alive socket is handed over open, or once a new one connects (over https: its TLS session is up).
    let connected = false
    let reused = false
    // The answer's timeout below starts only once the connection is up: connecting, and a TLS handshake, get their own.
    let connecting: ReturnType<typeof setTimeout> | undefined
    sent.on('socket', (socket) => {
      if (!socket.connecting) connected = reused = true
      else {
        if (timeoutMs !== undefined) {
          connecting = setTimeout(() => {
            reject(new ParentUnreachableError(`cannot reach the parent at ${base}: no ${https ? 'TLS session' : 'connection'} within ${timeoutMs / 1_000} s`))
            sent.destroy()
          }, timeoutMs)
        }
        socket.once(https ? 'secureConnect' : 'connect', () => {
          connected = true
          clearTimeout(connecting)
        })
      }
    })
    sent.on('close', () => clearTimeout(connecting))
    sent.on('error', (error: NodeJS.ErrnoException) => {
      const reason = codeOf(error)
      // On a new connection, a TLS alert (a client certificate refused: TLS 1.3 sends it after the client's side of the
      // handshake is done) ends the session before the parent reads a request.
      const reached = connected && (reused || !/^ERR_(SSL|TLS)_/.test(error.code ?? ''))
      reject(reached ? new Error(`the connection to the parent at ${base} failed: ${reason}`) : new ParentUnreachableError(`cannot reach the parent at ${base}: ${reason}`))
    })
    if (timeoutMs !== undefined) {
      sent.setTimeout(timeoutMs, () => {
        reject(new Error(`the parent at ${base} sent nothing for ${timeoutMs / 1_000} s: ${method} ${path} given up`))
        sent.destroy()
      })
    }
    sent.end(body)
  })
}

/**
 * One signed request to the parent. A 503 with a `Retry-After-Ms` (the parent shed it for load, or the key waits
 * for an unlock: either way nothing was done) is asked again after that wait, within `retryBudgetMs`.
 */
async function call(method: 'GET' | 'POST', path: string, json?: unknown, waiting: 'rotation' | 'other' = 'other'): Promise<Record<string, unknown>> {
  const timeoutMs = answerTimeoutMs(waiting)
  const body = new TextEncoder().encode(json === undefined ? '' : JSON.stringify(json))
  const giveUpAt = Date.now() + retryBudgetMs
  let response: HttpExchange
  for (;;) {
    // Signed again each time: the parent refuses a nonce it has seen.
    const headers = await signRequest({ keyId: hmacKeyId(), secret: setting('ORIGIN_HMAC_SECRET'), method, path, body })
    response = await exchange({ method, path, headers, body: method === 'POST' ? body : undefined, timeoutMs })
    const retryAfterMs = Number(response.headers['retry-after-ms'] ?? NaN)
    if (response.status !== 503 || !(retryAfterMs >= 0) || Date.now() + retryAfterMs > giveUpAt) break
    // At least 10 ms: a 0 must not turn the wait into a busy loop against the parent.
    await new Promise((resolve) => setTimeout(resolve, Math.max(retryAfterMs, 10)))
  }
  // Anything but a JSON object (a proxy's error page, say): the status says more.
  const answer = jsonObjectOf(response.text)
  if (response.status < 200 || response.status > 299 || answer === undefined) {
    throw new ParentAnswerError(`${method} ${path}: ${response.status} ${answer === undefined ? '(not a JSON object)' : JSON.stringify(answer)}${hintFor(response.status)}`, response.status, answer)
  }
  return answer
}

/** What an operator checks first for a status (the parent says why only in its log: a caller learns nothing from a 401). */
function hintFor(status: number): string {
  if (status !== 401) return ''
  return ` (check ORIGIN_HMAC_KEY_ID and ORIGIN_HMAC_SECRET against the parent's ORIGIN_HMAC_KEYS, and this host's clock: the parent's log says which failed)`
}

/**
 * A bulk create's progress on stderr. On a terminal, a bar redrawn in place (and cleared before a key's line takes
 * its place on the screen); elsewhere (a CI log, a file) a plain line at each tenth done and at most every 5 s between,
 * so that stderr neither grows a line of redraws nor, merged with stdout, splits the keys' JSON lines.
 */
class Progress {
  private readonly startedAt = Date.now()
  private readonly terminal = Boolean(process.stderr.isTTY)
  private lastLineAt = this.startedAt
  private lastTenth = 0

  constructor(private readonly total: number) {}

  /** Before a key's line goes to stdout. */
  clear(): void {
    if (this.terminal) process.stderr.write('\r\x1b[K')
  }

  show(done: number): void {
    const now = Date.now()
    const rate = (done / Math.max((now - this.startedAt) / 1_000, 0.001)).toFixed(0)
    if (this.terminal) {
      const width = 30
      const filled = Math.round((done / this.total) * width)
      process.stderr.write(`\r[${'#'.repeat(filled)}${'.'.repeat(width - filled)}] ${done}/${this.total} keys, ${rate}/s${done === this.total ? '\n' : ''}`)
      return
    }
    const tenth = Math.floor((done * 10) / this.total)
    if (tenth === this.lastTenth && now - this.lastLineAt < 5_000 && done !== this.total) return
    this.lastTenth = tenth
    this.lastLineAt = now
    process.stderr.write(`created ${done}/${this.total} keys, ${rate}/s\n`)
  }

  /** After a run that stopped short: the bar's line ends. */
  end(): void {
    if (this.terminal) process.stderr.write('\n')
  }
}

/** Writes all of `text` to `fd` now, short writes included; a pipe that is full (EAGAIN) is tried again for up to 2 s. */
function writeAllSync(fd: number, text: string): void {
  const bytes = Buffer.from(text)
  const giveUpAt = Date.now() + 2_000
  for (let at = 0; at < bytes.length; ) {
    try {
      at += writeSync(fd, bytes, at)
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== 'EAGAIN' || Date.now() > giveUpAt) throw error
      Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 5)
    }
  }
}

/** An answer that was not the JSON success asked for: its status, and its JSON object if it was one. */
class ParentAnswerError extends Error {
  constructor(
    message: string,
    readonly status: number,
    readonly answer: Record<string, unknown> | undefined,
  ) {
    super(message)
  }
}

/**
 * Whether a create that failed with `error` certainly made no key: the parent was not reached, or it refused the
 * create (a request it could not take or authenticate, a create shed for load or waiting for an unlock, one refused
 * while the store is behind). Anything else may have made one: a timeout, a cut connection, a proxy's page, an
 * origin that failed mid-create, an answer that names no key.
 */
function madeNoKey(error: unknown): boolean {
  if (error instanceof ParentUnreachableError) return true
  if (!(error instanceof ParentAnswerError) || error.answer === undefined) return false
  if ([400, 401, 403, 404, 405, 409, 413].includes(error.status)) return true
  const reason = String(error.answer.error ?? '')
  return error.status === 503 && (reason === 'overloaded' || reason === 'needs_unlock' || reason.startsWith('no key is created while'))
}

/**
 * Creates `count` keys, `concurrency` at a time, printing each as it is made.
 * After a failure, or Ctrl-C, it starts no more but lets those under way
 * finish and prints them too: no route lists keys, so an id not printed
 * would be lost. A key line stdout would not take (a reader that went away)
 * stops it as a failure does, and goes to stderr instead. Then it fails,
 * saying how many it made, and whether a failed create may have made one.
 */
async function createKeys(count: number, concurrency: number): Promise<void> {
  checkClientSettings('other')
  let next = 0
  let done = 0
  let underWay = 0
  let failure: unknown
  /** What each failed create that may have made a key all the same (see `madeNoKey`) was told: a store too slow to confirm names the key. */
  const mayHaveMade: string[] = []
  let interrupted = false
  /** Key lines stdout would not take, and those handed to it whose write has not called back yet. */
  const unprinted: string[] = []
  const writing = new Set<string>()
  const interrupt = () => {
    if (!interrupted) {
      interrupted = true
      process.stderr.write(`\nstopping: waiting for the ${underWay} creates under way, whose keys are printed too (Ctrl-C again to quit without them)\n`)
      return
    }
    // Written at once, as the process ends here: keys it holds that may not have reached stdout go with it.
    const unsure = [...writing, ...unprinted]
    try {
      writeAllSync(2, `\nquit with ${underWay} creates under way: keys they make will not be printed, and no route lists keys\n${unsure.length > 0 ? `these keys were made, but may not have reached stdout:\n${unsure.join('\n')}\n` : ''}`)
    } finally {
      process.exit(130)
    }
  }
  process.on('SIGINT', interrupt)
  // Its failures come to each write's callback; without a listener, the stream's 'error' would end the process.
  const ignoreStdoutError = () => {}
  process.stdout.on('error', ignoreStdoutError)
  const print = (line: string) =>
    new Promise<void>((resolve) => {
      if (unprinted.length > 0) return resolve(void unprinted.push(line))
      writing.add(line)
      process.stdout.write(`${line}\n`, (error) => {
        writing.delete(line)
        if (error) {
          unprinted.push(line)
          failure ??= new Error(`stdout would not take a key's line (${codeOf(error)})`)
        }
        resolve()
      })
    })
  const progress = new Progress(count)
  const worker = async () => {
    while (next < count && failure === undefined && !interrupted) {
      next++
      underWay++
      try {
        const key = await call('POST', '/v1/keys')
        if (typeof key.keyId !== 'string' || typeof key.address !== 'string') throw new Error(`the parent answered a create with no key: ${JSON.stringify(key)}`)
        progress.clear()
        await print(JSON.stringify({ keyId: key.keyId, address: key.address }))
        progress.show(++done)
      } catch (error) {
        failure ??= error
        if (!madeNoKey(error)) mayHaveMade.push(messageOf(error))
      } finally {
        underWay--
      }
    }
  }
  try {
    await Promise.all(Array.from({ length: Math.min(concurrency, count) }, worker))
  } finally {
    process.off('SIGINT', interrupt)
    process.stdout.off('error', ignoreStdoutError)
  }
  if (done === count && failure === undefined) return
  if (done > 0) progress.end()
  if (unprinted.length > 0) process.stderr.write(`these keys were made, but stdout would not take them:\n${unprinted.join('\n')}\n`)
  const printed = done === 0 ? '' : unprinted.length > 0 ? `, each printed above (${unprinted.length} on stderr)` : ', each printed above'
  // Every such answer, not only the first: a parent whose store was slow names each key it may yet make, and no
  // route lists keys, so an id not shown here would be lost.
  if (mayHaveMade.length > 1) process.stderr.write(`the failed creates that may still have made keys, as each was answered:\n${mayHaveMade.join('\n')}\n`)
  const unsure =
    mayHaveMade.length === 0
      ? ''
      : mayHaveMade.length === 1
        ? '. A failed create may still have made a key, whose id was not printed'
        : `. ${mayHaveMade.length} failed creates may still have made keys, whose ids were not printed (their answers are listed above)`
  throw new Error(`created ${done} of ${count} keys${printed}; stopped ${failure === undefined ? 'at an interrupt' : `after a failure: ${messageOf(failure)}`}${unsure}`)
}

async function serve(start: () => Promise<() => Promise<void>>): Promise<void> {
  // Node's own warnings (a library's, say the AWS SDK's about Node versions) as log lines too: its default writes
  // several plain lines to stderr, which a log pipeline that reads JSON lines would choke on.
  process.removeAllListeners('warning')
  process.on('warning', (warning) => logLine({ level: 'warn', event: 'node_warning', warning: warning.name, message: warning.message }))
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

/** What a command was given: `--name value` (or `--name=value`) options and `--name` switches. */
type Given = { value: (name: string) => string | undefined; has: (name: string) => boolean }

type Command = {
  usage: string
  /** Options that take a value. */
  takes?: string[]
  /** Options that take none. */
  switches?: string[]
  run: (given: Given) => Promise<unknown>
}

/** `args` as `command` takes them; anything else (an unknown or repeated option, a stray word) is refused. */
function parseArguments(name: string, command: Command, args: string[]): Given {
  const values = new Map<string, string>()
  const switches = new Set<string>()
  const takes = command.takes ?? []
  const allowed = [...takes.map((option) => `--${option}`), ...(command.switches ?? []).map((option) => `--${option}`)]
  for (let index = 0; index < args.length; index++) {
    const arg = args[index]!
    const [, option, inline] = /^--([^=]+)(?:=(.*))?$/s.exec(arg) ?? []
    if (option === undefined) throw new Error(`${name}: unexpected argument ${JSON.stringify(arg)}; usage: ${command.usage}`)
    if (values.has(option) || switches.has(option)) throw new Error(`${name}: --${option} is given twice`)
    if (command.switches?.includes(option)) {
      if (inline !== undefined) throw new Error(`${name}: --${option} takes no value`)
      switches.add(option)
    } else if (takes.includes(option)) {
      const value = inline ?? args[++index]
      if (value === undefined || value === '' || (inline === undefined && value.startsWith('--'))) throw new Error(`--${option} needs a value`)
      values.set(option, value)
    } else {
      throw new Error(`${name}: unknown option --${option} (${allowed.length > 0 ? `it takes ${allowed.join(', ')}` : 'it takes none'})`)
    }
  }
  return { value: (option) => values.get(option), has: (option) => switches.has(option) }
}

function wholeNumberOption(given: Given, name: string, fallback?: number, max = 999_999_999): number {
  const raw = given.value(name)
  if (raw === undefined) {
    if (fallback === undefined) throw new Error(`--${name} is required`)
    return fallback
  }
  const value = wholeNumberIn(raw, 1, max)
  if (value === undefined) throw new Error(`--${name} must be a whole number from 1 to ${max}, got ${raw}`)
  return value
}

/**
 * A file option's path, a relative one taken from the directory the command was run from: `npm run origin …` runs
 * it in the project's root, and npm names the directory it was run from in INIT_CWD. Only under that script: an
 * INIT_CWD inherited from another npm script names some other directory. (Settings, environment variables exported
 * in a shell or given by a unit file, are paths as the process sees them.)
 */
function pathOption(given: Given, name: string): string | undefined {
  const value = given.value(name)
  if (value === undefined) return undefined
  const base = process.env.npm_lifecycle_event === 'origin' ? process.env.INIT_CWD : undefined
  return resolve(base ?? process.cwd(), value)
}

/** A file an operator named (`what`: the option or setting), read; a failure says which, the path in full, and why. */
function readNamedFile(what: string, path: string): Buffer {
  try {
    return readFileSync(path)
  } catch (error) {
    throw cannotReadError(what, path, error)
  }
}

/** Writes a new file an option names; an existing one is refused, not overwritten (`mode` 0o600 for secrets). */
function writeNewOptionFile(name: string, path: string, data: string | Uint8Array, mode = 0o644): void {
  try {
    writeFileSync(path, data, { mode, flag: 'wx' })
  } catch (error) {
    const code = codeOf(error)
    throw new Error(code === 'EEXIST' ? `--${name}: ${path} exists; it is not overwritten: name a new file` : `--${name}: cannot write ${path}: ${code}`)
  }
}

/** `--nitro-root-file R --pcr0 HEX`, or `--allow-unattested`: how `unlock` trusts the enclaves' recipients. */
function recipientTrust(given: Given): RecipientTrust {
  const rootFile = pathOption(given, 'nitro-root-file')
  const pcr0 = given.value('pcr0')
  if (given.has('allow-unattested')) {
    if (rootFile || pcr0) throw new Error('--allow-unattested takes neither --nitro-root-file nor --pcr0')
    return 'unattested'
  }
  if (!rootFile || !pcr0) {
    throw new Error('--preload-identity-file needs --nitro-root-file (the AWS Nitro root certificate, PEM) and --pcr0 (the enclave image), or, for development enclaves, --allow-unattested')
  }
  if (!/^([0-9a-fA-F]{2}){32,64}$/.test(pcr0)) throw new Error('--pcr0 must be the image measurement in hex')
  const certificate = readNamedFile('--nitro-root-file', rootFile)
  let root: X509Certificate
  try {
    root = new X509Certificate(certificate)
  } catch {
    throw new Error(`--nitro-root-file: ${rootFile} is not a certificate (PEM or DER)`)
  }
  return { roots: [root], pcr0: Buffer.from(pcr0, 'hex') }
}

/** `/v1/keys/{--key}`, the id percent-encoded as the path takes it. */
function keyPath(given: Given): string {
  const keyId = given.value('key')
  if (keyId === undefined) throw new Error('--key is required (a key id, as create-keys printed it)')
  return `/v1/keys/${encodeURIComponent(keyId)}`
}

const ageIdentity = /^AGE-SECRET-KEY-(?:PQ-)?1[0-9A-Z]+$/

/**
 * The age identity in `file`: the identity alone (as `preload-identity --out` writes it), an age-keygen identity
 * file (its `#` comments and blank lines skipped), or the JSON `preload-identity` prints. Checked here, before
 * anything is sent: the enclave would refuse it only after a round trip.
 */
function readIdentityFile(file: string): string {
  const text = readNamedFile('--preload-identity-file', file).toString('utf8').trim()
  const printed = text.startsWith('{') ? jsonObjectOf(text)?.identity : undefined
  const lines = typeof printed === 'string' ? [printed] : text.split('\n').map((line) => line.trim()).filter((line) => line !== '' && !line.startsWith('#'))
  if (lines.length !== 1 || !ageIdentity.test(lines[0]!)) {
    throw new Error(`--preload-identity-file: ${file} holds no age identity (one AGE-SECRET-KEY-1… line): give the file \`origin preload-identity --out\` wrote, the identity the share file was sealed to`)
  }
  return lines[0]!
}

const commands: Record<string, Command> = {
  enclave: { usage: 'origin enclave   (start the enclave process; its settings, from the environment: the README, "Enclave origin")', run: () => serve(runEnclave) },
  parent: { usage: 'origin parent   (start the parent process; its settings, from the environment: the README, "Enclave origin")', run: () => serve(runParent) },
  'create-keys': {
    usage: 'origin create-keys --count N [--concurrency C]   (create N keys, C at a time (16, at most 256), with a progress bar; one JSON line {keyId, address} per key)',
    takes: ['count', 'concurrency'],
    // 16 by default: a quarter of the operators' listener (OPERATOR_MAX_CONNECTIONS, 64), which a freeze must still get into.
    run: (given) => createKeys(wholeNumberOption(given, 'count'), wholeNumberOption(given, 'concurrency', 16, 256)),
  },
  unlock: {
    usage:
      'origin unlock [--preload-identity-file F (--nitro-root-file R --pcr0 HEX | --allow-unattested)]   (have every enclave unwrap the data key again; in preload mode, load its share file with the age identity in F, sealed to each enclave once its attestation document checks out against the Nitro root certificate R and the image PCR0; --allow-unattested for development enclaves)',
    takes: ['preload-identity-file', 'nitro-root-file', 'pcr0'],
    switches: ['allow-unattested'],
    run: async (given) => {
      const identityFile = pathOption(given, 'preload-identity-file')
      if (!identityFile) {
        if (given.value('nitro-root-file') || given.value('pcr0') || given.has('allow-unattested')) {
          throw new Error('--nitro-root-file, --pcr0 and --allow-unattested go with --preload-identity-file')
        }
        const unlocked = await call('POST', '/v1/unlock')
        console.log(JSON.stringify(unlocked))
        const notServed = unlocked.preloadNotServed as Array<{ enclave: string; reason: string }> | undefined
        if (Array.isArray(notServed) && notServed.length > 0) {
          const which = notServed.map(({ enclave, reason }) => `${enclave} (${reason})`).join('; ')
          throw new Error(`the data key is unwrapped, but these enclaves serve no preloaded account: ${which}. Deliver the identity the share file was sealed to: origin unlock --preload-identity-file F …`)
        }
        return
      }
      // Both checked before anything is sent.
      const identity = readIdentityFile(identityFile)
      const trust = recipientTrust(given)
      const { enclaves } = (await call('GET', '/v1/attestation')) as { enclaves?: Array<{ id: string; recipient: string; attestationDocument: string | null }> }
      if (!Array.isArray(enclaves)) throw new Error('the parent\u2019s /v1/attestation answer lists no enclaves: is ORIGIN_URL a parent of this version?')
      const sealed = await sealPreloadIdentity({
        identity,
        enclaves: enclaves.map((enclave) => ({ ...enclave, attestationDocument: enclave.attestationDocument === null ? undefined : Buffer.from(enclave.attestationDocument, 'base64') })),
        trust,
      })
      const sealedPreloadIdentities = Object.fromEntries([...sealed].map(([id, bytes]) => [id, Buffer.from(bytes).toString('base64')]))
      console.log(JSON.stringify(await call('POST', '/v1/unlock', { sealedPreloadIdentities })))
    },
  },
  'get-key': {
    usage: 'origin get-key --key ID   (the key\u2019s address, public key and state: active, frozen or archived)',
    takes: ['key'],
    run: async (given) => console.log(JSON.stringify(await call('GET', keyPath(given)))),
  },
  sign: {
    usage: 'origin sign --key ID --digest 0x…   (sign a 32-byte digest: {signature (r ‖ s, 64 bytes), recoveryId}; for checking a key, as the Worker signs through the API)',
    takes: ['key', 'digest'],
    run: async (given) => {
      const path = `${keyPath(given)}/sign`
      const digest = given.value('digest')
      if (digest === undefined) throw new Error('--digest is required')
      if (!/^0x[0-9a-fA-F]{64}$/.test(digest)) throw new Error(`--digest must be 0x and 32 bytes in hex, got ${digest.length > 80 ? `${digest.slice(0, 80)}…` : digest}`)
      console.log(JSON.stringify(await call('POST', path, { digest })))
    },
  },
  ...Object.fromEntries(
    (
      [
        ['freeze', 'a frozen key signs nothing until it is unfrozen'],
        ['unfreeze', 'the key signs again'],
        ['archive', 'for good: an archived key never signs again, and its state cannot change'],
      ] as const
    ).map(([action, effect]): [string, Command] => [
      action,
      { usage: `origin ${action} --key ID   (${effect})`, takes: ['key'], run: async (given) => console.log(JSON.stringify(await call('POST', `${keyPath(given)}/${action}`))) },
    ]),
  ),
  'rotate-data-key': {
    usage: 'origin rotate-data-key   (re-seal every key under a new data key from KMS, then forget the old one; run it again to finish one that was interrupted)',
    run: async () => {
      checkClientSettings('rotation')
      console.log(JSON.stringify(await call('POST', '/v1/data-key/rotate', undefined, 'rotation')))
    },
  },
  'preload-identity': {
    usage: 'origin preload-identity (--out F | --print)   (a new age identity for a share file: with --out, written to F (owner-only; an existing F is refused) and {recipient} printed; with --print, {identity, recipient} printed)',
    takes: ['out'],
    switches: ['print'],
    run: async (given) => {
      const out = pathOption(given, 'out')
      // The identity opens every share sealed to it: printed only when asked, not into a terminal's scrollback or a CI log by default.
      if ((out === undefined) === !given.has('print')) throw new Error('preload-identity needs --out F (the identity written to F, owner-only) or --print (the identity printed), one of them')
      const { identity, recipient } = await generatePreloadIdentity()
      if (out === undefined) return console.log(JSON.stringify({ identity, recipient }))
      writeNewOptionFile('out', out, `${identity}\n`, 0o600)
      console.log(JSON.stringify({ recipient }))
    },
  },
  'seal-shares': {
    usage: 'origin seal-shares --in F --recipient R --out G   (age-encrypt a [{account_id, share}] JSON file for preload mode)',
    takes: ['in', 'out', 'recipient'],
    run: async (given) => {
      const [input, output, recipient] = ['in', 'out', 'recipient'].map((name) => {
        const value = name === 'recipient' ? given.value(name) : pathOption(given, name)
        if (!value) throw new Error('seal-shares needs --in (the share file, JSON), --out and --recipient (age1…)')
        return value
      }) as [string, string, string]
      const entries = parseJsonQuietly(readNamedFile('--in', input).toString('utf8'), `the share file ${input}`) as ShareFileEntry[]
      writeNewOptionFile('out', output, await sealShareFile({ entries, recipient }))
      console.error(`sealed ${entries.length} entries`)
    },
  },
  status: {
    usage: "origin status   (the parent's /healthz, signed when ORIGIN_HMAC_SECRET is set; exits 1 unless its status is ok)",
    run: async () => {
      // Signed when the HMAC secret is set: only then does the parent say what is wrong with each part. Without it, a
      // monitor that holds no secret still gets the verdict.
      const headers = process.env.ORIGIN_HMAC_SECRET
        ? await signRequest({ keyId: hmacKeyId(), secret: setting('ORIGIN_HMAC_SECRET'), method: 'GET', path: '/healthz', body: new Uint8Array() })
        : {}
      const { status, text } = await exchange({ method: 'GET', path: '/healthz', headers, timeoutMs: answerTimeoutMs('status') })
      const health = jsonObjectOf(text)
      if (health === undefined) throw new Error(`GET /healthz: ${status} (not JSON)`)
      // A signature the parent refused is no verdict on the origin's health.
      if (status === 401) throw new Error(`GET /healthz: 401 ${JSON.stringify(health)}${hintFor(status)}`)
      console.log(JSON.stringify(health, null, 2))
      if (health.status !== 'ok') process.exitCode = 1
    },
  },
}

const clientSettings =
  'The commands but enclave, parent, preload-identity and seal-shares call the parent at ORIGIN_URL (http://127.0.0.1:8443), signed with ORIGIN_HMAC_KEY_ID (operator) and ORIGIN_HMAC_SECRET; over https, ORIGIN_TLS_CA_FILE, ORIGIN_TLS_CERT_FILE and ORIGIN_TLS_KEY_FILE. ORIGIN_TIMEOUT_MS: how long one waits for an answer.'
const usage = () => `usage:\n${Object.values(commands).map((command) => `  ${command.usage}`).join('\n')}\n${clientSettings}`
const [name, ...args] = process.argv.slice(2)
if (name === 'help' || name === '--help' || name === '-h') {
  console.log(usage())
  process.exit(0)
}
const command = name === undefined ? undefined : commands[name]
if (!command) {
  console.error(`${name === undefined ? 'origin: no command given' : `origin: unknown command ${JSON.stringify(name)}`}\n${usage()}`)
  process.exit(2)
}
if (args.includes('--help') || args.includes('-h')) {
  console.log(`usage: ${command.usage}`)
  process.exit(0)
}
Promise.resolve()
  .then(() => command.run(parseArguments(name!, command, args)))
  .catch((error: unknown) => {
    console.error(error instanceof Error ? error.message : error)
    process.exit(1)
  })
