import { messageOf } from '../errors.js'
import { requireAddon } from '../nativeAddon.js'
import type { AttestationProvider } from './dataKey.js'

/**
 * The Nitro Secure Module's calls this provider makes. Node cannot make the
 * NSM's ioctl on /dev/nsm itself; `aws-nitro-enclaves-nsm-node-linux-x64-gnu`
 * (napi-rs over AWS's aws-nitro-enclaves-nsm-api driver) does, with these
 * functions. Its `open()` answers -1 when /dev/nsm cannot be opened, and its
 * errors carry only the NSM's error code ("InvalidArgument", "InternalError").
 */
export type NsmDevice = {
  open(): number
  close(fd: number): void
  getDescription(fd: number): { moduleId: string; digest: string; versionMajor: number; versionMinor: number; versionPatch: number }
  getAttestationDoc(fd: number, userData: Buffer | null, nonce: Buffer | null, publicKey: Buffer | null): Buffer
}

export const NSM_ADDON_PACKAGE = 'aws-nitro-enclaves-nsm-node-linux-x64-gnu'

export type NitroAttestation = AttestationProvider & {
  /** The enclave's id as the NSM names it (`i-…-enc…`), and its NSM version, for the start-up log. */
  readonly module: { id: string; version: string }
  close(): void
}

/**
 * Opens the NSM and serves attestation documents that bind the enclave's
 * recipient key, as KMS needs for `Recipient`. Throws, saying why, where there
 * is no NSM: the production profile then refuses to start.
 */
export function openNitroAttestation(device: NsmDevice = requireAddon<NsmDevice>(NSM_ADDON_PACKAGE, ['open', 'close', 'getDescription', 'getAttestationDoc'])): NitroAttestation {
  const fd = device.open()
  if (fd < 0) throw new Error('no Nitro Secure Module: /dev/nsm cannot be opened (this is not a Nitro Enclave, or its nsm driver is not loaded)')
  let description: ReturnType<NsmDevice['getDescription']>
  try {
    description = device.getDescription(fd)
  } catch (error) {
    device.close(fd)
    throw new Error(`the Nitro Secure Module does not describe itself: ${messageOf(error)}`)
  }
  let open = true
  return {
    kind: 'nitro',
    module: { id: description.moduleId, version: `${description.versionMajor}.${description.versionMinor}.${description.versionPatch}` },
    async attestationDocument({ publicKey }) {
      if (!open) throw new Error('the Nitro attestation provider is closed')
      try {
        // The public key alone: KMS encrypts its answer to it. User data and nonce stay empty.
        return new Uint8Array(device.getAttestationDoc(fd, null, null, Buffer.from(publicKey)))
      } catch (error) {
        throw new Error(`the Nitro Secure Module gave no attestation document: ${messageOf(error)}`)
      }
    },
    close() {
      if (!open) return
      open = false
      device.close(fd)
    },
  }
}
