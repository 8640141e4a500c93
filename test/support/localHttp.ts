import type { IncomingMessage, Server } from 'node:http'

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
