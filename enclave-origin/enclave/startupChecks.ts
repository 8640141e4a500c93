import { readFile } from 'node:fs/promises'
import { isKmsKeyArn, type AttestationProvider } from './dataKey.js'

/** The kernel's current hardware RNG; inside a Nitro Enclave it must be the NSM's. */
const rngCurrentPath = '/sys/devices/virtual/misc/hw_random/rng_current'

export type EnclaveProfile = 'production' | 'development'

/**
 * Refuses to start a production enclave that could not keep its promises:
 * keys must come from the Nitro RNG, data keys must be bound to an
 * attestation, the KMS key must be named by its ARN, and KMS must be reached
 * over verified TLS. Development skips these, loudly.
 */
export async function checkStartup(options: {
  profile: EnclaveProfile
  attestation: AttestationProvider
  kmsKeyId: string
  /** KMS_ENDPOINT, when set. */
  kmsEndpoint?: string
  /** The process's environment, for Node's TLS settings; default `process.env`. */
  env?: Record<string, string | undefined>
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
  // Whoever ends the TLS session to KMS could answer GenerateDataKey with a DEK of its own, encrypted to this enclave's
  // attested public key: the attestation keeps the DEK secret, but only TLS proves it came from KMS.
  if (options.kmsEndpoint !== undefined && !options.kmsEndpoint.startsWith('https://')) {
    throw new Error('refusing to start: the production profile reaches KMS over TLS only (KMS_ENDPOINT must be an https:// URL)')
  }
  if ((options.env ?? process.env).NODE_TLS_REJECT_UNAUTHORIZED === '0') {
    throw new Error('refusing to start: NODE_TLS_REJECT_UNAUTHORIZED=0 turns off the check of KMS\'s TLS certificate')
  }
}
