import { createServer } from 'node:net'
import { CoalescingWriter } from '../../enclave-origin/protocol/coalescingWriter.js'
import { encodeFrame, FrameDecoder } from '../../enclave-origin/protocol/frames.js'
import { encodeSignResponse } from '../../enclave-origin/protocol/messages.js'
import { keepRequestObjectsYoung } from '../../enclave-origin/heapTuning.js'

/**
 * The benchmark's floor: a server that speaks the enclave protocol and answers
 * every frame at once with a fixed SIGN answer, signing nothing. Driven at the
 * same offered rate as the enclave, its latency is what the machine, the
 * sockets and the load generator cost on their own.
 * The benchmark runs it from its build: `node dist/bench/frameEcho.js PORT`.
 */
// The same heap setting as the origin processes whose floor this is.
keepRequestObjectsYoung()
const answer = encodeSignResponse({ signature: new Uint8Array(64), recoveryId: 0, enclaveMicros: 0 })
const server = createServer((socket) => {
  socket.setNoDelay(true)
  const decoder = new FrameDecoder()
  const writer = new CoalescingWriter(socket)
  socket.on('data', (chunk: Uint8Array) => {
    for (const frame of decoder.push(chunk)) writer.write(encodeFrame({ requestId: frame.requestId, opcode: frame.opcode, status: 0, payload: answer }))
  })
  socket.on('error', () => {})
})
server.listen(Number(process.argv[2]), '127.0.0.1', () => console.log('frame echo listening'))
process.once('SIGTERM', () => process.exit(0))
