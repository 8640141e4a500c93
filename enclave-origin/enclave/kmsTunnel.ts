import { Agent, type AgentOptions, type RequestOptions } from 'node:https'
import type { Duplex } from 'node:stream'
import { connect as connectTls, type ConnectionOptions } from 'node:tls'
import type { StreamAddress } from '../config.js'
import { messageOf } from '../errors.js'
import { connectStream } from '../protocol/connectStream.js'

/**
 * An HTTPS agent for the enclave's KMS client. A Nitro Enclave has no network:
 * each connection is a byte stream to the parent (vsock), where AWS's
 * vsock-proxy, or any TCP forwarder, carries it on to KMS's endpoint. TLS runs
 * inside that stream, end to end with KMS, checked against the endpoint's
 * host name: the parent relays bytes it can neither read nor alter. No DNS is
 * asked; the host name only names the certificate to expect (and SigV4's Host).
 *
 * `tls` adds options to each TLS connection: production's trust Node's bundled roots alone (`bundledRootsOnly`);
 * tests pass their CA.
 */
export function kmsTunnelAgent(options: { address: StreamAddress; tls?: ConnectionOptions }): Agent {
  return new KmsTunnelAgent(options.address, options.tls ?? {}, { keepAlive: true, maxSockets: 4 })
}

class KmsTunnelAgent extends Agent {
  constructor(
    private readonly address: StreamAddress,
    private readonly tls: ConnectionOptions,
    agentOptions: AgentOptions,
  ) {
    super(agentOptions)
  }

  // Node's agent accepts a socket handed to the callback later, once the tunnel is open.
  override createConnection(options: RequestOptions, callback?: (error: Error | null, stream: Duplex) => void): undefined {
    const host = options.hostname ?? options.host ?? undefined
    const servername = (options as ConnectionOptions).servername || host
    connectStream(this.address).then(
      (tunnel) => {
        let stream: Duplex
        try {
          stream = connectTls({ ...this.tls, socket: tunnel, servername, host })
        } catch (error) {
          // TLS options it cannot use (a malformed certificate, say) throw here: the request fails, the tunnel closes.
          tunnel.destroy()
          callback?.(new Error(`cannot start TLS in the KMS tunnel: ${messageOf(error)}`), undefined as never)
          return
        }
        callback?.(null, stream)
      },
      (error: Error) => callback?.(new Error(`cannot open the KMS tunnel: ${error.message}`), undefined as never),
    )
    return undefined
  }
}
