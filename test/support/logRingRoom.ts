import type { KeyCacheAuditEvent } from '../../enclave-origin/enclave/keyCache.js'
import { auditLogger, type LogRing } from '../../enclave-origin/enclave/logRing.js'

/** The key cache's audit sink through `auditLogger`, as the enclave's is, its lines kept in `ring` as bare JSON (no time, no redaction, no stdout). */
export function auditsInto(ring: LogRing): (event: KeyCacheAuditEvent) => void {
  return auditLogger((fields, options) => ring.write(JSON.stringify(fields), options))
}

/** Fills the room `ring` keeps for lines that must be delivered, to the last byte, as uncollected audits would. */
export function fillMustDeliverRoom(ring: LogRing): void {
  for (const length of [500, 1]) {
    for (let written = 0; written < 20_000; written++) {
      try {
        ring.write('"x"'.padEnd(length, ' '), { mustDeliver: true })
      } catch {
        break
      }
    }
  }
  // Bounded above, so a ring that never refuses fails here rather than looping.
  try {
    ring.write('"x"', { mustDeliver: true })
  } catch {
    return
  }
  throw new Error('the ring took every line that must be delivered: it has no room limit')
}
