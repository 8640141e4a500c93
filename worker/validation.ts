import type { z } from 'zod'

/**
 * Turns a zod error into one line that names each bad field, e.g.
 * `userOperation.sender: expected a 20-byte hex address`. `rootNames` names
 * positional params, so `[0, "sender"]` reads as `userOperation.sender`;
 * `prefix` names the object that was parsed.
 */
export function describeZodError(
  error: z.ZodError,
  options: { rootNames?: readonly string[]; prefix?: string; maxIssues?: number } = {},
): string {
  const { rootNames = [], prefix, maxIssues = 5 } = options
  return error.issues
    .slice(0, maxIssues)
    .map((issue) => {
      const [first, ...rest] = issue.path
      const root = typeof first === 'number' && rootNames[first] ? rootNames[first] : first
      const path = [prefix, root, ...rest].filter((part) => part !== undefined).map(String)
      return path.length ? `${path.join('.')}: ${issue.message}` : issue.message
    })
    .join('; ')
}
