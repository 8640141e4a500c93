import { verify, X509Certificate } from 'node:crypto'
import { decode, encode } from 'cborg'

/** Why a Nitro attestation document was refused (the message ends without a full stop). */
export class AttestationDocumentError extends Error {}

export type AttestedFields = {
  moduleId: string
  /** PCR index → measurement (PCR0 is the enclave image). */
  pcrs: Map<number, Uint8Array>
  /** The key the enclave asked the NSM to bind, if any. */
  publicKey: Uint8Array | undefined
}

/**
 * Checks a Nitro attestation document as AWS documents it and KMS does: a
 * COSE_Sign1 (untagged or tag 18) signed with ES384 by its `certificate`,
 * which chains through `cabundle` (root first, every one a CA) to one of `roots`, each
 * certificate within its validity at `now` (default: the current time). Answers the fields a verifier acts
 * on; throws AttestationDocumentError saying what failed.
 */
export function verifyAttestationDocument(document: Uint8Array, { roots, now = Date.now() }: { roots: readonly X509Certificate[]; now?: number }): AttestedFields {
  const invalid = (why: string) => new AttestationDocumentError(why)
  let protectedHeader: Uint8Array, payload: Uint8Array, signature: Uint8Array, fields: Map<string, unknown>
  try {
    const sign1 = decode(document, { useMaps: true, tags: Object.assign([], { 18: (inner: unknown) => inner }) }) as unknown[]
    ;[protectedHeader, , payload, signature] = sign1 as [Uint8Array, unknown, Uint8Array, Uint8Array]
    if (!Array.isArray(sign1) || sign1.length !== 4 || ![protectedHeader, payload, signature].every((f) => f instanceof Uint8Array)) throw new Error()
    if ((decode(protectedHeader, { useMaps: true }) as Map<number, unknown>).get(1) !== -35) throw invalid('not signed with ES384')
    fields = decode(payload, { useMaps: true }) as Map<string, unknown>
    if (!(fields instanceof Map)) throw new Error()
  } catch (error) {
    throw error instanceof AttestationDocumentError ? error : invalid('not a COSE_Sign1 structure')
  }
  const certificateOf = (der: unknown) => {
    if (!(der instanceof Uint8Array)) throw invalid('a certificate is missing')
    try {
      return new X509Certificate(der)
    } catch {
      throw invalid('a certificate is not DER X.509')
    }
  }
  const bundle = fields.get('cabundle')
  if (!Array.isArray(bundle) || bundle.length === 0) throw invalid('no cabundle')
  const chain = [...bundle.map(certificateOf), certificateOf(fields.get('certificate'))]
  if (!roots.some((root) => root.raw.equals(chain[0]!.raw))) throw invalid('the cabundle does not start at a trusted root')
  for (const [i, certificate] of chain.entries()) {
    const issuer = chain[Math.max(i - 1, 0)]!
    if (!certificate.checkIssued(issuer) || !certificate.verify(issuer.publicKey)) throw invalid('the certificate chain does not verify')
    // OpenSSL's checkIssued looks at key usage, not basic constraints: a leaf must not be able to issue the next.
    if (i < chain.length - 1 && !certificate.ca) throw invalid('a certificate in the cabundle is not a CA')
    if (now < Date.parse(certificate.validFrom) || now > Date.parse(certificate.validTo)) throw invalid('a certificate is outside its validity')
  }
  const toBeSigned = encode(['Signature1', protectedHeader, new Uint8Array(0), payload])
  if (!verify('sha384', toBeSigned, { key: chain.at(-1)!.publicKey, dsaEncoding: 'ieee-p1363' }, signature)) throw invalid('the signature does not verify')
  // The NSM measures with SHA-384; PCRs of another length could not be the image's PCR0 anyway, but say why.
  if (fields.get('digest') !== 'SHA384') throw invalid('its PCRs are not SHA-384 digests')
  const pcrs = new Map<number, Uint8Array>()
  const pcrField = fields.get('pcrs')
  if (pcrField instanceof Map) for (const [index, value] of pcrField) if (typeof index === 'number' && value instanceof Uint8Array) pcrs.set(index, value)
  const moduleId = fields.get('module_id')
  const publicKey = fields.get('public_key')
  return { moduleId: typeof moduleId === 'string' ? moduleId : '', pcrs, publicKey: publicKey instanceof Uint8Array ? publicKey : undefined }
}
