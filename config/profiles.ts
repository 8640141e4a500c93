import type { ProfileName } from './schema.js'

/**
 * Presets per environment. A Worker's PAYMASTER_CONFIG is merged over its
 * profile's preset (objects merge, arrays and scalars replace, null removes an
 * entry), so an operator writes only what differs: the chains, and for the
 * KMS and Vault backends their key id, region, URL and path. Chains are never
 * preset outside development: which contracts to sign for is a deliberate choice.
 */

/** Production shape: KMS signs; if it is slow or down, the key in Secrets Store does, clients never noticing. */
const kmsWithEdgeBackup = {
  primary: { kind: 'fallback', members: ['kms', 'edge'] },
  kms: { kind: 'aws-kms' },
  edge: { kind: 'secrets-store', binding: 'PAYMASTER_KEY' },
}

export const profilePresets: Record<ProfileName, Record<string, unknown>> = {
  // No accounts, no internet: an ephemeral key unless PAYMASTER_PRIVATE_KEY is set,
  // no API key, and the local anvil chain that `npm run devnet` deploys.
  development: {
    signers: { primary: { kind: 'local', allowEphemeral: true } },
    policy: { apiKeys: { required: false } },
  },
  testing: {
    signers: { primary: { kind: 'secrets-store', binding: 'PAYMASTER_KEY' } },
  },
  staging: { signers: kmsWithEdgeBackup },
  production: { signers: kmsWithEdgeBackup },
  // The enclave origin signs (sub-10 ms from its sealed cache); KMS is the backup.
  enterprise: {
    signers: {
      primary: { kind: 'fallback', members: ['origin', 'kms'] },
      origin: { kind: 'keyless' },
      kms: { kind: 'aws-kms' },
    },
  },
  // No key in the Worker's own secrets: KMS, with Vault as the backup.
  'high-security': {
    signers: {
      primary: { kind: 'fallback', members: ['kms', 'vault'] },
      kms: { kind: 'aws-kms' },
      vault: { kind: 'vault', auth: { method: 'approle' } },
    },
    policy: { validity: { validForSeconds: 120, validAfterSkewSeconds: 30 } },
  },
}
