// @ts-check
/**
 * The signing thread of SignEngine (engine.ts). It is plain JavaScript so that
 * a worker thread loads it as it is under Node, tsx and vitest alike: a `.ts`
 * worker would need a TypeScript loader inside the thread, which vitest's
 * transform does not reach.
 *
 * One message is one batch: `{ batchId, count, buffer }`, where `buffer` is a
 * SharedArrayBuffer holding `count` slots laid out as engine.ts describes (the
 * layout arrives in workerData, so engine.ts stays its one definition). Each
 * slot comes in as key ‖ digest and is signed in place, as signature ‖ recid ‖
 * status; the answer `{ batchId }` says the batch is done.
 * `{ close: true }` ends the thread once the batches before it are answered:
 * the engine never calls `worker.terminate()`, because terminating a thread
 * while it is inside the native binding makes node-addon-api throw a C++
 * exception nobody catches, which aborts the whole process.
 */
import { createRequire } from 'node:module'
import { randomBytes } from 'node:crypto'
import { parentPort, workerData } from 'node:worker_threads'

/**
 * The native binding, never the `secp256k1` entry point: that one falls back
 * to the JS `elliptic` implementation when the native build is missing, and
 * a signing origin must fail loudly instead of signing slowly.
 * @type {typeof import('secp256k1')}
 */
const secp256k1 = createRequire(import.meta.url)('secp256k1/bindings')

// Blinds this thread's context against side channels; RFC 6979 signatures stay deterministic.
secp256k1.contextRandomize(randomBytes(32))

/** @type {{ slotBytes: number, keyAt: number, digestAt: number, recidAt: number, statusAt: number, statusSigned: number, statusRefused: number }} */
const layout = workerData
const signature = new Uint8Array(64)
const port = /** @type {import('node:worker_threads').MessagePort} */ (parentPort)

port.on('message', (/** @type {{ close: true } | { batchId: number, count: number, buffer: SharedArrayBuffer }} */ message) => {
  if ('close' in message) {
    port.close()
    return
  }
  const { batchId, count, buffer } = message
  // A batch that does not fit its own count means the two sides disagree on the
  // protocol: dying (the engine rejects and replaces) beats signing garbage.
  if (!(buffer instanceof SharedArrayBuffer) || !Number.isInteger(count) || count < 1 || buffer.byteLength < count * layout.slotBytes) {
    // It may still hold keys: they go before the thread does (the engine zeroes a shared batch too, once it is gone).
    if (buffer instanceof SharedArrayBuffer || buffer instanceof ArrayBuffer) new Uint8Array(buffer).fill(0)
    throw new Error(`signWorker: malformed batch ${batchId}`)
  }
  const bytes = new Uint8Array(buffer)
  for (let i = 0; i < count; i++) signSlot(bytes, i * layout.slotBytes)
  port.postMessage({ batchId })
})

/**
 * Signs one slot in place. The key and digest are zeroed before the signature
 * is written over them, whether or not libsecp256k1 accepted the key.
 * @param {Uint8Array} bytes
 * @param {number} at
 */
function signSlot(bytes, at) {
  const key = bytes.subarray(at + layout.keyAt, at + layout.keyAt + 32)
  const digest = bytes.subarray(at + layout.digestAt, at + layout.digestAt + 32)
  let recid = 0
  let status = layout.statusSigned
  try {
    recid = secp256k1.ecdsaSign(digest, key, {}, signature).recid
  } catch {
    // libsecp256k1 refuses only a key that is zero or not below the curve order.
    status = layout.statusRefused
  }
  bytes.fill(0, at, at + layout.recidAt)
  if (status === layout.statusSigned) bytes.set(signature, at)
  bytes[at + layout.recidAt] = recid
  bytes[at + layout.statusAt] = status
}

port.postMessage({ ready: true })
