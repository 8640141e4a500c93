import type { AwsCredentials } from '../protocol/messages.js'

/**
 * The AWS credentials for the enclave's KMS calls. An enclave has no
 * environment to read them from, nor an instance metadata service: the parent
 * delivers them (CREDENTIALS, before every UNLOCK and every few minutes), and
 * the latest delivery is what the next KMS call signs with.
 */
export class DeliveredCredentials {
  private current: AwsCredentials | undefined

  set(credentials: AwsCredentials): void {
    this.current = credentials
  }

  /**
   * For the KMS client's `credentials`. Each answer is marked as expiring now,
   * so that the SDK asks again for every call and never signs with an earlier
   * delivery than the latest.
   */
  readonly provider = async (): Promise<AwsCredentials & { expiration: Date }> => {
    if (!this.current) throw new Error('no AWS credentials yet: the parent delivers them before its first UNLOCK')
    return { ...this.current, expiration: new Date() }
  }
}
