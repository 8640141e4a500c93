// Runtime-neutral, no Node modules: the Worker's keyless backend imports this file too.

/** The message of anything thrown: a non-Error (a string, an addon's value) is stringified. */
export function messageOf(error: unknown): string {
  return error instanceof Error ? error.message : String(error)
}

/** An I/O failure (a file's, a stream's, a connection's) as an operator reads it: its code (ENOENT, EACCES, …), else its message. */
export function codeOf(error: unknown): string {
  const code = (error as { code?: unknown } | undefined)?.code
  return typeof code === 'string' ? code : messageOf(error)
}

/** The JSON object `text` holds, or undefined for anything else (not JSON, or an array or a value). */
export function jsonObjectOf(text: string): Record<string, unknown> | undefined {
  try {
    const value: unknown = JSON.parse(text)
    return typeof value === 'object' && value !== null && !Array.isArray(value) ? (value as Record<string, unknown>) : undefined
  } catch {
    return undefined
  }
}

/**
 * JSON.parse whose error names only the position: V8's message quotes the
 * text around the fault, which in a share or preload file is key material.
 */
export function parseJsonQuietly(text: string, what: string): unknown {
  try {
    return JSON.parse(text)
  } catch (error) {
    const position = /position (\d+)/.exec(messageOf(error))?.[1]
    throw new Error(`${what} is not valid JSON${position ? ` (at position ${position})` : ''}`)
  }
}
