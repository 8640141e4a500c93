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
  // And only KMS itself: a public certificate proves a host's name, so the name must be KMS's, in the key's region.
  const region = options.kmsKeyId.split(':')[3]!
  if (options.kmsEndpoint !== undefined && !isKmsHost(new URL(options.kmsEndpoint).hostname, region)) {
    throw new Error(`refusing to start: KMS_ENDPOINT must name KMS in the key's region (kms.${region}.amazonaws.com, kms-fips.${region}.amazonaws.com or a KMS VPC endpoint), got ${options.kmsEndpoint}`)
  }
  const env = options.env ?? process.env
  if (env.NODE_TLS_REJECT_UNAUTHORIZED === '0') {
    throw new Error('refusing to start: NODE_TLS_REJECT_UNAUTHORIZED=0 turns off the check of KMS\'s TLS certificate')
  }
  // Each adds certificate authorities that Node trusts for KMS besides its own bundle. The enclave talks to KMS alone,
  // which needs none of them; a base image that sets them (to the system bundle, say) must unset them.
  const addedAuthorities = ['NODE_EXTRA_CA_CERTS', 'SSL_CERT_FILE', 'SSL_CERT_DIR'].filter((name) => env[name])
  if (/--use-openssl-ca|--use-system-ca/.test(env.NODE_OPTIONS ?? '')) addedAuthorities.push('NODE_OPTIONS (--use-openssl-ca or --use-system-ca)')
  if (addedAuthorities.length > 0) {
    throw new Error(`refusing to start: ${addedAuthorities.join(', ')} would have KMS's TLS certificate checked against authorities besides Node's own`)
  }
}

/** KMS's public endpoints in `region` (the China partition's included) and its VPC endpoints' DNS names. */
function isKmsHost(host: string, region: string): boolean {
  const escaped = region.replace(/[^a-z0-9-]/g, '')
  return new RegExp(`^(kms|kms-fips)\\.${escaped}\\.amazonaws\\.com(\\.cn)?$|^vpce-[a-z0-9-]+\\.kms\\.${escaped}\\.vpce\\.amazonaws\\.com$`).test(host.toLowerCase())
}
