import type { SignerConfig } from '../config/schema.js'
import { LocalSigner } from './local.js'
import { SecretsStoreSigner, type SecretsStoreSecret } from './secretsStore.js'
import type { Signer } from './signer.js'

/** Builds the backend a signer entry names, reading secrets and bindings from the Worker env. */
export function createSigner(options: { name: string; config: SignerConfig; env: Record<string, unknown> }): Signer {
  const { name, config, env } = options
  switch (config.kind) {
    case 'local': {
      const value = env[config.secret]
      return new LocalSigner({
        name,
        privateKey: typeof value === 'string' && value !== '' ? value : undefined,
        secretName: config.secret,
        allowEphemeral: config.allowEphemeral,
      })
    }
    case 'secrets-store':
      return new SecretsStoreSigner({
        name,
        bindingName: config.binding,
        binding: env[config.binding] as SecretsStoreSecret | undefined,
      })
  }
}
