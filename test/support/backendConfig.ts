/**
 * The Worker's view of the local key servers: the signer backends that reach
 * them and the secrets those backends read. Pure, with no Node imports, so the
 * workerd tests can use it on what globalSetup provides.
 */

/** Where the key servers from startKeyServers listen and how to authenticate; plain data, so vitest can provide it to workerd. */
export type KeyServerInfo = {
  /** The address of the one key every server holds. */
  address: `0x${string}`
  kms: { url: string; keyId: string; accessKeyId: string; secretAccessKey: string; region: string }
  vault: { url: string; token: string }
  http: { url: string; token: string; keyId: string }
}

export function backendConfig(servers: KeyServerInfo) {
  return {
    secrets: {
      AWS_ACCESS_KEY_ID: servers.kms.accessKeyId,
      AWS_SECRET_ACCESS_KEY: servers.kms.secretAccessKey,
      VAULT_TOKEN: servers.vault.token,
      SIGNER_TOKEN: servers.http.token,
    },
    backends: {
      kms: { kind: 'aws-kms', keyId: servers.kms.keyId, region: servers.kms.region, endpoint: servers.kms.url },
      // KV v2 path (mount `secret/`) where startKeyServers put the key.
      vault: { kind: 'vault', url: servers.vault.url, path: 'paymaster/signer' },
      http: { kind: 'http', url: servers.http.url, keyId: servers.http.keyId, address: servers.address },
    },
  }
}
