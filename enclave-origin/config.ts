import { createPrivateKey, X509Certificate } from 'node:crypto'
import { resolve } from 'node:path'
import { codeOf, messageOf } from './errors.js'
import { minimumHmacSecretBytes } from './protocol/requestSigning.js'
import { parseVsockAddress } from './protocol/vsock.js'

/** Settings for the origin's processes, from the environment (12-factor), with the reason when one is wrong. */

export function setting(name: string, fallback?: string): string {
  const value = process.env[name] ?? fallback
  if (value === undefined || value === '') throw new Error(`${name} is not set`)
  return value
}

/**
 * A setting that may be left unset. Set but empty is refused, as for a choice: an image built with `ENV X=$ARG` and
 * no build argument would otherwise start without it (plain HTTP for want of a certificate, say) without a word.
 */
export function optionalSetting(name: string): string | undefined {
  const value = process.env[name]
  if (value === '') throw new Error(`${name} is set but empty: set it, or unset it`)
  return value
}

/** One of `choices`, or the fallback when unset; anything else is an error naming the setting and its choices. */
export function choiceSetting<const T extends string>(name: string, { choices, fallback }: { choices: readonly T[]; fallback: T }): T {
  // Set but empty is no choice: an image built with `ENV ORIGIN_PROFILE=$PROFILE` and no build argument would otherwise
  // start on the fallback (a development enclave) without a word.
  const value = process.env[name] ?? fallback
  if (value === '') throw new Error(`${name} is set but empty: set it to one of ${choices.join(', ')}, or unset it for ${fallback}`)
  if (!(choices as readonly string[]).includes(value)) throw new Error(`${name} must be one of ${choices.join(', ')}, got ${value}`)
  return value as T
}

/** A whole number in [min, max], or the fallback when unset; anything else is an error naming the setting. */
export function integerSetting(name: string, options: { min: number; max: number; fallback?: number }): number {
  const raw = process.env[name] || options.fallback
  if (raw === undefined) throw new Error(`${name} is not set`)
  const value = wholeNumberIn(String(raw), options.min, options.max)
  if (value === undefined) throw new Error(`${name} must be a whole number from ${options.min} to ${options.max}, got ${raw}`)
  return value
}

/** `text` as a whole number from min to max, else undefined. Digits only: Number() would also take "0x10", "1e2" and " 8 ". */
export function wholeNumberIn(text: string, min: number, max: number): number | undefined {
  const value = /^\d{1,15}$/.test(text) ? Number(text) : NaN
  return value >= min && value <= max ? value : undefined
}

export type StreamAddress = { host: string; port: number } | { path: string } | { vsock: { cid: number; port: number } }

/** "vsock:CID:PORT" (in an enclave), "host:port", or a Unix socket path (one with a `/`, so a host without its port is refused). */
export function listenAddress(value: string): StreamAddress {
  const vsock = parseVsockAddress(value)
  if (vsock) return { vsock }
  // Else it would be read as the TCP host "vsock:…", and fail later, far from the setting.
  if (value.startsWith('vsock:')) throw new Error(`${value}: a vsock address is vsock:CID:PORT, each a number from 0 to 4294967295`)
  // An IPv6 host goes in brackets, which the address itself does not keep; a bare one would split at its last colon.
  const match = /^\[([^\]]+)\]:(\d+)$/.exec(value) ?? /^([^:[\]]+):(\d+)$/.exec(value)
  if (match) {
    const port = wholeNumberIn(match[2]!, 1, 65_535)
    if (port === undefined) throw new Error(`${value}: the port must be from 1 to 65535`)
    return { host: match[1]!, port }
  }
  if (!value.includes('/')) {
    throw new Error(value.includes(':') ? `${value}: an IPv6 address goes in brackets, with its port: [::1]:7000` : `${value} is neither host:port nor a Unix socket path (one with a /)`)
  }
  return { path: value }
}

/** The address a setting gives (see `listenAddress`); one that is not an address is refused with the setting's name. */
export function addressSetting(name: string, value: string): StreamAddress {
  try {
    return listenAddress(value)
  } catch (error) {
    throw new Error(`${name}: ${messageOf(error)}`)
  }
}

/** ENCLAVES: `id=address` entries, comma-separated; ids must be distinct (they name metrics series and ring points). */
export function enclavesSetting(): Array<{ id: string; address: StreamAddress }> {
  const seen = new Set<string>()
  return setting('ENCLAVES', 'enclave-1=127.0.0.1:7000')
    .split(',')
    .map((entry) => {
      const [id, address, ...rest] = entry.trim().split('=')
      if (!id || !address || rest.length > 0) throw new Error(`ENCLAVES entry "${entry}" is not id=address`)
      if (seen.has(id)) throw new Error(`ENCLAVES names enclave ${id} twice`)
      seen.add(id)
      return { id, address: addressSetting(`ENCLAVES entry ${id}`, address) }
    })
}

/** Field names whose values are never logged, at any depth. */
const secretFieldName = /secret|token|password|passphrase|private_?key|dek|share|identity|credential|key$/i
/** Values that are secret whatever their field is called: age identities and PEM private keys. */
const secretValue = /AGE-SECRET-KEY-|-----BEGIN [A-Z ]*PRIVATE KEY-----/

/** A copy of `value` with secret-looking fields and values replaced by "[redacted]". */
export function redactSecrets(value: unknown, depth = 0): unknown {
  if (typeof value === 'string') return secretValue.test(value) ? '[redacted]' : value
  if (typeof value !== 'object' || value === null) return value
  // Deeper than any log line goes: not worth walking, and not safe to print unread.
  if (depth > 8) return '[truncated]'
  if (Array.isArray(value)) return value.map((item) => redactSecrets(item, depth + 1))
  if (value instanceof Uint8Array) return `[${value.length} bytes]`
  return Object.fromEntries(Object.entries(value).map(([key, field]) => [key, secretFieldName.test(key) ? '[redacted]' : redactSecrets(field, depth + 1)]))
}

/** One JSON line per event. Callers pass nothing secret; whatever looks secret is redacted anyway. */
export function logLine(fields: Record<string, unknown>): void {
  console.log(formatLogLine(fields))
}

/** The line `logLine` writes: the time first, then the fields, redacted. */
export function formatLogLine(fields: Record<string, unknown>): string {
  return JSON.stringify({ time: new Date().toISOString(), ...(redactSecrets(fields) as Record<string, unknown>) })
}

/**
 * ORIGIN_HMAC_KEYS, "keyId:secret,…": the clients the parent's API knows.
 * Errors name the entry by its position alone: a secret holding "," and ":"
 * would split into entries whose "key ids" are pieces of it.
 */
export function hmacKeysSetting(): Record<string, string> {
  const secrets: Record<string, string> = {}
  setting('ORIGIN_HMAC_KEYS')
    .split(',')
    .forEach((entry, index) => {
      const separator = entry.indexOf(':')
      const keyId = separator === -1 ? '' : entry.slice(0, separator).trim()
      if (!keyId) throw new Error(`ORIGIN_HMAC_KEYS entry ${index + 1} is not keyId:secret`)
      // It travels in a header, signed as sent: white space inside, or bytes beyond ASCII, would not arrive as signed.
      if (!/^[\x21-\x7e]+$/.test(keyId)) throw new Error(`ORIGIN_HMAC_KEYS entry ${index + 1}: a key id is visible ASCII characters only`)
      if (Object.hasOwn(secrets, keyId)) throw new Error(`ORIGIN_HMAC_KEYS entry ${index + 1} names a key id an earlier entry names`)
      const secret = entry.slice(separator + 1)
      // Not trimmed: a stray space or newline is part of what the parent would check signatures with.
      if (secret.trim() !== secret) throw new Error(`ORIGIN_HMAC_KEYS entry ${index + 1}: its secret begins or ends with white space, which every client would have to sign with too`)
      if (Buffer.byteLength(secret) < minimumHmacSecretBytes) throw new Error(`ORIGIN_HMAC_KEYS entry ${index + 1}: its secret is shorter than ${minimumHmacSecretBytes} bytes (32 random bytes are best; a secret cannot hold ",")`)
      secrets[keyId] = secret
    })
  return secrets
}

/**
 * ORIGIN_SIGN_ONLY_KEY_IDS: the HMAC key ids (of ORIGIN_HMAC_KEYS) that may only sign and read keys, as the
 * Worker needs; the others may do everything. Were the Worker's secret to leak, it could then not unfreeze a
 * key an operator froze, nor make keys, unlock or rotate. An id that names no key stops the process: a typo
 * would leave the Worker's key with every right.
 */
export function signOnlyKeyIdsSetting(secrets: Record<string, string>): Set<string> {
  const keyIds = (process.env.ORIGIN_SIGN_ONLY_KEY_IDS ?? '').split(',').map((keyId) => keyId.trim()).filter(Boolean)
  for (const keyId of keyIds) {
    if (!Object.hasOwn(secrets, keyId)) throw new Error(`ORIGIN_SIGN_ONLY_KEY_IDS names key id ${keyId}, which ORIGIN_HMAC_KEYS does not have`)
  }
  const signOnly = new Set(keyIds)
  // Then no one could freeze a key, or unlock an enclave after a restart.
  if (Object.keys(secrets).every((keyId) => signOnly.has(keyId))) throw new Error('ORIGIN_SIGN_ONLY_KEY_IDS names every key of ORIGIN_HMAC_KEYS: keep at least one for operators')
  return signOnly
}

/** A file an operator named (`what`: the option or setting) that cannot be read: which, the path in full, and why. */
export function cannotReadError(what: string, path: string, error: unknown): Error {
  return new Error(`${what}: cannot read ${resolve(path)}: ${codeOf(error)}`)
}

export type ParentTls = { cert: string; key: string; ca?: string; requireClientCertificate: boolean }

/**
 * TLS for the parent's API: TLS_CERT_FILE and TLS_KEY_FILE, optionally
 * TLS_CA_FILE and TLS_REQUIRE_CLIENT_CERT=1; undefined (plain HTTP) without a
 * certificate. Client certificates are checked against TLS_CA_FILE alone:
 * without it Node would accept any certificate from a public authority.
 * Each file is read and checked here, so that a bad one is named by its
 * setting, not left to Node's TLS error at the first connection or listen.
 */
export function parentTlsSetting(readFile: (path: string) => string): ParentTls | undefined {
  const requireClientCertificate = choiceSetting('TLS_REQUIRE_CLIENT_CERT', { choices: ['0', '1'], fallback: '0' }) === '1'
  const [certFile, keyFile, caFile] = ['TLS_CERT_FILE', 'TLS_KEY_FILE', 'TLS_CA_FILE'].map(optionalSetting)
  // Half a TLS setting (a key without its certificate, a mistyped name) must not mean plain HTTP.
  if (Boolean(certFile) !== Boolean(keyFile) || (caFile && !certFile)) {
    throw new Error('TLS needs both TLS_CERT_FILE and TLS_KEY_FILE (TLS_CA_FILE only with them); set neither for plain HTTP')
  }
  if (!certFile || !keyFile) {
    if (requireClientCertificate) throw new Error('TLS_REQUIRE_CLIENT_CERT=1 needs TLS_CERT_FILE and TLS_KEY_FILE: without them the API would be plain HTTP')
    return undefined
  }
  if (requireClientCertificate && !caFile) throw new Error('TLS_REQUIRE_CLIENT_CERT=1 needs TLS_CA_FILE, the authority client certificates must come from')
  const read = (name: string, file: string) => {
    try {
      return readFile(file)
    } catch (error) {
      throw cannotReadError(name, file, error)
    }
  }
  const cert = read('TLS_CERT_FILE', certFile)
  const key = read('TLS_KEY_FILE', keyFile)
  const ca = caFile ? read('TLS_CA_FILE', caFile) : undefined
  const certificate = parsed(`TLS_CERT_FILE: ${resolve(certFile)} holds no PEM certificate`, () => new X509Certificate(cert))
  const privateKey = parsed(`TLS_KEY_FILE: ${resolve(keyFile)} holds no unencrypted PEM private key`, () => createPrivateKey(key))
  if (!certificate.checkPrivateKey(privateKey)) throw new Error('TLS_KEY_FILE is not the key of the certificate in TLS_CERT_FILE')
  if (ca !== undefined) parsed(`TLS_CA_FILE: ${resolve(caFile!)} holds no PEM certificate`, () => new X509Certificate(ca))
  return { cert, key, ca, requireClientCertificate }
}

function parsed<T>(failure: string, parse: () => T): T {
  try {
    return parse()
  } catch {
    throw new Error(failure)
  }
}
