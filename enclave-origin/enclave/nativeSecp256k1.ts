import { randomBytes } from 'node:crypto'
import { createRequire } from 'node:module'

/**
 * The native libsecp256k1 binding, never the `secp256k1` entry point: that one
 * silently falls back to the JS `elliptic` implementation when the native build
 * is missing, and a signing origin must fail loudly instead of signing slowly.
 * (signWorker.mjs loads it the same way: it stays plain JS and cannot import this.)
 */
export const secp256k1 = createRequire(import.meta.url)('secp256k1/bindings') as typeof import('secp256k1')

// Blinds this thread's context against side channels, as signWorker.mjs does for its own; RFC 6979 signatures stay deterministic.
secp256k1.contextRandomize(randomBytes(32))
