import type { ProfileName } from './schema.js'

/**
 * Presets per environment. A Worker's PAYMASTER_CONFIG is merged over its
 * profile's preset (objects merge, arrays and scalars replace), so an operator
 * writes only what differs. Chains are never preset outside development:
 * which contracts to sign for is a deliberate choice.
 */
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
  staging: {
    signers: { primary: { kind: 'secrets-store', binding: 'PAYMASTER_KEY' } },
  },
  production: {
    signers: { primary: { kind: 'secrets-store', binding: 'PAYMASTER_KEY' } },
  },
  // The enclave origin (keyless) and KMS backends arrive with their issues; until
  // then these presets keep the key in Secrets Store, never in a plain secret.
  enterprise: {
    signers: { primary: { kind: 'secrets-store', binding: 'PAYMASTER_KEY' } },
  },
  'high-security': {
    signers: { primary: { kind: 'secrets-store', binding: 'PAYMASTER_KEY' } },
    policy: { validity: { validForSeconds: 120, validAfterSkewSeconds: 30 } },
  },
}
