import { createServer, type IncomingMessage, type ServerResponse } from 'node:http'
import { secp256k1 } from '@noble/curves/secp256k1'
import { bytesToHex, hexToBytes, type Hex } from 'viem'
import { listenLocal, readBody } from './localHttp.js'

/**
 * A team's own key server, as the `http` backend expects one (Keyless-style
 * JSON, bearer token), on 127.0.0.1 only, with real secp256k1 signatures.
 * It answers in the three signature forms the contract allows, and can be
 * told to fail or to sign with another key.
 */
export type HttpSignerServer = {
  url: string
  token: string
  keyId: string
  /** 'hex65' r‖s‖v (default), 'hex64' r‖s, 'der' base64 DER with a high s. */
  format: 'hex65' | 'hex64' | 'der'
  fault: 'none' | 'down' | 'wrong-key'
  calls: number
  stop(): Promise<void>
}

export async function startHttpSignerServer(options: { port: number; privateKey: Hex; keyId?: string }): Promise<HttpSignerServer> {
  const state: Omit<HttpSignerServer, 'stop'> = {
    url: `http://127.0.0.1:${options.port}`,
    token: `test-bearer-${bytesToHex(crypto.getRandomValues(new Uint8Array(8))).slice(2)}`,
    keyId: options.keyId ?? 'paymaster-key',
    format: 'hex65',
    fault: 'none',
    calls: 0,
  }

  const reply = (response: ServerResponse, status: number, body: unknown) => {
    response.writeHead(status, { 'content-type': 'application/json' }).end(JSON.stringify(body))
  }

  const handle = async (request: IncomingMessage, response: ServerResponse) => {
    const raw = await readBody(request)
    if (request.headers.authorization !== `Bearer ${state.token}`) return reply(response, 401, { error: 'unauthorized' })
    if (state.fault === 'down') return reply(response, 503, { error: 'key server unavailable' })
    const body = JSON.parse(raw.toString('utf8') || '{}') as { key_id?: string; algorithm?: string; data?: string }
    if (body.key_id !== state.keyId) return reply(response, 404, { error: 'unknown key' })
    if (request.url === '/health') return reply(response, 200, { ok: true, key_id: state.keyId })
    if (request.url !== '/sign' || request.method !== 'POST') return reply(response, 404, { error: 'not found' })
    const digest = Buffer.from(body.data ?? '', 'base64')
    if (body.algorithm !== 'ecdsa-secp256k1' || digest.length !== 32) return reply(response, 400, { error: 'bad request' })
    state.calls++
    const key = state.fault === 'wrong-key' ? secp256k1.utils.randomPrivateKey() : hexToBytes(options.privateKey)
    const signature = secp256k1.sign(digest, key, { lowS: true })
    const encoded =
      state.format === 'der'
        ? Buffer.from(new secp256k1.Signature(signature.r, secp256k1.CURVE.n - signature.s).toDERRawBytes()).toString('base64')
        : `0x${signature.toCompactHex()}${state.format === 'hex65' ? (27 + signature.recovery).toString(16) : ''}`
    reply(response, 200, { signature: encoded, key_id: state.keyId })
  }

  const server = createServer((request, response) => {
    handle(request, response).catch(() => reply(response, 500, { error: 'internal' }))
  })
  // The same object the handler reads, so a test's changes to format and fault take effect.
  return Object.assign(state, { stop: await listenLocal(server, options.port) })
}
