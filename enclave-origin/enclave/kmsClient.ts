import { KMSClient } from '@aws-sdk/client-kms'
import type { ConnectionOptions } from 'node:tls'
import type { StreamAddress } from '../config.js'
import type { DeliveredCredentials } from './deliveredCredentials.js'
import { kmsTunnelAgent } from './kmsTunnel.js'

/**
 * The enclave's KMS client: credentials as the parent delivers them, each
 * connection through `tunnel` when given (vsock to the parent's vsock-proxy),
 * and every request bounded. Two attempts of at most `timeoutMs` each: a
 * KMS or proxy that accepts and then goes silent fails the call rather than
 * holding the UNLOCK behind it (the smithy handler only warns on a request
 * timeout unless told to throw).
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
    maxAttempts: 2,
    requestHandler: {
      connectionTimeout: timeoutMs,
      requestTimeout: timeoutMs,
      throwOnRequestTimeout: true,
      ...(tunnel && { httpsAgent: kmsTunnelAgent({ address: tunnel, tls }) }),
    },
  })
}
