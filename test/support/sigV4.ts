import { createHash, createHmac, timingSafeEqual } from 'node:crypto'
import type { IncomingMessage } from 'node:http'

/** SigV4 request-signature checks shared by the local AWS stand-ins (KMS, S3). */

export type SigV4Credentials = { accessKeyId: string; secretAccessKey: string; region: string; sessionToken?: string }

/** Why a request's signature was refused; each server names these in its own service's error codes. */
export type SigV4Refusal = 'missing' | 'malformed' | 'unknown-access-key' | 'bad-token' | 'bad-signature'

export class SigV4Error extends Error {
  constructor(
    readonly refusal: SigV4Refusal,
    message: string,
  ) {
    super(message)
  }
}

export const sha256Hex = (data: string | Buffer) => createHash('sha256').update(data).digest('hex')
const hmac = (key: Buffer | string, data: string) => createHmac('sha256', key).update(data).digest()
const rfc3986 = (s: string) => encodeURIComponent(s).replace(/[!'()*]/g, (c) => `%${c.charCodeAt(0).toString(16).toUpperCase()}`)

export const headerOf = (req: IncomingMessage, name: string): string | undefined => {
  const value = req.headers[name]
  return Array.isArray(value) ? value.join(',') : value
}

/**
 * SigV4 (header form) for `service`: checks shape, access key id, region, date
 * skew and session token, then recomputes the signature. `payloadHash` is what
 * the canonical request carries (S3 takes it from `x-amz-content-sha256`).
 * S3 signs the path as sent; other services encode the sent path once more.
 */
export function verifySigV4(req: IncomingMessage, credentials: SigV4Credentials, { service, payloadHash }: { service: string; payloadHash: string }): void {
  const auth = headerOf(req, 'authorization')
  const amzDate = headerOf(req, 'x-amz-date')
  if (!auth) throw new SigV4Error('missing', 'Missing Authentication Token')
  const shape = new RegExp(`^AWS4-HMAC-SHA256 Credential=([^/\\s,]+)/(\\d{8})/([^/\\s,]+)/${service}/aws4_request, ?SignedHeaders=([a-z0-9;-]+), ?Signature=([0-9a-f]{64})$`)
  const m = shape.exec(auth)
  if (!m || !amzDate || !/^\d{8}T\d{6}Z$/.test(amzDate)) throw new SigV4Error('malformed', 'Authorization header or X-Amz-Date is malformed')
  const [, accessKeyId, day = '', region = '', signedHeaders = '', signature = ''] = m
  if (accessKeyId !== credentials.accessKeyId) throw new SigV4Error('unknown-access-key', 'The security token included in the request is invalid.')
  if (region !== credentials.region) throw new SigV4Error('bad-signature', `Credential should be scoped to a valid region, not '${region}'.`)
  if (day !== amzDate.slice(0, 8)) throw new SigV4Error('bad-signature', 'Credential date does not match X-Amz-Date.')
  const at = Date.parse(amzDate.replace(/^(\d{4})(\d\d)(\d\d)T(\d\d)(\d\d)(\d\d)Z$/, '$1-$2-$3T$4:$5:$6Z'))
  // AWS allows five minutes of clock skew.
  if (!(Math.abs(Date.now() - at) <= 5 * 60_000)) throw new SigV4Error('bad-signature', `Signature expired: ${amzDate}`)
  const names = signedHeaders.split(';')
  if (!names.includes('host') || !names.includes('x-amz-date')) throw new SigV4Error('malformed', 'The host and x-amz-date headers must be signed.')
  if (credentials.sessionToken !== undefined && (headerOf(req, 'x-amz-security-token') !== credentials.sessionToken || !names.includes('x-amz-security-token'))) {
    throw new SigV4Error('bad-token', 'The security token included in the request is invalid.')
  }
  const [rawPath = '/', rawQuery = ''] = (req.url ?? '/').split('?', 2)
  const query = [...new URLSearchParams(rawQuery)]
    .map(([k, v]) => [rfc3986(k), rfc3986(v)] as const)
    .sort(([ak, av], [bk, bv]) => (ak < bk ? -1 : ak > bk ? 1 : av < bv ? -1 : av > bv ? 1 : 0))
    .map(([k, v]) => `${k}=${v}`)
    .join('&')
  const canonicalHeaders = names.map((n) => `${n}:${(headerOf(req, n) ?? '').trim().replace(/\s+/g, ' ')}\n`).join('')
  const path = service === 's3' ? rawPath : encodeURIComponent(rawPath).replace(/%2F/g, '/')
  const canonicalRequest = [req.method, path, query, canonicalHeaders, signedHeaders, payloadHash].join('\n')
  const scope = `${day}/${region}/${service}/aws4_request`
  const stringToSign = ['AWS4-HMAC-SHA256', amzDate, scope, sha256Hex(canonicalRequest)].join('\n')
  const kSigning = [service, 'aws4_request'].reduce(hmac, hmac(hmac(`AWS4${credentials.secretAccessKey}`, day), region))
  if (!timingSafeEqual(hmac(kSigning, stringToSign), Buffer.from(signature, 'hex'))) {
    throw new SigV4Error('bad-signature', 'The request signature we calculated does not match the signature you provided.')
  }
}
