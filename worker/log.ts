import { outcomeOf, SignerUnavailableError, type ServiceError } from './errors.js'

/** One JSON line per event; callers pass only fields that are safe to log (no keys, no secrets). */
export function logEvent(fields: Record<string, unknown>): void {
  console.log(JSON.stringify({ time: new Date().toISOString(), ...fields }))
}

/** The outcome of a failed request as log fields: its kind, the decline reason when policy said no, and why a signer failed. */
export function failureFields(error: ServiceError): Record<string, unknown> {
  return {
    outcome: outcomeOf(error),
    errorKind: error.kind,
    ...(error.data?.reason ? { reason: error.data.reason } : {}),
    ...(error instanceof SignerUnavailableError && error.detail ? { detail: error.detail } : {}),
  }
}
