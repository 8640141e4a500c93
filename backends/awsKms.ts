import { GetPublicKeyCommand, KMSClient, SignCommand } from '@aws-sdk/client-kms'
import { hexToBytes, type Address, type Hex } from 'viem'
import { addressFromSpki, parseDerSignature, toEthereumSignature } from './ecdsa.js'
import { SharedLoad } from './sharedLoad.js'
import { deadlineSignal, healthOf, SignerError, stoppedForCaller, type SignedDigest, type Signer, type SignerDescription, type SignOptions } from './signer.js'

export type AwsKmsSignerOptions = {
  name: string
  keyId: string
  region: string
  /** Overrides the regional endpoint (VPC endpoints, or the local test server). */
  endpoint?: string
  /** From Worker secrets; undefined when a secret is not set. */
  credentials: { accessKeyId: string | undefined; secretAccessKey: string | undefined; sessionToken?: string | undefined }
  /** Everything one signature may take, retries included. */
  deadlineMs: number
  /** Attempts per call for throttling and 5xx (the SDK's standard retry with backoff). */
  maxAttempts: number
}

/**
 * A key in AWS KMS (key spec ECC_SECG_P256K1), used with the real
 * @aws-sdk/client-kms. The address comes from GetPublicKey once (cached);
 * Sign (MessageType DIGEST, ECDSA_SHA_256) answers DER, which becomes a
 * 65-byte low-s Ethereum signature whose v is found by recovery. Key
 * material imported into KMS behaves the same.
 */
export class AwsKmsSigner implements Signer {
  private readonly client: KMSClient | undefined
  private readonly setupError: SignerError | undefined
  private readonly cachedAddress: SharedLoad<Address>

  constructor(private readonly options: AwsKmsSignerOptions) {
    // Its GetPublicKey ends within deadlineMs, unless workerd dropped it with the request that started it.
    this.cachedAddress = new SharedLoad({ load: () => this.lookUpAddress(), abandonAfterMs: options.deadlineMs + 1_000, keepMs: Infinity, what: `${options.name}: GetPublicKey` })
    const { accessKeyId, secretAccessKey, sessionToken } = options.credentials
    if (!accessKeyId || !secretAccessKey) {
      this.setupError = new SignerError(`AWS KMS signer ${options.name}: AWS credentials are not set (access key id and secret access key secrets)`)
      return
    }
    this.client = new KMSClient({
      region: options.region,
      endpoint: options.endpoint,
      credentials: { accessKeyId, secretAccessKey, sessionToken },
      maxAttempts: options.maxAttempts,
    })
  }

  async address(): Promise<Address> {
    return this.cachedAddress.get()
  }

  private async lookUpAddress(): Promise<Address> {
    // Its own deadline, not a caller's: the callers that share it each stop waiting on theirs.
    const answer = await this.call((client, abortSignal) => client.send(new GetPublicKeyCommand({ KeyId: this.options.keyId }), { abortSignal }), deadlineSignal(this.options.deadlineMs, undefined))
    if (answer.KeySpec !== 'ECC_SECG_P256K1') {
      throw new SignerError(`KMS key ${this.options.keyId} has key spec ${answer.KeySpec}; Ethereum needs ECC_SECG_P256K1`)
    }
    if (!answer.PublicKey) throw new SignerError(`KMS returned no public key for ${this.options.keyId}`)
    return addressFromSpki(answer.PublicKey)
  }

  async signDigest(digest: Hex, options?: SignOptions): Promise<SignedDigest> {
    // One deadline for the whole signature: a cold signer's wait for its address and its Sign share it.
    const deadline = deadlineSignal(this.options.deadlineMs, options?.signal)
    let address: Address
    try {
      address = await this.cachedAddress.get(deadline)
    } catch (error) {
      throw this.explain(error, deadline, options?.signal)
    }
    const answer = await this.call(
      (client, abortSignal) =>
        client.send(
          new SignCommand({ KeyId: this.options.keyId, Message: hexToBytes(digest), MessageType: 'DIGEST', SigningAlgorithm: 'ECDSA_SHA_256' }),
          { abortSignal },
        ),
      deadline,
      options?.signal,
    )
    if (!answer.Signature) throw new SignerError(`KMS returned no signature for ${this.options.keyId}`, { retryable: true })
    const { r, s } = parseDerSignature(answer.Signature)
    return { signature: await toEthereumSignature({ r, s, digest, address }), signedBy: this.options.name, address }
  }

  /** One KMS call, aborted by `deadline`; its failures translated into errors an operator can act on. */
  private async call<T>(send: (client: KMSClient, abortSignal: AbortSignal) => Promise<T>, deadline: AbortSignal, callerSignal?: AbortSignal): Promise<T> {
    if (!this.client) throw this.setupError!
    try {
      return await send(this.client, deadline)
    } catch (error) {
      throw this.explain(error, deadline, callerSignal)
    }
  }

  /** `deadline` aborted: the time ran out, or (`callerSignal` aborted) the caller stopped waiting. */
  private explain(error: unknown, deadline: AbortSignal, callerSignal: AbortSignal | undefined): SignerError {
    if (callerSignal?.aborted) return stoppedForCaller(`AWS KMS signer ${this.options.name}`)
    if (deadline.aborted) return new SignerError(`${this.options.name}: AWS KMS did not answer within ${this.options.deadlineMs} ms`, { retryable: true })
    if (error instanceof SignerError) return error
    const name = (error as { name?: string }).name ?? ''
    const status = (error as { $metadata?: { httpStatusCode?: number } }).$metadata?.httpStatusCode ?? 0
    const key = this.options.keyId
    const known: Record<string, [string, boolean]> = {
      AccessDeniedException: [`AWS KMS denied access to key ${key} (check the key policy and the IAM permissions for kms:Sign and kms:GetPublicKey)`, false],
      UnrecognizedClientException: ['AWS KMS did not recognise the credentials', false],
      InvalidSignatureException: ['AWS KMS rejected the request signature (check the secret access key)', false],
      NotFoundException: [`KMS key ${key} does not exist in ${this.options.region}`, false],
      DisabledException: [`KMS key ${key} is disabled`, false],
      KMSInvalidStateException: [`KMS key ${key} is not usable in its current state (disabled or pending deletion)`, false],
      InvalidKeyUsageException: [`KMS key ${key} is not a SIGN_VERIFY key for ECDSA_SHA_256`, false],
      ThrottlingException: ['AWS KMS is throttling requests', true],
    }
    const [message, retryable] = known[name] ?? [status >= 500 || status === 0 ? `AWS KMS is unavailable (${name || 'network error'})` : `AWS KMS refused the request (${name})`, status >= 500 || status === 0]
    return new SignerError(`${this.options.name}: ${message}`, { retryable })
  }

  health() {
    return healthOf(this)
  }

  describe(): SignerDescription {
    return { kind: 'aws-kms', name: this.options.name, securityLevel: 'hsm' }
  }
}
