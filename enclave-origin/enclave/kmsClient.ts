import { KMSClient } from '@aws-sdk/client-kms'
import type { ConnectionOptions } from 'node:tls'
import { boundedAwsRequests } from '../awsRequests.js'
import type { StreamAddress } from '../config.js'
import type { DeliveredCredentials } from './deliveredCredentials.js'
import { kmsTunnelAgent } from './kmsTunnel.js'

/**
 * The enclave's KMS client: credentials as the parent delivers them, each
 * connection through `tunnel` when given (vsock to the parent's vsock-proxy),
 * and every request bounded, so a silent KMS or proxy does not hold the
 * UNLOCK behind it.
 */
export function enclaveKmsClient(options: {
  region: string
  endpoint?: string
  credentials: DeliveredCredentials
  timeoutMs: number
  tunnel?: StreamAddress
  /** Added to each TLS connection through the tunnel (tests pass their CA). */
  tls?: ConnectionOptions
}): KMSClient {
  const { region, endpoint, credentials, timeoutMs, tunnel, tls } = options
  return new KMSClient({
    region,
    endpoint,
    credentials: credentials.provider,
    ...boundedAwsRequests({ timeoutMs, httpsAgent: tunnel && kmsTunnelAgent({ address: tunnel, tls }) }),
  })
}
