import { readFile } from 'node:fs/promises'
import type { AttestationProvider } from './dataKey.js'

/** The kernel's current hardware RNG; inside a Nitro Enclave it must be the NSM's. */
const rngCurrentPath = '/sys/devices/virtual/misc/hw_random/rng_current'

export type EnclaveProfile = 'production' | 'development'

/**
 * Refuses to start a production enclave that could not keep its promises:
 * keys must come from the Nitro RNG, and data keys must be bound to an
 * attestation. Development skips both, loudly.
 */
export async function checkStartup(options: {
  profile: EnclaveProfile
  attestation: AttestationProvider
  warn: (line: string) => void
  readRng?: () => Promise<string>
}): Promise<void> {
  const readRng = options.readRng ?? (() => readFile(rngCurrentPath, 'utf8'))
  if (options.profile === 'development') {
    const attested = options.attestation.kind === 'nitro' ? 'data keys bound to Nitro attestation' : 'no attestation'
    options.warn(`development enclave: RNG self-check skipped and ${attested}; keys are NOT protected as in a production Nitro Enclave`)
    return
  }
  const rng = (await readRng().catch(() => 'unreadable')).trim()
  if (rng !== 'nsm-hwrng') throw new Error(`refusing to start: the current hardware RNG is "${rng}", not the Nitro "nsm-hwrng"`)
  if (options.attestation.kind !== 'nitro') throw new Error('refusing to start: the production profile needs a Nitro attestation provider')
}
