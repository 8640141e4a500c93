import { constants, createDecipheriv, privateDecrypt, type Decipher, type KeyObject } from 'node:crypto'
import { secretBytes } from './sealing.js'

/**
 * Opens the `CiphertextForRecipient` that KMS answers instead of `Plaintext`
 * when a request carries a Nitro attestation document: a CMS (RFC 5652)
 * ContentInfo holding EnvelopedData, whose content key is wrapped with
 * RSAES-OAEP-SHA-256 to the public key in the document and whose content is
 * encrypted with AES-256-CBC. KMS encodes it in BER with indefinite lengths,
 * so this reads BER, not only DER. Only that one shape is accepted; anything
 * else is refused with a message naming what was wrong.
 */

export class CmsError extends Error {}

const oids = {
  envelopedData: '1.2.840.113549.1.7.3',
  rsaesOaep: '1.2.840.113549.1.1.7',
  mgf1: '1.2.840.113549.1.1.8',
  sha256: '2.16.840.1.101.3.4.2.1',
  aes256Cbc: '2.16.840.1.101.3.4.1.42',
} as const

const tags = { integer: 0x02, octetString: 0x04, oid: 0x06, sequence: 0x30, set: 0x31 } as const

/**
 * One BER element: its identifier octet and its content octets (for indefinite lengths, without the
 * end-of-contents), and how deep in the envelope it lies.
 */
type Element = { tag: number; constructed: boolean; content: Uint8Array; end: number; depth: number }

/**
 * Deeper than any valid envelope nests (its OIDs lie at depth 10): a bound on every way in, children and OCTET
 * STRING segments alike, so hostile input cannot exhaust the stack.
 */
const maxDepth = 16

function readElement(bytes: Uint8Array, at: number, depth = 0): Element {
  if (depth > maxDepth) throw new CmsError('BER nested too deeply')
  if (at + 2 > bytes.length) throw new CmsError('BER element truncated')
  const tag = bytes[at]!
  if ((tag & 0x1f) === 0x1f) throw new CmsError('BER high tag numbers are not used by CMS envelopes')
  const constructed = (tag & 0x20) !== 0
  const first = bytes[at + 1]!
  let start = at + 2
  if (first === 0x80) {
    // Indefinite length: constructed only, ends at the 00 00 that follows its last child.
    if (!constructed) throw new CmsError('BER indefinite length on a primitive element')
    let cursor = start
    for (;;) {
      if (cursor + 2 > bytes.length) throw new CmsError('BER indefinite-length element has no end-of-contents')
      if (bytes[cursor] === 0 && bytes[cursor + 1] === 0) return { tag, constructed, content: bytes.subarray(start, cursor), end: cursor + 2, depth }
      cursor = readElement(bytes, cursor, depth + 1).end
    }
  }
  let length = first
  if (first & 0x80) {
    const octets = first & 0x7f
    if (octets > 4) throw new CmsError('BER length too long')
    if (start + octets > bytes.length) throw new CmsError('BER length truncated')
    length = 0
    for (let i = 0; i < octets; i++) length = length * 256 + bytes[start + i]!
    start += octets
  }
  if (start + length > bytes.length) throw new CmsError('BER element runs past the end of its input')
  return { tag, constructed, content: bytes.subarray(start, start + length), end: start + length, depth }
}

function childrenOf(element: Element): Element[] {
  if (!element.constructed) throw new CmsError(`expected a constructed element, got tag 0x${element.tag.toString(16)}`)
  const out: Element[] = []
  for (let at = 0; at < element.content.length; ) {
    const child = readElement(element.content, at, element.depth + 1)
    out.push(child)
    at = child.end
  }
  return out
}

function expectTag(element: Element | undefined, tag: number, what: string): Element {
  if (!element || element.tag !== tag) throw new CmsError(`${what}: expected tag 0x${tag.toString(16)}, got ${element ? `0x${element.tag.toString(16)}` : 'nothing'}`)
  return element
}

/** An OCTET STRING's bytes, whether primitive or (BER) split into constructed segments, each an OCTET STRING. */
function octetsOf(element: Element): Uint8Array {
  if (!element.constructed) return element.content
  const segments: Uint8Array[] = []
  const gather = (constructed: Element) => {
    for (const segment of childrenOf(constructed)) {
      if (segment.tag === tags.octetString) segments.push(segment.content)
      else if (segment.tag === (tags.octetString | 0x20)) gather(segment)
      else throw new CmsError(`a segment of an OCTET STRING has tag 0x${segment.tag.toString(16)}`)
    }
  }
  gather(element)
  // Joined once: a concat per level would cost time quadratic in the nesting.
  return Buffer.concat(segments)
}

function oidOf(element: Element | undefined, what: string): string {
  const bytes = expectTag(element, tags.oid, what).content
  if (bytes.length === 0) throw new CmsError(`${what}: empty OID`)
  const values: number[] = []
  let value = 0
  for (const byte of bytes) {
    value = value * 128 + (byte & 0x7f)
    if (!(byte & 0x80)) {
      values.push(value)
      value = 0
    }
  }
  if (bytes.at(-1)! & 0x80) throw new CmsError(`${what}: truncated OID`)
  // The first subidentifier packs the first two arcs: 40 × first + second, the first arc at most 2.
  const first = Math.min(Math.floor(values[0]! / 40), 2)
  const arcs = [first, values[0]! - first * 40, ...values.slice(1)]
  return arcs.join('.')
}

function firstChild(element: Element | undefined, what: string): Element {
  const child = element?.constructed ? childrenOf(element)[0] : undefined
  if (!child) throw new CmsError(`${what}: missing`)
  return child
}

/** RSAES-OAEP-params must name SHA-256 for both the hash and MGF1 (their defaults are SHA-1). */
function checkOaepParameters(parameters: Element | undefined): void {
  const fields = parameters ? childrenOf(expectTag(parameters, tags.sequence, 'RSAES-OAEP parameters')) : []
  const explicit = (tag: number) => fields.find((field) => field.tag === tag)
  if (oidOf(firstChild(firstChild(explicit(0xa0), 'OAEP hash'), 'OAEP hash'), 'OAEP hash') !== oids.sha256) throw new CmsError('RSAES-OAEP hash is not SHA-256')
  const mgf = firstChild(explicit(0xa1), 'OAEP mask generation')
  const [mgfOid, mgfHash] = childrenOf(expectTag(mgf, tags.sequence, 'OAEP mask generation'))
  if (oidOf(mgfOid, 'OAEP mask generation') !== oids.mgf1 || oidOf(firstChild(mgfHash, 'MGF1 hash'), 'MGF1 hash') !== oids.sha256) {
    throw new CmsError('RSAES-OAEP mask generation is not MGF1 with SHA-256')
  }
}

/** The plaintext inside a KMS `CiphertextForRecipient`, given the recipient's RSA private key. */
export function openRecipientCiphertext(envelope: Uint8Array, privateKey: KeyObject): Buffer {
  // What may follow it is not refused: no real KMS answer has been seen here to say it never does, and the data key
  // it holds is checked by the GCM seals it must open.
  const contentInfo = readElement(envelope, 0)
  const [contentType, explicitContent] = childrenOf(expectTag(contentInfo, tags.sequence, 'ContentInfo'))
  if (oidOf(contentType, 'ContentInfo content type') !== oids.envelopedData) throw new CmsError('ContentInfo does not hold EnvelopedData')
  const envelopedData = firstChild(expectTag(explicitContent, 0xa0, 'ContentInfo content'), 'EnvelopedData')
  const fields = childrenOf(expectTag(envelopedData, tags.sequence, 'EnvelopedData'))
  // version, [0] originatorInfo (optional), recipientInfos, encryptedContentInfo, [1] unprotectedAttrs (optional)
  const rest = fields.slice(1).filter((field) => field.tag !== 0xa0)
  const recipients = childrenOf(expectTag(rest[0], tags.set, 'RecipientInfos'))
  if (recipients.length !== 1) throw new CmsError(`expected one recipient, found ${recipients.length}`)
  const recipient = childrenOf(expectTag(recipients[0], tags.sequence, 'KeyTransRecipientInfo'))
  const [keyAlgorithmOid, oaepParameters] = childrenOf(expectTag(recipient[2], tags.sequence, 'key encryption algorithm'))
  if (oidOf(keyAlgorithmOid, 'key encryption algorithm') !== oids.rsaesOaep) throw new CmsError('the content key is not wrapped with RSAES-OAEP')
  checkOaepParameters(oaepParameters)
  const wrappedKey = octetsOf(expectTag(recipient[3], tags.octetString, 'encrypted key'))

  const [, contentAlgorithm, encryptedContent] = childrenOf(expectTag(rest[1], tags.sequence, 'EncryptedContentInfo'))
  const [contentAlgorithmOid, iv] = childrenOf(expectTag(contentAlgorithm, tags.sequence, 'content encryption algorithm'))
  if (oidOf(contentAlgorithmOid, 'content encryption algorithm') !== oids.aes256Cbc) throw new CmsError('the content is not encrypted with AES-256-CBC')
  const ivBytes = octetsOf(expectTag(iv, tags.octetString, 'AES-CBC IV'))
  if (ivBytes.length !== 16) throw new CmsError(`AES-CBC IV must be 16 bytes, got ${ivBytes.length}`)
  // [0] IMPLICIT OCTET STRING: primitive (0x80) or, in BER, constructed (0xa0) segments.
  if (!encryptedContent || (encryptedContent.tag !== 0x80 && encryptedContent.tag !== 0xa0)) throw new CmsError('EnvelopedData carries no encrypted content')
  const ciphertext = octetsOf(encryptedContent)

  let contentKey: Buffer
  try {
    contentKey = privateDecrypt({ key: privateKey, padding: constants.RSA_PKCS1_OAEP_PADDING, oaepHash: 'sha256' }, wrappedKey)
  } catch {
    throw new CmsError('the content key does not open with this recipient key')
  }
  try {
    if (contentKey.length !== 32) throw new CmsError(`the content key is ${contentKey.length} bytes, not 32`)
    return decrypted(createDecipheriv('aes-256-cbc', contentKey, ivBytes), ciphertext)
  } catch (error) {
    throw error instanceof CmsError ? error : new CmsError('the content does not decrypt (bad padding)')
  } finally {
    contentKey.fill(0)
  }
}

/**
 * The plaintext (a DEK) in memory only the caller holds, and every piece the
 * decipher handed out zeroed: Buffer.concat would copy it into Node's shared
 * pool and leave the pieces behind.
 */
function decrypted(decipher: Decipher, ciphertext: Uint8Array): Buffer {
  const head = decipher.update(ciphertext)
  try {
    const tail = decipher.final()
    const plaintext = Buffer.from(secretBytes(head.length + tail.length).buffer)
    plaintext.set(head)
    plaintext.set(tail, head.length)
    tail.fill(0)
    return plaintext
  } finally {
    head.fill(0)
  }
}
