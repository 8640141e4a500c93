import type { Agent } from 'node:https'

/**
 * AWS client settings that bound every request: two attempts, each of which
 * fails when connecting, waiting for the answer's head, or waiting for more
 * of its body takes over `timeoutMs`. A service, or a proxy, that accepts and
 * then goes silent, before its head or in the middle of its body, fails the
 * call rather than hold what waits on it (the smithy handler only warns on a
 * request timeout unless told to throw, and clears that timer once the head
 * is in: the socket timeout covers the body).
 */
export function boundedAwsRequests({ timeoutMs, httpsAgent }: { timeoutMs: number; httpsAgent?: Agent }) {
  return {
    maxAttempts: 2,
    requestHandler: { connectionTimeout: timeoutMs, requestTimeout: timeoutMs, socketTimeout: timeoutMs, throwOnRequestTimeout: true, ...(httpsAgent && { httpsAgent }) },
  }
}
