import { cloudflareTest } from '@cloudflare/vitest-pool-workers'
import { defineConfig } from 'vitest/config'
import { certificateFetcher } from './test/support/certificateFetcher.js'

/**
 * Three projects: `unit` (Node, pure domain and backends), `worker` (inside
 * workerd via vitest-pool-workers, the testing environment of wrangler.toml),
 * and `e2e` (Node, a real anvil chain and the Worker under `wrangler dev`).
 */
export default defineConfig({
  test: {
    projects: [
      {
        test: { name: 'unit', include: ['test/unit/**/*.test.ts'], environment: 'node' },
      },
      {
        plugins: [
          cloudflareTest(({ inject }) => {
            const origin = inject('tlsOrigin')
            return {
              wrangler: { configPath: './wrangler.toml', environment: 'testing' },
              miniflare: {
                bindings: { API_KEYS: 'test-key-1, test-key-2', OPERATOR_KEYS: 'test-operator-key' },
                // A binding whose secret is never created: the missing-secret path.
                secretsStoreSecrets: { NEVER_CREATED_KEY: { store_id: 'local-test-store', secret_name: 'never-created' } },
                // The keyless backend's client certificate for the origin globalSetup starts, as an mtls_certificates
                // binding presents it; and a binding that trusts the origin but presents none.
                serviceBindings: {
                  ORIGIN_CLIENT_CERT: certificateFetcher({ ca: origin.ca, cert: origin.clientCert, key: origin.clientKey }),
                  ORIGIN_NO_CLIENT_CERT: certificateFetcher({ ca: origin.ca }),
                },
              },
            }
          }),
        ],
        test: {
          name: 'worker',
          include: ['test/worker/**/*.test.ts'],
          testTimeout: 30_000,
          // Local KMS, Vault and HTTP key servers, and an enclave origin over TLS, for the signer backend tests.
          globalSetup: ['test/support/backendServers.globalSetup.ts'],
        },
      },
      {
        test: {
          name: 'e2e',
          include: ['test/e2e/**/*.test.ts'],
          environment: 'node',
          testTimeout: 120_000,
          hookTimeout: 180_000,
          fileParallelism: false,
        },
      },
    ],
  },
})
