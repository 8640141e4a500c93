import { keepRequestObjectsYoung } from '../../enclave-origin/heapTuning.js'
import { HttpServer } from '../../enclave-origin/parent/httpServer.js'

/**
 * The benchmark's floor for the parent's path: the parent's own HTTP server
 * (httpServer.ts) answering every request at once with a sign-shaped JSON
 * body and a Server-Timing header, as the parent does, but signing nothing
 * and checking nothing. Driven at the same offered rate as the parent, its
 * latency is what the HTTP server, the sockets and the load generator cost
 * on their own. The benchmark runs it from its build:
 * `node dist/bench/httpEcho.js PORT`.
 */
// The same heap setting as the origin processes whose floor this is.
keepRequestObjectsYoung()
const answer = {
  status: 200,
  headers: { 'content-type': 'application/json', 'server-timing': 'enclave;dur=0.000, queue;dur=0.000, rpc;dur=0.000, total;dur=0.000' },
  body: JSON.stringify({ signature: `0x${'11'.repeat(64)}`, recoveryId: 0 }),
}
const server = new HttpServer({ handle: async () => answer })
await server.listen({ port: Number(process.argv[2]), host: '127.0.0.1' })
console.log('http echo listening')
process.once('SIGTERM', () => process.exit(0))
