import { parseVsockAddress } from './protocol/vsock.js'

/** Settings for the origin's processes, from the environment (12-factor), with the reason when one is wrong. */

export function setting(name: string, fallback?: string): string {
  const value = process.env[name] ?? fallback
  if (value === undefined || value === '') throw new Error(`${name} is not set`)
  return value
}

/** Without a fallback, an unset name is an error, as with `setting`. */
export function numberSetting(name: string, fallback?: number): number {
  const raw = process.env[name] ?? fallback
  if (raw === undefined) throw new Error(`${name} is not set`)
  const value = Number(raw)
  if (!Number.isFinite(value)) throw new Error(`${name} must be a number`)
  return value
}

export type StreamAddress = { host: string; port: number } | { path: string } | { vsock: { cid: number; port: number } }

/** "vsock:CID:PORT" (in an enclave), "host:port", or a Unix socket path. */
export function listenAddress(value: string): StreamAddress {
  const vsock = parseVsockAddress(value)
  if (vsock) return { vsock }
  const match = /^(.+):(\d+)$/.exec(value)
  return match ? { host: match[1]!, port: Number(match[2]) } : { path: value }
}

/** One JSON line per event; callers pass nothing secret, and values that look like secrets are redacted anyway. */
export function logLine(fields: Record<string, unknown>): void {
  const redacted = Object.fromEntries(
    Object.entries(fields).map(([key, value]) => [key, /secret|token|key$|password|dek/i.test(key) ? '[redacted]' : value]),
  )
  console.log(JSON.stringify({ time: new Date().toISOString(), ...redacted }))
}
