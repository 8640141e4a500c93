import type { Address } from 'viem'
import { acceptsSingleSigner, type Config, type SignerConfig } from '../config/schema.js'
import { AwsKmsSigner } from './awsKms.js'
import { DeclaredAddressSigner } from './declaredAddress.js'
import { FallbackSigner } from './fallback.js'
import { HttpSigner } from './httpSigner.js'
import { KeylessSigner } from './keyless.js'
import { LocalSigner } from './local.js'
import { SecretsStoreSigner, type SecretsStoreSecret } from './secretsStore.js'
import type { Signer } from './signer.js'
import type { SignerMetrics } from './signerMetrics.js'
import { VaultSigner } from './vault.js'

/**
 * Builds every configured signer, reading secrets and bindings from the
 * Worker env by the names the config gives. Fallback chains refer to other
 * signers by name; a chain whose paymaster accepts a single signer makes its
 * fallback insist that every member has the same address. A signer whose
 * config declares its address refuses to act as any other.
 */
export function createSigners(options: { config: Config; env: Record<string, unknown>; metrics: SignerMetrics }): Map<string, Signer> {
  const { config, env, metrics } = options
  const secret = (name: string | undefined) => {
    const value = name === undefined ? undefined : env[name]
    return typeof value === 'string' && value !== '' ? value : undefined
  }
  const singleSigner = new Set(config.chains.filter(acceptsSingleSigner).map((chain) => chain.signer))
  const declaredAddressOf = (name: string): Address | undefined => {
    const signer = config.signers[name]
    return signer && signer.kind !== 'fallback' ? signer.address : undefined
  }

  const leaf = (name: string, signer: Exclude<SignerConfig, { kind: 'fallback' }>): Signer => {
    switch (signer.kind) {
      case 'local':
        return new LocalSigner({ name, privateKey: secret(signer.secret), secretName: signer.secret, allowEphemeral: signer.allowEphemeral })
      case 'secrets-store':
        return new SecretsStoreSigner({ name, bindingName: signer.binding, binding: env[signer.binding] as SecretsStoreSecret | undefined })
      case 'aws-kms':
        return new AwsKmsSigner({
          name,
          keyId: signer.keyId,
          region: signer.region,
          endpoint: signer.endpoint,
          credentials: {
            accessKeyId: secret(signer.accessKeyIdSecret),
            secretAccessKey: secret(signer.secretAccessKeySecret),
            sessionToken: secret(signer.sessionTokenSecret),
          },
          deadlineMs: signer.deadlineMs,
          maxAttempts: signer.maxAttempts,
        })
      case 'vault':
        return new VaultSigner({
          name,
          address: signer.url,
          auth:
            signer.auth.method === 'token'
              ? { method: 'token', token: secret(signer.auth.tokenSecret) }
              : { method: 'approle', roleId: secret(signer.auth.roleIdSecret), secretId: secret(signer.auth.secretIdSecret), mount: signer.auth.mount },
          kvMount: signer.kvMount,
          path: signer.path,
          field: signer.field,
          namespace: signer.namespace,
          cacheTtlMs: signer.cacheTtlSeconds * 1_000,
          readTimeoutMs: signer.timeoutMs,
        })
      case 'http':
        return new HttpSigner({ name, url: signer.url, keyId: signer.keyId, token: secret(signer.tokenSecret), address: signer.address, timeoutMs: signer.timeoutMs })
      case 'keyless':
        return new KeylessSigner({
          name,
          url: signer.url,
          keyId: signer.keyId,
          address: signer.address,
          hmacKeyId: signer.hmacKeyId,
          hmacSecret: secret(signer.hmacSecret),
          deadlineMs: signer.deadlineMs,
          clientCertificate: signer.clientCertificate === undefined ? undefined : { bindingName: signer.clientCertificate, binding: env[signer.clientCertificate] },
        })
    }
  }

  const signers = new Map<string, Signer>()
  for (const [name, signer] of Object.entries(config.signers)) {
    if (signer.kind === 'fallback') continue
    // HttpSigner and KeylessSigner check their (required) addresses themselves too; one general check is worth that repeat.
    const built = leaf(name, signer)
    signers.set(name, signer.address === undefined ? built : new DeclaredAddressSigner({ signer: built, declared: signer.address }))
  }
  for (const [name, signer] of Object.entries(config.signers)) {
    if (signer.kind !== 'fallback') continue
    signers.set(
      name,
      new FallbackSigner({
        name,
        members: signer.members.map((member) => signers.get(member)!),
        timeoutMs: signer.timeoutMs,
        failureThreshold: signer.failureThreshold,
        coolDownMs: signer.coolDownSeconds * 1_000,
        hedgeAfterMs: signer.hedgeAfterMs,
        requireSameAddress: singleSigner.has(name),
        // The config allows one declared address among a single-signer chain's members, so the first found is it.
        declaredAddress: singleSigner.has(name) ? signer.members.map(declaredAddressOf).find((address) => address !== undefined) : undefined,
        metrics,
      }),
    )
  }
  return signers
}
