/**
 * Every failure the service reports is one of these types. `errorCodes` is the
 * single place that maps a failure kind to its JSON-RPC code and HTTP status;
 * transports never invent codes of their own. Messages are written for the
 * caller: they say what was wrong and never carry stack traces or key material.
 */

export const errorCodes = {
  parse_error: { rpc: -32700, http: 400 },
  invalid_request: { rpc: -32600, http: 400 },
  method_not_found: { rpc: -32601, http: 404 },
  invalid_params: { rpc: -32602, http: 400 },
  unsupported: { rpc: -32602, http: 400 },
  unauthorized: { rpc: -32001, http: 401 },
  declined: { rpc: -32002, http: 403 },
  // A decline too (JSON-RPC clients see the same code), that time undoes: HTTP's status for it, with Retry-After.
  quota_exceeded: { rpc: -32002, http: 429 },
  payload_too_large: { rpc: -32600, http: 413 },
  signer_unavailable: { rpc: -32003, http: 503 },
  quota_unavailable: { rpc: -32603, http: 503 },
  internal: { rpc: -32603, http: 500 },
} as const

export type ErrorKind = keyof typeof errorCodes

export type ErrorData = { reason: string } & Record<string, unknown>

export abstract class ServiceError extends Error {
  abstract readonly kind: ErrorKind
  constructor(
    message: string,
    readonly data?: ErrorData,
  ) {
    super(message)
  }
}

export class ParseError extends ServiceError {
  readonly kind = 'parse_error'
}
export class InvalidRequestError extends ServiceError {
  readonly kind = 'invalid_request'
}
export class MethodNotFoundError extends ServiceError {
  readonly kind = 'method_not_found'
}
/** A parameter is malformed; the message names the field. */
export class InvalidParamsError extends ServiceError {
  readonly kind = 'invalid_params'
}
/** The chain, entry point or paymaster the caller named is not one we serve. */
export class UnsupportedError extends ServiceError {
  readonly kind = 'unsupported'
}
export class UnauthorizedError extends ServiceError {
  readonly kind = 'unauthorized'
}
/** Policy declined to sponsor; `data.reason` is machine-readable. Nothing was signed. */
export class SponsorshipDeclinedError extends ServiceError {
  readonly kind: 'declined' | 'quota_exceeded' = 'declined'
  constructor(message: string, data: ErrorData) {
    super(message, data)
  }
}
/** A sender or API key has used its quota; `data.retryAfterSeconds` says when one more fits (null: never, it alone is too costly). */
export class QuotaExceededError extends SponsorshipDeclinedError {
  override readonly kind = 'quota_exceeded'
}
export class PayloadTooLargeError extends ServiceError {
  readonly kind = 'payload_too_large'
}
/**
 * The signer backend could not produce a signature (misconfigured, down, or unreadable key). `detail` says why, for
 * the operator's log only: it names backends' URLs, key ids and secret names, which API key holders (wallets, whose
 * keys ship in front ends) have no business reading.
 */
export class SignerUnavailableError extends ServiceError {
  readonly kind = 'signer_unavailable'
  constructor(
    message: string,
    data: ErrorData,
    readonly detail?: string,
  ) {
    super(message, data)
  }
}
/** The quota counts could not be read or written: nothing is signed uncounted. */
export class QuotaUnavailableError extends ServiceError {
  readonly kind = 'quota_unavailable'
}
export class InternalError extends ServiceError {
  readonly kind = 'internal'
}

/** How a failed request ended, for logs and metrics: policy said no, or something went wrong. */
export function outcomeOf(error: ServiceError): 'declined' | 'error' {
  return error instanceof SponsorshipDeclinedError ? 'declined' : 'error'
}

/** Whatever was thrown, the form we may show a caller: unknown errors become a bare internal error. */
export function toServiceError(error: unknown): ServiceError {
  if (error instanceof ServiceError) return error
  return new InternalError('internal error')
}
