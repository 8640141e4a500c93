/** The message of anything thrown: a non-Error (a string, an addon's value) is stringified. */
export function messageOf(error: unknown): string {
  return error instanceof Error ? error.message : String(error)
}
