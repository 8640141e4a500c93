import { parseVsockAddress } from './protocol/vsock.js'

/** Settings for the origin's processes, from the environment (12-factor), with the reason when one is wrong. */

export function setting(name: string, fallback?: string): string {
  const value = process.env[name] ?? fallback
  if (value === undefined || value === '') throw new Error(`${name} is not set`)
  return value
}

/** One of `choices`, or the fallback when unset; anything else is an error naming the setting and its choices. */
export function choiceSetting<const T extends string>(name: string, { choices, fallback }: { choices: readonly T[]; fallback: T }): T {
  const value = process.env[name] || fallback
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

/** "vsock:CID:PORT" (in an enclave), "host:port", or a Unix socket path. */
export function listenAddress(value: string): StreamAddress {
  const vsock = parseVsockAddress(value)
  if (vsock) return { vsock }
  const match = /^(.+):(\d+)$/.exec(value)
  return match ? { host: match[1]!, port: Number(match[2]) } : { path: value }
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
  console.log(JSON.stringify({ time: new Date().toISOString(), ...(redactSecrets(fields) as Record<string, unknown>) }))
}
