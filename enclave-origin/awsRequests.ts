import type { Agent } from 'node:https'

/**
 * AWS client settings that bound every request: two attempts of at most
 * `timeoutMs` each, to connect and to answer. A service, or a proxy, that
 * accepts and then goes silent fails the call rather than hold what waits on
 * it (the smithy handler only warns on a request timeout unless told to throw).
 */
export function boundedAwsRequests({ timeoutMs, httpsAgent }: { timeoutMs: number; httpsAgent?: Agent }) {
  return {
    maxAttempts: 2,
    requestHandler: { connectionTimeout: timeoutMs, requestTimeout: timeoutMs, throwOnRequestTimeout: true, ...(httpsAgent && { httpsAgent }) },
  }
}
