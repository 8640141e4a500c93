import { KMSClient } from '@aws-sdk/client-kms'
import { Agent } from 'node:https'
import { createSecureContext, rootCertificates, type ConnectionOptions } from 'node:tls'
import { boundedAwsRequests } from '../awsRequests.js'
import type { StreamAddress } from '../config.js'
import type { DeliveredCredentials } from './deliveredCredentials.js'
import { kmsTunnelAgent } from './kmsTunnel.js'

/**
 * TLS that trusts Node's bundled Mozilla roots and nothing else: an explicit `ca` replaces the root store, so no
 * authority added by NODE_EXTRA_CA_CERTS, `--use-openssl-ca`, `--use-system-ca` or the like can vouch for KMS.
 * One context, made once: a `ca` option would have each connection parse the whole bundle again.
 */
export const bundledRootsOnly: ConnectionOptions = { secureContext: createSecureContext({ ca: [...rootCertificates] }) }

/** The TLS options of the enclave's KMS connections by profile: production's trust Node's bundled roots alone (only TLS proves a data key came from KMS). */
export function kmsTlsFor(profile: 'production' | 'development'): ConnectionOptions | undefined {
  return profile === 'production' ? bundledRootsOnly : undefined
}

/**
 * The enclave's KMS client: credentials as the parent delivers them, each
 * connection through `tunnel` when given (vsock to the parent's vsock-proxy),
 * and every request bounded, so a silent KMS or proxy does not hold the
 * UNLOCK behind it. Its endpoint is `endpoint` or the region's: never one
 * from AWS_ENDPOINT_URL* or a shared config file, which the start-up checks
 * would not see.
 */
export function enclaveKmsClient(options: {
  region: string
  endpoint?: string
  credentials: DeliveredCredentials
  timeoutMs: number
  tunnel?: StreamAddress
  /** Added to each TLS connection, through the tunnel or not (production: `bundledRootsOnly`; tests: their CA). */
  tls?: ConnectionOptions
}): KMSClient {
  const { region, endpoint, credentials, timeoutMs, tunnel, tls } = options
  // As the SDK's own agent is, but for the TLS options.
  const httpsAgent = tunnel ? kmsTunnelAgent({ address: tunnel, tls }) : tls ? new Agent({ keepAlive: true, maxSockets: 50, ...tls }) : undefined
  return new KMSClient({
    region,
    endpoint,
    ignoreConfiguredEndpointUrls: true,
    credentials: credentials.provider,
    ...boundedAwsRequests({ timeoutMs, httpsAgent }),
  })
}
