import type { IncomingMessage, Server } from 'node:http'
import { createServer as createNetServer, type AddressInfo } from 'node:net'

/** Plumbing shared by the local test servers (KMS, Vault, HTTP signer, the workerd control endpoint). */

export async function readBody(request: IncomingMessage): Promise<Buffer> {
  const chunks: Buffer[] = []
  for await (const chunk of request) chunks.push(chunk as Buffer)
  return Buffer.concat(chunks)
}

/**
 * Listens on 127.0.0.1 only (rejecting if the port is taken) and resolves to
 * the server's stop. closeAllConnections also drops keep-alive sockets and
 * requests a test left hanging, so stop never waits on a client.
 */
export function listenLocal(server: Server, port: number): Promise<() => Promise<void>> {
  return new Promise((resolve, reject) => {
    server.once('error', reject)
    server.listen(port, '127.0.0.1', () => {
      server.off('error', reject)
      resolve(
        () =>
          new Promise<void>((stopped, failed) => {
            server.close((error) => (error ? failed(error) : stopped()))
            server.closeAllConnections()
          }),
      )
    })
  })
}

/**
 * A port nothing listens on now, from the system's free ones: for a server a
 * test starts, stops and starts again on the same address, where port 0 would
 * move it. Unlike a fixed port, it cannot collide with another test file's.
 */
export function freePort(): Promise<number> {
  const probe = createNetServer()
  return new Promise((resolve, reject) => {
    probe.once('error', reject)
    probe.listen(0, '127.0.0.1', () => {
      const { port } = probe.address() as AddressInfo
      probe.close(() => resolve(port))
    })
  })
}
