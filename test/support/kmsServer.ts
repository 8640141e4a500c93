/**
 * A local stand-in for AWS KMS, for tests only. It is NOT AWS and offers none of its guarantees.
 *
 * It speaks KMS's documented wire protocol (AWS JSON 1.1: `POST /`, `X-Amz-Target: TrentService.<Operation>`,
 * `Content-Type: application/x-amz-json-1.1`, JSON bodies with base64 blobs, errors as `{"__type","message"}`),
 * verifies SigV4 request signatures, and does real cryptography: ECDSA over secp256k1 / P-256 (@noble/curves)
 * and AES-256-GCM envelope encryption (node:crypto). So tests can drive the real `@aws-sdk/client-kms` against
 * it and inject faults (throttling, 5xx, hangs, denials, high-s or wrong-key signatures) per key or globally.
 *
 * Operations: CreateKey, DescribeKey, GetPublicKey, Sign, GenerateDataKey, Decrypt.
 *
 * Attested requests (`Recipient`): with `attestationRoots`, the server checks a
 * Nitro attestation document as KMS does (COSE_Sign1 ES384 signature by the
 * document's certificate, chained through its cabundle to a trusted root) and
 * answers `CiphertextForRecipient` (CMS, cmsEnvelope.ts) to the document's
 * public key instead of `Plaintext`. A symmetric key can require it, with a
 * given PCR0, as a key policy with `kms:RecipientAttestation:PCR0` would.
 */
import { createCipheriv, createDecipheriv, createPublicKey, randomBytes, randomUUID, X509Certificate, type KeyObject } from 'node:crypto'
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http'
import type { AddressInfo } from 'node:net'
import { p256 } from '@noble/curves/p256'
import { secp256k1 } from '@noble/curves/secp256k1'
import { AttestationDocumentError, verifyAttestationDocument, type AttestedFields } from '../../enclave-origin/attestationDocument.js'
import { sealForRecipient } from './cmsEnvelope.js'
import { listenLocal, readBody } from './localHttp.js'
import { headerOf, sha256Hex, SigV4Error, verifySigV4, type SigV4Refusal } from './sigV4.js'

export type KmsFault = 'none' | 'throttle' | 'internal-error' | 'hang' | 'access-denied' | 'high-s' | 'wrong-key'
export type LocalKms = {
  url: string // http://127.0.0.1:<port>
  /** With `sessionToken`, as temporary credentials: every request must carry it, signed (X-Amz-Security-Token). */
  credentials: { accessKeyId: string; secretAccessKey: string; region: string; sessionToken?: string }
  /** Creates a secp256k1 signing key (KeySpec ECC_SECG_P256K1), or imports the given 32-byte private key (hex) — "imported key material". Returns the KeyId (a UUID) */
  createKey(options?: { privateKey?: `0x${string}`; keySpec?: 'ECC_SECG_P256K1' | 'ECC_NIST_P256' }): string
  /**
   * Creates a SYMMETRIC_DEFAULT (ENCRYPT_DECRYPT) key, as CreateKey does by default. Returns the KeyId.
   * `recipientPcr0`: the key's policy allows GenerateDataKey and Decrypt only with a valid attestation document of that PCR0.
   */
  createSymmetricKey(options?: { recipientPcr0?: Uint8Array }): string
  /** Sets a fault for every key (or one keyId): subsequent Sign (and GetPublicKey, GenerateDataKey and Decrypt for access-denied/throttle/internal-error/hang) calls misbehave accordingly. */
  setFault(fault: KmsFault, keyId?: string): void
  /** Holds every answer back this long (0: none), as a slow or distant KMS would. */
  setLatency(ms: number): void
  /** Counts of requests per operation, for assertions. */
  calls: Record<string, number>
  stop(): Promise<void>
}

type EcSpec = 'ECC_SECG_P256K1' | 'ECC_NIST_P256'
type KeyRecord = { id: string; created: number } & (
  | { spec: EcSpec; usage: 'SIGN_VERIFY'; origin: 'AWS_KMS' | 'EXTERNAL'; privateKey: Uint8Array }
  | { spec: 'SYMMETRIC_DEFAULT'; usage: 'ENCRYPT_DECRYPT'; origin: 'AWS_KMS'; secret: Buffer; recipientPcr0?: Uint8Array }
)
type Input = Record<string, unknown>

class KmsError extends Error {
  constructor(readonly type: string, message: string, readonly status = 400) {
    super(message)
  }
}

const ACCOUNT = '111122223333'
const HANG = Symbol('hang')
// DER: id-ecPublicKey (1.2.840.10045.2.1) and the named-curve OIDs 1.3.132.0.10 (secp256k1), 1.2.840.10045.3.1.7 (P-256).
const EC_PUBLIC_KEY_OID = '06072a8648ce3d0201'
const CURVES = {
  ECC_SECG_P256K1: { curve: secp256k1, oid: '06052b8104000a' },
  ECC_NIST_P256: { curve: p256, oid: '06082a8648ce3d030107' },
} as const

const tlv = (tag: number, body: Buffer): Buffer => {
  if (body.length > 127) throw new Error('short-form DER lengths only')
  return Buffer.concat([Buffer.from([tag, body.length]), body])
}
/** SubjectPublicKeyInfo: SEQUENCE { SEQUENCE { OID ecPublicKey, OID curve }, BIT STRING 00 04‖X‖Y } */
function spki(spec: EcSpec, privateKey: Uint8Array): Buffer {
  const point = Buffer.from(CURVES[spec].curve.getPublicKey(privateKey, false))
  const algorithm = tlv(0x30, Buffer.from(EC_PUBLIC_KEY_OID + CURVES[spec].oid, 'hex'))
  return tlv(0x30, Buffer.concat([algorithm, tlv(0x03, Buffer.concat([Buffer.from([0]), point]))]))
}

const KMS_REFUSALS: Record<SigV4Refusal, string> = {
  missing: 'MissingAuthenticationTokenException',
  malformed: 'IncompleteSignatureException',
  'unknown-access-key': 'UnrecognizedClientException',
  'bad-token': 'UnrecognizedClientException',
  'bad-signature': 'InvalidSignatureException',
}

/** SigV4 as KMS checks it: the payload hash is the body's, and a declared `x-amz-content-sha256` must match it. */
function verifyKmsSignature(req: IncomingMessage, body: Buffer, creds: LocalKms['credentials']): void {
  const payloadHash = sha256Hex(body)
  const declaredHash = headerOf(req, 'x-amz-content-sha256')
  try {
    if (declaredHash !== undefined && declaredHash !== payloadHash) throw new SigV4Error('bad-signature', 'x-amz-content-sha256 does not match the request body.')
    verifySigV4(req, creds, { service: 'kms', payloadHash })
  } catch (error) {
    if (error instanceof SigV4Error) throw new KmsError(KMS_REFUSALS[error.refusal], error.message)
    throw error
  }
}

/** The attested public key and PCR0 of a Nitro attestation document, checked as KMS checks a `Recipient`. */
function verifyRecipientDocument(document: Buffer, roots: X509Certificate[]): { publicKey: KeyObject; pcr0: Uint8Array | undefined } {
  const invalid = (why: string) => new KmsError('ValidationException', `The attestation document is not valid: ${why}.`)
  let attested: AttestedFields
  try {
    attested = verifyAttestationDocument(document, { roots })
  } catch (error) {
    throw error instanceof AttestationDocumentError ? invalid(error.message) : error
  }
  if (!attested.publicKey) throw invalid('it carries no public_key')
  let publicKey: KeyObject
  try {
    publicKey = createPublicKey({ key: Buffer.from(attested.publicKey), format: 'der', type: 'spki' })
  } catch {
    throw invalid('its public_key is not a DER SubjectPublicKeyInfo')
  }
  if (publicKey.asymmetricKeyType !== 'rsa' || (publicKey.asymmetricKeyDetails?.modulusLength ?? 0) < 2048) throw invalid('its public_key is not an RSA key of at least 2048 bits')
  return { publicKey, pcr0: attested.pcrs.get(0) }
}

export async function startLocalKms(options: { port: number; accessKeyId?: string; secretAccessKey?: string; sessionToken?: string; region?: string; attestationRoots?: string[] }): Promise<LocalKms> {
  const attestationRoots = (options.attestationRoots ?? []).map((pem) => new X509Certificate(pem))
  const credentials = {
    accessKeyId: options.accessKeyId ?? 'AKIALOCALKMSTEST0001',
    secretAccessKey: options.secretAccessKey ?? 'local-kms-test-secret-not-a-real-aws-secret',
    region: options.region ?? 'us-east-1',
    ...(options.sessionToken !== undefined && { sessionToken: options.sessionToken }),
  }
  const keys = new Map<string, KeyRecord>()
  const faults = new Map<string, KmsFault>()
  let globalFault: KmsFault = 'none'
  let latencyMs = 0
  const calls: Record<string, number> = {}

  const arn = (id: string) => `arn:aws:kms:${credentials.region}:${ACCOUNT}:key/${id}`
  const idOf = (keyIdOrArn: string) => (keyIdOrArn.startsWith('arn:') ? keyIdOrArn.slice(keyIdOrArn.lastIndexOf('key/') + 4) : keyIdOrArn)
  const str = (input: Input, field: string): string => {
    const v = input[field]
    if (typeof v !== 'string' || v === '') throw new KmsError('ValidationException', `1 validation error detected: Value at '${field}' failed to satisfy constraint: Member must not be null`)
    return v
  }
  const blob = (input: Input, field: string): Buffer => Buffer.from(str(input, field), 'base64')
  const findKey = (keyIdOrArn: string): KeyRecord => {
    const id = idOf(keyIdOrArn)
    const key = keys.get(id)
    if (!key || (keyIdOrArn.startsWith('arn:') && keyIdOrArn !== arn(id))) throw new KmsError('NotFoundException', `Key '${arn(id)}' does not exist`)
    return key
  }
  const metadata = (k: KeyRecord) => ({
    AWSAccountId: ACCOUNT, KeyId: k.id, Arn: arn(k.id), CreationDate: k.created, Enabled: true, Description: '',
    KeyUsage: k.usage, KeyState: 'Enabled', Origin: k.origin, KeyManager: 'CUSTOMER', CustomerMasterKeySpec: k.spec, KeySpec: k.spec, MultiRegion: false,
    ...(k.usage === 'SIGN_VERIFY' ? { SigningAlgorithms: ['ECDSA_SHA_256'] } : { EncryptionAlgorithms: ['SYMMETRIC_DEFAULT'] }),
  })
  /** Throws or hangs per the injected fault; returns it so Sign can apply 'high-s' / 'wrong-key'. */
  const fault = (key: KeyRecord, op: 'Sign' | 'GetPublicKey' | 'GenerateDataKey' | 'Decrypt'): KmsFault | typeof HANG => {
    const f = faults.get(key.id) ?? globalFault
    if (f === 'throttle') throw new KmsError('ThrottlingException', 'You have exceeded the rate at which you may call KMS. Reduce the frequency of your calls.')
    if (f === 'internal-error') throw new KmsError('KMSInternalException', 'An internal error occurred.', 500)
    if (f === 'access-denied') {
      throw new KmsError('AccessDeniedException', `User: arn:aws:iam::${ACCOUNT}:user/local-test is not authorized to perform: kms:${op} on resource: ${arn(key.id)} because no identity-based policy allows the kms:${op} action`)
    }
    return f === 'hang' ? HANG : f
  }
  // Envelope encryption: blob = 0x01 ‖ KeyId (36 ASCII) ‖ IV (12) ‖ GCM tag (16) ‖ ciphertext; AAD = KeyId ‖ encryption context.
  const aad = (id: string, input: Input) => {
    const context = (input.EncryptionContext ?? {}) as Record<string, unknown>
    if (typeof context !== 'object' || Object.values(context).some((v) => typeof v !== 'string')) throw new KmsError('ValidationException', 'EncryptionContext must map strings to strings')
    return Buffer.from(id + JSON.stringify(Object.entries(context).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))))
  }
  const seal = (key: KeyRecord & { secret: Buffer }, plaintext: Buffer, input: Input): Buffer => {
    const iv = randomBytes(12)
    const cipher = createCipheriv('aes-256-gcm', key.secret, iv).setAAD(aad(key.id, input))
    const ct = Buffer.concat([cipher.update(plaintext), cipher.final()])
    return Buffer.concat([Buffer.from([1]), Buffer.from(key.id, 'ascii'), iv, cipher.getAuthTag(), ct])
  }
  const open = (ciphertext: Buffer, input: Input): { key: KeyRecord; plaintext: Buffer } => {
    const invalid = new KmsError('InvalidCiphertextException', 'The ciphertext is invalid.')
    if (ciphertext.length < 65 || ciphertext[0] !== 1) throw invalid
    const key = keys.get(ciphertext.subarray(1, 37).toString('ascii'))
    if (!key || key.usage !== 'ENCRYPT_DECRYPT') throw invalid
    if (typeof input.KeyId === 'string' && findKey(input.KeyId).id !== key.id) throw new KmsError('IncorrectKeyException', 'The key ID in the request does not identify the KMS key that encrypted the ciphertext.')
    try {
      const decipher = createDecipheriv('aes-256-gcm', key.secret, ciphertext.subarray(37, 49)).setAAD(aad(key.id, input))
      decipher.setAuthTag(ciphertext.subarray(49, 65))
      return { key, plaintext: Buffer.concat([decipher.update(ciphertext.subarray(65)), decipher.final()]) }
    } catch {
      throw invalid
    }
  }
  const addKey = (record: KeyRecord): KeyRecord => (keys.set(record.id, record), record)
  const newEcKey = (spec: EcSpec, privateKey?: Uint8Array) =>
    addKey({ id: randomUUID(), created: Math.floor(Date.now() / 1000), spec, usage: 'SIGN_VERIFY', origin: privateKey ? 'EXTERNAL' : 'AWS_KMS', privateKey: privateKey ?? CURVES[spec].curve.utils.randomPrivateKey() })
  const newSymmetricKey = (recipientPcr0?: Uint8Array) =>
    addKey({ id: randomUUID(), created: Math.floor(Date.now() / 1000), spec: 'SYMMETRIC_DEFAULT', usage: 'ENCRYPT_DECRYPT', origin: 'AWS_KMS', secret: randomBytes(32), recipientPcr0 })
  /**
   * The answer's plaintext field: `Plaintext`, or for an attested request
   * `CiphertextForRecipient` (BER, as KMS sends it) and no plaintext. Enforces
   * a key's PCR0 requirement.
   */
  const release = (key: KeyRecord, plaintext: Buffer, input: Input, op: string) => {
    const recipient = input.Recipient as { AttestationDocument?: unknown; KeyEncryptionAlgorithm?: unknown } | undefined
    const required = key.usage === 'ENCRYPT_DECRYPT' ? key.recipientPcr0 : undefined
    const denied = () => new KmsError('AccessDeniedException', `User: arn:aws:iam::${ACCOUNT}:user/local-test is not authorized to perform: kms:${op} on resource: ${arn(key.id)} because the key policy requires an attested recipient with another PCR0`)
    if (recipient === undefined) {
      if (required) throw denied()
      return { Plaintext: plaintext.toString('base64') }
    }
    if (recipient.KeyEncryptionAlgorithm !== 'RSAES_OAEP_SHA_256') throw new KmsError('ValidationException', 'Recipient.KeyEncryptionAlgorithm must be RSAES_OAEP_SHA_256')
    if (typeof recipient.AttestationDocument !== 'string' || recipient.AttestationDocument === '') throw new KmsError('ValidationException', 'Recipient.AttestationDocument is required')
    const attested = verifyRecipientDocument(Buffer.from(recipient.AttestationDocument, 'base64'), attestationRoots)
    if (required && !(attested.pcr0 && Buffer.from(attested.pcr0).equals(Buffer.from(required)))) throw denied()
    return { CiphertextForRecipient: sealForRecipient(plaintext, attested.publicKey, { ber: true }).toString('base64') }
  }

  const operations: Record<string, (input: Input) => object | typeof HANG> = {
    CreateKey(input) {
      const spec = input.KeySpec ?? input.CustomerMasterKeySpec ?? 'SYMMETRIC_DEFAULT'
      if ((input.Origin ?? 'AWS_KMS') !== 'AWS_KMS') throw new KmsError('UnsupportedOperationException', 'Only Origin AWS_KMS is supported by this local KMS.')
      if (spec === 'SYMMETRIC_DEFAULT' && (input.KeyUsage ?? 'ENCRYPT_DECRYPT') === 'ENCRYPT_DECRYPT') return { KeyMetadata: metadata(newSymmetricKey()) }
      if ((spec === 'ECC_SECG_P256K1' || spec === 'ECC_NIST_P256') && input.KeyUsage === 'SIGN_VERIFY') return { KeyMetadata: metadata(newEcKey(spec)) }
      throw new KmsError('ValidationException', `Unsupported KeySpec/KeyUsage combination: ${String(spec)}/${String(input.KeyUsage)}`)
    },
    DescribeKey: (input) => ({ KeyMetadata: metadata(findKey(str(input, 'KeyId'))) }),
    GetPublicKey(input) {
      const key = findKey(str(input, 'KeyId'))
      if (key.usage !== 'SIGN_VERIFY') throw new KmsError('UnsupportedOperationException', `${arn(key.id)} key usage is ENCRYPT_DECRYPT, which has no public key.`)
      if (fault(key, 'GetPublicKey') === HANG) return HANG
      return { KeyId: arn(key.id), PublicKey: spki(key.spec, key.privateKey).toString('base64'), CustomerMasterKeySpec: key.spec, KeySpec: key.spec, KeyUsage: key.usage, SigningAlgorithms: ['ECDSA_SHA_256'] }
    },
    Sign(input) {
      const key = findKey(str(input, 'KeyId'))
      const f = fault(key, 'Sign')
      if (f === HANG) return HANG
      if (key.usage !== 'SIGN_VERIFY' || str(input, 'SigningAlgorithm') !== 'ECDSA_SHA_256') {
        throw new KmsError('InvalidKeyUsageException', `${arn(key.id)} key usage is ${key.usage} and supports only ECDSA_SHA_256 signing.`)
      }
      const digest = blob(input, 'Message')
      if (input.MessageType !== 'DIGEST') throw new KmsError('ValidationException', 'This local KMS signs only MessageType DIGEST.')
      if (digest.length !== 32) throw new KmsError('ValidationException', 'Digest is invalid length for algorithm ECDSA_SHA_256.')
      const { curve } = CURVES[key.spec]
      const signed = curve.sign(digest, f === 'wrong-key' ? curve.utils.randomPrivateKey() : key.privateKey)
      const sig = f === 'high-s' && !signed.hasHighS() ? new curve.Signature(signed.r, curve.CURVE.n - signed.s) : signed
      return { KeyId: arn(key.id), Signature: Buffer.from(sig.toDERRawBytes()).toString('base64'), SigningAlgorithm: 'ECDSA_SHA_256' }
    },
    GenerateDataKey(input) {
      const key = findKey(str(input, 'KeyId'))
      if (key.usage !== 'ENCRYPT_DECRYPT') throw new KmsError('InvalidKeyUsageException', `${arn(key.id)} key usage is SIGN_VERIFY which is not valid for GenerateDataKey.`)
      if (fault(key, 'GenerateDataKey') === HANG) return HANG
      const bySpec = input.KeySpec === 'AES_256' ? 32 : input.KeySpec === 'AES_128' ? 16 : undefined
      const n = input.NumberOfBytes
      const length = bySpec ?? (typeof n === 'number' && Number.isInteger(n) && n >= 1 && n <= 1024 ? n : undefined)
      if (length === undefined || (bySpec !== undefined && n !== undefined)) throw new KmsError('ValidationException', 'Specify exactly one of KeySpec (AES_256 | AES_128) or NumberOfBytes (1-1024).')
      const plaintext = randomBytes(length)
      return { KeyId: arn(key.id), ...release(key, plaintext, input, 'GenerateDataKey'), CiphertextBlob: seal(key, plaintext, input).toString('base64') }
    },
    Decrypt(input) {
      const { key, plaintext } = open(blob(input, 'CiphertextBlob'), input)
      if (fault(key, 'Decrypt') === HANG) return HANG
      return { KeyId: arn(key.id), ...release(key, plaintext, input, 'Decrypt'), EncryptionAlgorithm: 'SYMMETRIC_DEFAULT' }
    },
  }

  const send = (res: ServerResponse, status: number, body: object) => {
    const json = JSON.stringify(body)
    res.writeHead(status, { 'content-type': 'application/x-amz-json-1.1', 'content-length': Buffer.byteLength(json), 'x-amzn-requestid': randomUUID() })
    res.end(json)
  }
  const handle = async (req: IncomingMessage, res: ServerResponse) => {
    const body = await readBody(req)
    const target = headerOf(req, 'x-amz-target') ?? ''
    const op = target.startsWith('TrentService.') ? target.slice('TrentService.'.length) : target || '(none)'
    calls[op] = (calls[op] ?? 0) + 1
    if (latencyMs > 0) await new Promise((resolve) => setTimeout(resolve, latencyMs))
    try {
      verifyKmsSignature(req, body, credentials)
      const operation = Object.hasOwn(operations, op) && target.startsWith('TrentService.') ? operations[op] : undefined
      if (req.method !== 'POST' || !operation) throw new KmsError('UnknownOperationException', `Unknown operation ${target}`)
      if (!(headerOf(req, 'content-type') ?? '').startsWith('application/x-amz-json-1.1')) throw new KmsError('SerializationException', 'Expected Content-Type application/x-amz-json-1.1')
      let input: unknown
      try {
        input = JSON.parse(body.length ? body.toString('utf8') : '{}')
      } catch {
        throw new KmsError('SerializationException', 'Request body is not valid JSON')
      }
      if (typeof input !== 'object' || input === null || Array.isArray(input)) throw new KmsError('SerializationException', 'Request body must be a JSON object')
      const result = operation(input as Input)
      if (result !== HANG) send(res, 200, result) // on HANG: never answer; stop() closes the connection.
    } catch (e) {
      if (e instanceof KmsError) send(res, e.status, { __type: e.type, message: e.message })
      else send(res, 500, { __type: 'KMSInternalException', message: e instanceof Error ? e.message : String(e) })
    }
  }

  const server = createServer((req, res) => void handle(req, res).catch(() => res.destroy()))
  const stop = await listenLocal(server, options.port)

  return {
    // The port bound: 0 asks the system for a free one.
    url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
    credentials,
    calls,
    createKey(opts) {
      const spec = opts?.keySpec ?? 'ECC_SECG_P256K1'
      if (opts?.privateKey === undefined) return newEcKey(spec).id
      const material = Buffer.from(opts.privateKey.slice(2), 'hex')
      if (!/^0x[0-9a-fA-F]{64}$/.test(opts.privateKey) || !CURVES[spec].curve.utils.isValidPrivateKey(material)) throw new Error(`createKey: not a valid ${spec} private key`)
      return newEcKey(spec, new Uint8Array(material)).id
    },
    createSymmetricKey: (opts) => newSymmetricKey(opts?.recipientPcr0).id,
    setLatency(ms) {
      latencyMs = ms
    },
    setFault(f, keyId) {
      if (keyId === undefined) {
        globalFault = f
        faults.clear()
      } else faults.set(idOf(keyId), f)
    },
    stop,
  }
}
