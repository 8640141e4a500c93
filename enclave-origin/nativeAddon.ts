import { createRequire } from 'node:module'
import { messageOf } from './errors.js'

const require = createRequire(import.meta.url)

/**
 * A native addon published as a bare `.node` file (the package's `main`, as
 * napi-rs platform packages are), checked for the functions the caller uses.
 * Fails with an Error naming the package and what went wrong.
 */
export function requireAddon<T>(packageName: string, functions: readonly string[]): T {
  let addon: Record<string, unknown>
  try {
    addon = require(packageName) as Record<string, unknown>
  } catch (error) {
    throw new Error(`cannot load ${packageName} (${messageOf(error)})`)
  }
  const missing = functions.filter((name) => typeof addon[name] !== 'function')
  if (missing.length > 0) throw new Error(`${packageName} has no ${missing.join(', ')} export`)
  return addon as T
}
