import { request as httpsRequest } from 'node:https'
import { Response, type Request } from 'miniflare'

/**
 * A Worker binding that sends each request over TLS as Cloudflare's
 * `mtls_certificates` binding does: trusting `ca` for the server and, given
 * `cert` and `key`, presenting that client certificate. Local workerd has no
 * such binding (miniflare only proxies it to Cloudflare's), and miniflare's
 * schema drops the HTTPS options of an external service, so the workerd
 * tests bind this Node function instead: real TLS, from Node's side. A
 * failed handshake rejects, which miniflare hands the Worker as a 500 (where
 * Cloudflare's binding throws).
 */
export function certificateFetcher(tls: { ca: string; cert?: string; key?: string }): (request: Request) => Promise<Response> {
  return async (request) => {
    const url = new URL(request.url)
    const body = request.method === 'GET' || request.method === 'HEAD' ? undefined : Buffer.from(await request.arrayBuffer())
    return new Promise<Response>((resolve, reject) => {
      const outgoing = httpsRequest(
        { host: url.hostname, port: url.port, path: `${url.pathname}${url.search}`, method: request.method, headers: Object.fromEntries(request.headers), ...tls },
        (incoming) => {
          const chunks: Buffer[] = []
          incoming.on('data', (chunk: Buffer) => chunks.push(chunk))
          incoming.on('error', reject)
          incoming.on('end', () => {
            const headers: Array<[string, string]> = []
            for (const [name, value] of Object.entries(incoming.headers)) if (value !== undefined) headers.push([name, Array.isArray(value) ? value.join(', ') : value])
            resolve(new Response(Buffer.concat(chunks), { status: incoming.statusCode, headers }))
          })
        },
      )
      outgoing.on('error', reject)
      request.signal.addEventListener('abort', () => outgoing.destroy(new Error('aborted')), { once: true })
      outgoing.end(body)
    })
  }
}
