import type { Address, Hex } from 'viem'
import type { BreakerState } from './circuitBreaker.js'

/**
 * The contract every key backend keeps. Backends sign a 32-byte digest and
 * nothing else; EIP-191 prefixing happens once, in the sponsor domain.
 */
export interface Signer {
  address(): Promise<Address>
  /**
   * A canonical 65-byte Ethereum signature (r ‖ s ‖ v, low-s, v ∈ {27, 28})
   * over the digest, and the name of the backend that made it (a fallback
   * chain names the member that answered).
   */
  signDigest(digest: Hex, options?: SignOptions): Promise<SignedDigest>
  health(): Promise<SignerHealth>
  describe(): SignerDescription
}

/**
 * `signal`: the caller has stopped waiting (a fallback chain timed the attempt
 * out, or the chain's own caller gave up). A backend that calls a service
 * stops there, rather than keep calling, and waiting, for a signature nobody
 * will use.
 */
export type SignOptions = {
  /** Aborts when the caller no longer waits for the signature. */
  signal?: AbortSignal
  /**
   * When (`Date.now()` ms) the caller will stop waiting, if it knows (a fallback chain's attempt timeout): a backend
   * that could wait (a Retry-After) starts no wait it cannot finish by then, and fails at once instead.
   */
  deadline?: number
}

/** The error of a backend (`who`, named as its messages name it) that stopped because its caller's signal aborted. */
export function stoppedForCaller(who: string): SignerError {
  return new SignerError(`${who}: stopped, as its caller no longer waits for the signature`, { retryable: true })
}

/** Aborts after `ms`, or as soon as `signal` does. */
export function deadlineSignal(ms: number, signal: AbortSignal | undefined): AbortSignal {
  const timeout = AbortSignal.timeout(ms)
  return signal ? AbortSignal.any([signal, timeout]) : timeout
}

/** A signature, the backend that made it, and the address it recovers to. */
export type SignedDigest = { signature: Hex; signedBy: string; address: Address }

/** How well the key is protected, from weakest to strongest. */
export type SecurityLevel = 'ephemeral' | 'software' | 'edge-secret' | 'hsm' | 'enclave'

export type SignerDescription = { kind: string; name: string; securityLevel: SecurityLevel }

/** `members` is set by signers made of other signers (fallback), one entry per member. */
export type SignerHealth = ({ ok: true; address: Address } | { ok: false; error: string }) & { members?: MemberHealth[] }

/** One member of a fallback chain: its own health, its breaker's state, and its last signing error. */
export type MemberHealth = { name: string; kind: string; state: BreakerState; ok: boolean; address?: Address; error?: string; lastError?: string }

/**
 * A backend could not sign. The message is for the operator (the Worker's log,
 * `/health`): it names the backend and what is wrong, its URL or key id
 * perhaps, never the key or the secret's value. Callers get less (see sponsor).
 */
export class SignerError extends Error {
  constructor(
    message: string,
    readonly options: { retryable: boolean } = { retryable: false },
  ) {
    super(message)
  }
}

/** What may be shown of a failure: a SignerError's message, never another error's (it could hold anything). */
export function signerErrorMessage(error: unknown): string {
  return error instanceof SignerError ? error.message : 'signer failed'
}

/** Runs `check` and reports its outcome as health, so `/health` never throws. */
export async function healthOf(signer: Pick<Signer, 'address'>): Promise<SignerHealth> {
  try {
    return { ok: true, address: await signer.address() }
  } catch (error) {
    return { ok: false, error: signerErrorMessage(error) }
  }
}
