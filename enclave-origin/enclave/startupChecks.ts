import { readFile } from 'node:fs/promises'
import { isKmsKeyArn, type AttestationProvider } from './dataKey.js'

/** The kernel's current hardware RNG; inside a Nitro Enclave it must be the NSM's. */
const rngCurrentPath = '/sys/devices/virtual/misc/hw_random/rng_current'

export type EnclaveProfile = 'production' | 'development'

/**
 * Refuses to start a production enclave that could not keep its promises:
 * keys must come from the Nitro RNG, data keys must be bound to an
 * attestation, and the KMS key must be named by its ARN. Development skips
 * these, loudly.
 */
export async function checkStartup(options: {
  profile: EnclaveProfile
  attestation: AttestationProvider
  kmsKeyId: string
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
  // The parent delivers the credentials: an alias or a bare key id would be looked up in whatever account they belong to.
  if (!isKmsKeyArn(options.kmsKeyId)) throw new Error('refusing to start: the production profile needs KMS_KEY_ID as a key ARN (arn:aws:kms:REGION:ACCOUNT:key/ID)')
}
