import { createServer } from 'node:http'
import { keepRequestObjectsYoung } from '../../enclave-origin/heapTuning.js'

/**
 * The benchmark's floor for the parent's path: a Node HTTP server that
 * answers every request at once with a sign-shaped JSON body and a
 * Server-Timing header, as the parent does, but signs nothing and checks
 * nothing. Driven at the same offered rate as the parent, its latency is what
 * Node's HTTP server, the sockets and the load generator cost on their own.
 * The benchmark runs it from its build: `node dist/bench/httpEcho.js PORT`.
 */
// The same heap setting as the origin processes whose floor this is.
keepRequestObjectsYoung()
const body = JSON.stringify({ signature: `0x${'11'.repeat(64)}`, recoveryId: 0 })
const headers = {
  'content-type': 'application/json',
  'content-length': String(Buffer.byteLength(body)),
  'server-timing': 'enclave;dur=0.000, queue;dur=0.000, rpc;dur=0.000, total;dur=0.000',
}
const server = createServer((request, response) => {
  request.resume()
  request.once('end', () => response.writeHead(200, headers).end(body))
})
server.keepAliveTimeout = 60_000
server.listen(Number(process.argv[2]), '127.0.0.1', () => console.log('http echo listening'))
process.once('SIGTERM', () => process.exit(0))
