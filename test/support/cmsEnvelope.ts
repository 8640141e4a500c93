import { constants, createCipheriv, createHash, publicEncrypt, randomBytes, type KeyObject } from 'node:crypto'

/**
 * The local KMS's side of `CiphertextForRecipient` (tests only): a CMS
 * ContentInfo/EnvelopedData whose AES-256-CBC content key is wrapped to the
 * recipient's RSA key with RSAES-OAEP-SHA-256, as AWS KMS answers an attested
 * request. `ber: true` writes what KMS writes on the wire: indefinite lengths
 * and the encrypted content split into segments; otherwise DER.
 */

export function encodeLength(length: number): Buffer {
  if (length < 0x80) return Buffer.from([length])
  const bytes: number[] = []
  for (let rest = length; rest > 0; rest = Math.floor(rest / 256)) bytes.unshift(rest % 256)
  return Buffer.from([0x80 | bytes.length, ...bytes])
}

function oid(text: string): Buffer {
  const [first, second, ...rest] = text.split('.').map(Number)
  const body: number[] = []
  for (const arc of [first! * 40 + second!, ...rest]) {
    const septets = [arc & 0x7f]
    for (let value = Math.floor(arc / 128); value > 0; value = Math.floor(value / 128)) septets.unshift((value & 0x7f) | 0x80)
    body.push(...septets)
  }
  return element(0x06, Buffer.from(body))
}

function element(tag: number, ...children: Uint8Array[]): Buffer {
  const body = Buffer.concat(children)
  return Buffer.concat([Buffer.from([tag]), encodeLength(body.length), body])
}

/**
 * `segments`, in BER only: the children of the constructed encrypted content in place of 16-byte OCTET STRINGs
 * (tests of what a parser must refuse).
 */
export function sealForRecipient(plaintext: Uint8Array, recipient: KeyObject, options: { ber?: boolean; segments?: (ciphertext: Buffer) => Uint8Array[] } = {}): Buffer {
  const ber = options.ber ?? false
  // Constructed elements: indefinite length (0x80 … 00 00) in BER, definite in DER.
  const constructed = (tag: number, ...children: Uint8Array[]) =>
    ber ? Buffer.concat([Buffer.from([tag, 0x80]), ...children, Buffer.from([0, 0])]) : element(tag, ...children)
  const contentKey = randomBytes(32)
  const iv = randomBytes(16)
  const cipher = createCipheriv('aes-256-cbc', contentKey, iv)
  const ciphertext = Buffer.concat([cipher.update(plaintext), cipher.final()])
  const wrappedKey = publicEncrypt({ key: recipient, padding: constants.RSA_PKCS1_OAEP_PADDING, oaepHash: 'sha256' }, contentKey)
  contentKey.fill(0)
  const sha256 = constructed(0x30, oid('2.16.840.1.101.3.4.2.1'), Buffer.from([0x05, 0x00]))
  const oaepParameters = constructed(0x30, constructed(0xa0, sha256), constructed(0xa1, constructed(0x30, oid('1.2.840.113549.1.1.8'), sha256)))
  const subjectKeyId = createHash('sha1').update(recipient.export({ type: 'spki', format: 'der' })).digest()
  const recipientInfo = constructed(
    0x30,
    element(0x02, Buffer.from([2])),
    element(0x80, subjectKeyId),
    constructed(0x30, oid('1.2.840.113549.1.1.7'), oaepParameters),
    element(0x04, wrappedKey),
  )
  // [0] IMPLICIT OCTET STRING: in BER, a constructed string of 16-byte segments.
  const segments = options.segments ?? ((bytes: Buffer) => Array.from({ length: Math.ceil(bytes.length / 16) }, (_, i) => element(0x04, bytes.subarray(i * 16, i * 16 + 16))))
  const content = ber ? constructed(0xa0, ...segments(ciphertext)) : element(0x80, ciphertext)
  const encryptedContentInfo = constructed(0x30, oid('1.2.840.113549.1.7.1'), constructed(0x30, oid('2.16.840.1.101.3.4.1.42'), element(0x04, iv)), content)
  const envelopedData = constructed(0x30, element(0x02, Buffer.from([2])), constructed(0x31, recipientInfo), encryptedContentInfo)
  return constructed(0x30, oid('1.2.840.113549.1.7.3'), constructed(0xa0, envelopedData))
}
