/**
 * A local stand-in for Amazon S3, for tests only. It is NOT AWS and offers none of its guarantees.
 *
 * It speaks the part of S3's documented REST protocol the parent's blob store
 * uses, path-style (`/<bucket>/<key>`): CreateBucket, DeleteBucket,
 * ListObjectsV2 (prefix, max-keys, continuation tokens), GetObject, HeadObject
 * and PutObject with conditional writes (`If-None-Match: *`, `If-Match:
 * <etag>`, evaluated when the write commits, as S3 does). Requests must carry
 * a valid SigV4 signature (service `s3`, `x-amz-content-sha256` checked
 * against the body), and a declared CRC32 or Content-MD5 is checked too.
 * Errors are S3's XML `<Error><Code>…</Code>` bodies with S3's codes and
 * statuses. ETags are the MD5 of the body, as S3's are for a single-part,
 * unencrypted object.
 *
 * Tests can hold the writes to one object: each is parked, unanswered and not
 * committed, until the test releases it, which commits it then, conditions
 * checked against what the object is at that moment. That is a write S3
 * received and the client gave up on, landing later.
 */
import { createHash, randomUUID } from 'node:crypto'
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http'
import type { AddressInfo } from 'node:net'
import { crc32 } from 'node:zlib'
import { listenLocal, readBody } from './localHttp.js'
import { headerOf, sha256Hex, SigV4Error, verifySigV4, type SigV4Credentials, type SigV4Refusal } from './sigV4.js'

export type LocalS3 = {
  url: string // http://127.0.0.1:<port>
  credentials: SigV4Credentials
  /**
   * Parks every PutObject to `bucket`/`key` from now on, unanswered and not
   * committed, until `release`. `parked` counts those waiting; `stopHolding`
   * lets later writes through and keeps the parked ones parked; `release`
   * stops holding, commits the parked ones in arrival order, answers
   * whichever clients still wait, and returns the status each commit got
   * (200, or 412 / 404 for a condition the object no longer meets).
   * `conflictWhileParked`: a write that arrives while one is parked is
   * answered 409 ConditionalRequestConflict instead, as S3 answers a write
   * while another of the object is under way.
   */
  holdWrites(bucket: string, key: string, options?: { conflictWhileParked?: boolean }): { parked(): number; stopHolding(): void; release(): number[] }
  stop(): Promise<void>
}

type StoredObject = { body: Buffer; etag: string; lastModified: Date; crc32?: string }
type Bucket = Map<string, StoredObject>
/** A PutObject checked and ready to commit: `commit` checks its conditions against the object then, stores it and returns its ETag. */
type PendingPut = { commit: () => string }

class S3Error extends Error {
  constructor(
    readonly code: string,
    message: string,
    readonly status: number,
  ) {
    super(message)
  }
}

const S3_REFUSALS: Record<SigV4Refusal, { code: string; status: number }> = {
  missing: { code: 'AccessDenied', status: 403 },
  malformed: { code: 'AuthorizationHeaderMalformed', status: 400 },
  'unknown-access-key': { code: 'InvalidAccessKeyId', status: 403 },
  'bad-token': { code: 'InvalidToken', status: 400 },
  'bad-signature': { code: 'SignatureDoesNotMatch', status: 403 },
}

const MAX_KEYS = 1000
const xmlEscape = (text: string) => text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`)
const crc32Base64 = (body: Buffer) => {
  const digest = Buffer.alloc(4)
  digest.writeUInt32BE(crc32(body))
  return digest.toString('base64')
}
/** S3 lists keys in the binary order of their UTF-8 bytes. */
const byUtf8 = (a: string, b: string) => Buffer.compare(Buffer.from(a, 'utf8'), Buffer.from(b, 'utf8'))

export async function startLocalS3(options: { port?: number; buckets?: string[]; accessKeyId?: string; secretAccessKey?: string; region?: string } = {}): Promise<LocalS3> {
  const credentials: SigV4Credentials = {
    accessKeyId: options.accessKeyId ?? 'LOCALS3TESTKEY',
    secretAccessKey: options.secretAccessKey ?? 'local-s3-test-secret',
    region: options.region ?? 'us-east-1',
  }
  const buckets = new Map<string, Bucket>((options.buckets ?? []).map((name) => [name, new Map()]))
  /** Per held object, the answers of the writes parked there (each commits its write and answers it, returning the status). */
  const holds = new Map<string, { parked: Array<() => number>; conflictWhileParked: boolean }>()
  const holdName = (bucket: string, key: string) => `${bucket}/${key}`

  const bucketNamed = (name: string): Bucket => {
    const bucket = buckets.get(name)
    if (!bucket) throw new S3Error('NoSuchBucket', 'The specified bucket does not exist', 404)
    return bucket
  }

  const sendXml = (res: ServerResponse, status: number, xml: string, head: boolean) => {
    const body = `<?xml version="1.0" encoding="UTF-8"?>\n${xml}`
    res.writeHead(status, { 'content-type': 'application/xml', 'content-length': Buffer.byteLength(body), 'x-amz-request-id': randomUUID() })
    res.end(head ? undefined : body)
  }

  const verify = (req: IncomingMessage, body: Buffer) => {
    const declared = headerOf(req, 'x-amz-content-sha256')
    try {
      if (declared === undefined) throw new SigV4Error('malformed', 'Missing required header for this request: x-amz-content-sha256')
      if (declared.startsWith('STREAMING-')) throw new S3Error('NotImplemented', 'Chunked (streaming) uploads are not implemented by this server', 501)
      if (declared !== 'UNSIGNED-PAYLOAD' && declared !== sha256Hex(body)) {
        throw new S3Error('XAmzContentSHA256Mismatch', 'The provided x-amz-content-sha256 header does not match what was computed.', 400)
      }
      verifySigV4(req, credentials, { service: 's3', payloadHash: declared })
    } catch (error) {
      if (error instanceof SigV4Error) throw new S3Error(S3_REFUSALS[error.refusal].code, error.message, S3_REFUSALS[error.refusal].status)
      throw error
    }
  }

  const listObjectsV2 = (res: ServerResponse, name: string, query: URLSearchParams) => {
    const bucket = bucketNamed(name)
    if (query.get('list-type') !== '2') throw new S3Error('NotImplemented', 'Only ListObjectsV2 (list-type=2) is implemented by this server', 501)
    if (query.has('encoding-type') || query.has('delimiter')) throw new S3Error('NotImplemented', 'encoding-type and delimiter are not implemented by this server', 501)
    const prefix = query.get('prefix') ?? ''
    const maxKeysText = query.get('max-keys') ?? String(MAX_KEYS)
    if (!/^\d+$/.test(maxKeysText)) throw new S3Error('InvalidArgument', 'Provided max-keys not an integer or within integer range', 400)
    const maxKeys = Math.min(Number(maxKeysText), MAX_KEYS)
    const token = query.get('continuation-token')
    let after = query.get('start-after') ?? ''
    if (token !== null) {
      after = Buffer.from(token, 'base64url').toString('utf8')
      if (token.length === 0 || Buffer.from(after, 'utf8').toString('base64url') !== token) throw new S3Error('InvalidArgument', 'The continuation token provided is incorrect', 400)
    }
    const matching = [...bucket.keys()].filter((key) => key.startsWith(prefix) && byUtf8(key, after) > 0).sort(byUtf8)
    const page = matching.slice(0, maxKeys)
    const truncated = matching.length > page.length
    const contents = page
      .map((key) => {
        const object = bucket.get(key)!
        return `<Contents><Key>${xmlEscape(key)}</Key><LastModified>${object.lastModified.toISOString()}</LastModified><ETag>${xmlEscape(object.etag)}</ETag><Size>${object.body.length}</Size><StorageClass>STANDARD</StorageClass></Contents>`
      })
      .join('')
    const next = truncated ? `<NextContinuationToken>${Buffer.from(page.at(-1)!, 'utf8').toString('base64url')}</NextContinuationToken>` : ''
    const echoed = token !== null ? `<ContinuationToken>${xmlEscape(token)}</ContinuationToken>` : ''
    sendXml(
      res,
      200,
      `<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>${xmlEscape(name)}</Name><Prefix>${xmlEscape(prefix)}</Prefix>` +
        `<KeyCount>${page.length}</KeyCount><MaxKeys>${maxKeys}</MaxKeys><IsTruncated>${truncated}</IsTruncated>${echoed}${next}${contents}</ListBucketResult>`,
      false,
    )
  }

  const getObject = (req: IncomingMessage, res: ServerResponse, name: string, key: string) => {
    const object = bucketNamed(name).get(key)
    if (!object) throw new S3Error('NoSuchKey', 'The specified key does not exist.', 404)
    const headers: Record<string, string | number> = {
      'content-type': 'application/octet-stream',
      'content-length': object.body.length,
      etag: object.etag,
      'last-modified': object.lastModified.toUTCString(),
      'x-amz-request-id': randomUUID(),
    }
    if (object.crc32 !== undefined && headerOf(req, 'x-amz-checksum-mode') === 'ENABLED') headers['x-amz-checksum-crc32'] = object.crc32
    res.writeHead(200, headers)
    res.end(req.method === 'HEAD' ? undefined : object.body)
  }

  /** Checks the body and the conditions' shape now; the conditions themselves when `commit` runs. */
  const putObject = (req: IncomingMessage, body: Buffer, name: string, key: string): PendingPut => {
    bucketNamed(name)
    const declaredCrc32 = headerOf(req, 'x-amz-checksum-crc32')
    if (declaredCrc32 !== undefined && declaredCrc32 !== crc32Base64(body)) {
      throw new S3Error('BadDigest', 'The CRC32 you specified did not match the calculated checksum.', 400)
    }
    const contentMd5 = headerOf(req, 'content-md5')
    const md5Bytes = createHash('md5').update(body).digest()
    if (contentMd5 !== undefined && contentMd5 !== md5Bytes.toString('base64')) throw new S3Error('BadDigest', 'The Content-MD5 you specified did not match what we received.', 400)
    const ifMatch = headerOf(req, 'if-match')
    const ifNoneMatch = headerOf(req, 'if-none-match')
    if (ifNoneMatch !== undefined && ifNoneMatch !== '*') throw new S3Error('NotImplemented', 'If-None-Match on a write takes only *', 501)
    if (ifMatch !== undefined && ifNoneMatch !== undefined) throw new S3Error('InvalidRequest', 'If-Match and If-None-Match cannot both be given', 400)
    const etag = `"${md5Bytes.toString('hex')}"`
    return {
      commit: () => {
        const bucket = bucketNamed(name)
        const current = bucket.get(key)
        if (ifNoneMatch === '*' && current) throw new S3Error('PreconditionFailed', 'At least one of the pre-conditions you specified did not hold', 412)
        if (ifMatch !== undefined && !current) throw new S3Error('NoSuchKey', 'The specified key does not exist.', 404)
        if (ifMatch !== undefined && current!.etag !== ifMatch) throw new S3Error('PreconditionFailed', 'At least one of the pre-conditions you specified did not hold', 412)
        bucket.set(key, { body, etag, lastModified: new Date(), crc32: declaredCrc32 })
        return etag
      },
    }
  }

  /** Commits the write and answers it, if its client still waits; returns the status. */
  const answerPut = (res: ServerResponse, pending: PendingPut): number => {
    try {
      const etag = pending.commit()
      if (!res.destroyed) {
        res.writeHead(200, { etag, 'content-length': 0, 'x-amz-request-id': randomUUID() })
        res.end()
      }
      return 200
    } catch (error) {
      if (!(error instanceof S3Error)) throw error
      if (!res.destroyed) sendError(res, error, false)
      return error.status
    }
  }

  const sendError = (res: ServerResponse, error: S3Error, head: boolean) =>
    sendXml(res, error.status, `<Error><Code>${error.code}</Code><Message>${xmlEscape(error.message)}</Message><RequestId>${randomUUID()}</RequestId></Error>`, head)

  const handle = async (req: IncomingMessage, res: ServerResponse) => {
    const body = await readBody(req)
    const head = req.method === 'HEAD'
    try {
      verify(req, body)
      const [rawPath = '/', rawQuery = ''] = (req.url ?? '/').split('?', 2)
      const query = new URLSearchParams(rawQuery)
      const [, rawBucket = '', ...rawKey] = rawPath.split('/')
      const name = decodeURIComponent(rawBucket)
      const key = decodeURIComponent(rawKey.join('/'))
      if (name.length === 0) throw new S3Error('NotImplemented', 'ListBuckets is not implemented by this server', 501)
      if (key.length === 0) {
        if (req.method === 'PUT') {
          if (!buckets.has(name)) buckets.set(name, new Map())
          res.writeHead(200, { location: `/${name}`, 'content-length': 0 })
          return void res.end()
        }
        if (req.method === 'DELETE') {
          if (bucketNamed(name).size > 0) throw new S3Error('BucketNotEmpty', 'The bucket you tried to delete is not empty', 409)
          buckets.delete(name)
          res.writeHead(204)
          return void res.end()
        }
        if (req.method === 'GET') return listObjectsV2(res, name, query)
        throw new S3Error('MethodNotAllowed', 'The specified method is not allowed against this resource.', 405)
      }
      if (req.method === 'GET' || head) return getObject(req, res, name, key)
      if (req.method === 'PUT') {
        const pending = putObject(req, body, name, key)
        const hold = holds.get(holdName(name, key))
        if (hold?.conflictWhileParked && hold.parked.length > 0) {
          throw new S3Error('ConditionalRequestConflict', 'The conditional request cannot succeed due to a conflicting operation against this resource.', 409)
        }
        if (hold) return void hold.parked.push(() => answerPut(res, pending))
        return void answerPut(res, pending)
      }
      throw new S3Error('MethodNotAllowed', 'The specified method is not allowed against this resource.', 405)
    } catch (error) {
      if (error instanceof S3Error) sendError(res, error, head)
      else sendError(res, new S3Error('InternalError', error instanceof Error ? error.message : String(error), 500), head)
    }
  }

  const server = createServer((req, res) => void handle(req, res).catch(() => res.destroy()))
  const stop = await listenLocal(server, options.port ?? 0)
  return {
    url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
    credentials,
    holdWrites(bucket, key, { conflictWhileParked = false } = {}) {
      const hold = { parked: [] as Array<() => number>, conflictWhileParked }
      const { parked } = hold
      holds.set(holdName(bucket, key), hold)
      const stopHolding = () => {
        if (holds.get(holdName(bucket, key)) === hold) holds.delete(holdName(bucket, key))
      }
      return {
        parked: () => parked.length,
        stopHolding,
        release: () => {
          stopHolding()
          return parked.splice(0).map((answer) => answer())
        },
      }
    },
    stop,
  }
}
