import { readFile } from 'node:fs/promises'
import { isKmsKeyArn, type AttestationProvider } from './dataKey.js'

/** The kernel's current hardware RNG; inside a Nitro Enclave it must be the NSM's. */
const rngCurrentPath = '/sys/devices/virtual/misc/hw_random/rng_current'

export type EnclaveProfile = 'production' | 'development'

/**
 * Refuses to start a production enclave that could not keep its promises:
 * keys must come from the Nitro RNG, data keys must be bound to an
 * attestation, the KMS key must be named by its ARN, and KMS must be reached
 * over verified TLS. Development skips these, loudly; but development by
 * default (ORIGIN_PROFILE unset) is refused inside a Nitro Enclave, where an
 * image that lost its setting would otherwise start unprotected.
 */
export async function checkStartup(options: {
  profile: EnclaveProfile
  /** The profile is the default one, ORIGIN_PROFILE being unset. */
  profileByDefault?: boolean
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
    if (options.profileByDefault && (await readRng().catch(() => '')).trim() === 'nsm-hwrng') {
      throw new Error('refusing to start: this is a Nitro Enclave (its hardware RNG is nsm-hwrng) and ORIGIN_PROFILE is unset, so development by default: set ORIGIN_PROFILE=production (or development, to mean it)')
    }
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
  // (Whose certificates vouch for it is fixed too: the production KMS client trusts Node's bundled roots alone.)
  const [, partition = '', , region = ''] = options.kmsKeyId.split(':')
  const known = Object.hasOwn(partitions, partition) ? partitions[partition] : undefined
  if (known === undefined) {
    throw new Error(`refusing to start: the production profile reaches KMS in the ${Object.keys(partitions).join(', ')} partitions, whose certificates Node's bundled roots vouch for, and the key is in ${partition}`)
  }
  if (options.kmsEndpoint !== undefined) {
    const hosts = kmsHosts(known, region)
    if (!hosts.test(new URL(options.kmsEndpoint).hostname.toLowerCase().replace(/\.$/, ''))) {
      throw new Error(`refusing to start: KMS_ENDPOINT must name KMS in the key's partition and region (kms.${region}.${known.suffix}, its kms-fips, dual-stack or VPC endpoint names), got ${options.kmsEndpoint}`)
    }
  }
  if ((options.env ?? process.env).NODE_TLS_REJECT_UNAUTHORIZED === '0') {
    throw new Error('refusing to start: NODE_TLS_REJECT_UNAUTHORIZED=0 turns off the check of KMS\'s TLS certificate')
  }
}

/**
 * The DNS suffixes of each AWS partition's service endpoints and of its dual-stack ones, for the partitions whose
 * endpoints carry certificates from public authorities in Node's bundled roots, which the production KMS client
 * trusts alone. (The ISO partitions' do not: an enclave there could not reach KMS, so it is refused at start.)
 */
const partitions: Record<string, { suffix: string; dualStack: string }> = {
  aws: { suffix: 'amazonaws.com', dualStack: 'api.aws' },
  'aws-us-gov': { suffix: 'amazonaws.com', dualStack: 'api.aws' },
  'aws-cn': { suffix: 'amazonaws.com.cn', dualStack: 'api.amazonwebservices.com.cn' },
  'aws-eusc': { suffix: 'amazonaws.eu', dualStack: 'api.amazonwebservices.eu' },
}

/**
 * KMS's endpoint names in `region` of a known partition: `kms` and `kms-fips`, their dual-stack names, and its VPC
 * endpoints' (`vpce-….kms[-fips].<region>.vpce.<suffix>`).
 */
function kmsHosts({ suffix, dualStack }: { suffix: string; dualStack: string }, region: string): RegExp {
  if (!/^[a-z0-9-]+$/.test(region)) return /(?!)/
  const [names, dualStackNames] = [suffix, dualStack].map((name) => name.replace(/\./g, '\\.'))
  return new RegExp(`^kms(-fips)?\\.${region}\\.(${names}|${dualStackNames})$|^vpce-[a-z0-9-]+\\.kms(-fips)?\\.${region}\\.vpce\\.${names}$`)
}
