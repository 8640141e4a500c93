import { execFile } from 'node:child_process'
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { connect, createServer, type Server, type Socket } from 'node:net'
import { tmpdir } from 'node:os'
import path from 'node:path'
import { pathToFileURL } from 'node:url'
import { promisify } from 'node:util'
import { createServer as createTlsServer } from 'node:tls'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { developmentAttestation, KmsDataKeys } from '../../enclave-origin/enclave/dataKey.js'
import { DeliveredCredentials } from '../../enclave-origin/enclave/deliveredCredentials.js'
import { enclaveKmsClient } from '../../enclave-origin/enclave/kmsClient.js'
import { startLocalKms, type LocalKms } from '../support/kmsServer.js'
import { startTestCa, type TestCa } from '../support/testCertificates.js'

/**
 * The enclave reaches KMS only through a byte stream to the parent (vsock
 * there; TCP here, the same code after the connect). Here: the local KMS
 * behind a TLS front that holds a certificate for `kms.tunnel.test` (standing
 * in for KMS's HTTPS endpoint), and a blind relay in front of that (standing
 * in for the parent's vsock-proxy) that records every byte it carries. The
 * host name resolves nowhere: a request that arrives went through the tunnel.
 */

const ports = { kms: 18701, front: 18702, relay: 18703, impostor: 18704, closed: 18705, silent: 18707, direct: 18708 }
const kmsHost = 'kms.tunnel.test'

let kms: LocalKms
let ca: TestCa
let otherCa: TestCa
const servers: Server[] = []
const relayed: Buffer[] = []
/** Connections the silent proxy took and never answered. */
const held: Socket[] = []

/** Accepts on `port` and pipes each connection to `to`, calling `seen` with what passes either way. */
function pipeServer({ port, to, seen }: { port: number; to: number; seen?: (chunk: Buffer) => void }): Promise<void> {
  const server = createServer((socket: Socket) => {
    const upstream = connect(to, '127.0.0.1')
    for (const [from, into] of [[socket, upstream], [upstream, socket]] as const) {
      from.on('data', (chunk: Buffer) => {
        seen?.(chunk)
        into.write(chunk)
      })
      from.on('end', () => into.end())
      from.on('error', () => into.destroy())
    }
  })
  servers.push(server)
  return new Promise((resolve) => server.listen(port, '127.0.0.1', resolve))
}

/** TLS with `certificate`, its clear side piped to the local KMS. */
function tlsFront(port: number, certificate: { cert: string; key: string }): Promise<void> {
  const server = createTlsServer(certificate, (clear) => {
    const upstream = connect(ports.kms, '127.0.0.1')
    clear.pipe(upstream).pipe(clear)
    clear.on('error', () => upstream.destroy())
    upstream.on('error', () => clear.destroy())
  })
  servers.push(server)
  return new Promise((resolve) => server.listen(port, '127.0.0.1', resolve))
}

beforeAll(async () => {
  kms = await startLocalKms({ port: ports.kms })
  ca = startTestCa('test KMS CA')
  otherCa = startTestCa('a parent of its own')
  await tlsFront(ports.front, ca.issue('kms', `DNS:${kmsHost}`))
  await pipeServer({ port: ports.relay, to: ports.front, seen: (chunk) => relayed.push(chunk) })
  // A parent that ends TLS itself, with a certificate of its own for the same name.
  await tlsFront(ports.impostor, otherCa.issue('kms', `DNS:${kmsHost}`))
  // KMS reached without a tunnel, at an address (the certificate names it).
  await tlsFront(ports.direct, ca.issue('kms-direct', 'IP:127.0.0.1'))
  // A proxy that takes the connection and then says nothing.
  const silent = createServer((socket) => held.push(socket))
  servers.push(silent)
  await new Promise<void>((resolve) => silent.listen(ports.silent, '127.0.0.1', resolve))
})

afterAll(async () => {
  for (const socket of held) socket.destroy()
  await Promise.all(servers.map((server) => new Promise((resolve) => server.close(resolve))))
  await kms?.stop()
  ca?.close()
  otherCa?.close()
})

/** The enclave's own KMS client (credentials as a parent delivers them), through a tunnel to `port`. */
function dataKeysThrough(port: number, timeoutMs = 5_000, tls: Record<string, string> = {}) {
  const credentials = new DeliveredCredentials()
  credentials.set(kms.credentials)
  const client = enclaveKmsClient({
    endpoint: `https://${kmsHost}`,
    region: kms.credentials.region,
    credentials,
    timeoutMs,
    tunnel: { host: '127.0.0.1', port },
    tls: { ca: ca.caPem, ...tls },
  })
  return { client, keys: new KmsDataKeys({ client, kmsKeyId: kms.createSymmetricKey(), attestation: developmentAttestation }) }
}

describe('KMS through the tunnel', () => {
  it('generates and unwraps a data key, and the relay carries only TLS', async () => {
    const { client, keys } = dataKeysThrough(ports.relay)
    try {
      const { dek, wrapped } = await keys.generate()
      expect(Buffer.from(await keys.unwrap(wrapped))).toEqual(Buffer.from(dek))
      const carried = Buffer.concat(relayed)
      expect(carried.length).toBeGreaterThan(1_000)
      for (const clear of ['TrentService', 'Authorization', 'Plaintext', Buffer.from(dek).toString('base64')]) expect(carried.includes(clear)).toBe(false)
    } finally {
      client.destroy()
    }
  })

  it('refuses a relay that ends TLS itself, even with a certificate for the right name', async () => {
    const { client, keys } = dataKeysThrough(ports.impostor)
    try {
      await expect(keys.generate()).rejects.toThrow(/self[- ]signed certificate|unable to verify|unable to get local issuer/)
    } finally {
      client.destroy()
    }
  })

  it('gives up on a proxy that takes the connection and then says nothing, rather than waiting for ever', async () => {
    const { client, keys } = dataKeysThrough(ports.silent, 300)
    try {
      await expect(keys.generate()).rejects.toThrow(/time(d)? ?out/i)
    } finally {
      client.destroy()
    }
  })

  it('fails clearly, sending nothing through the tunnel, when TLS cannot start in it', async () => {
    const carriedBefore = relayed.length
    const { client, keys } = dataKeysThrough(ports.relay, 5_000, { cert: 'not a certificate', key: 'not a key' })
    try {
      await expect(keys.generate()).rejects.toThrow(/cannot start TLS in the KMS tunnel: .*PEM/)
      expect(relayed.length).toBe(carriedBefore)
    } finally {
      client.destroy()
    }
  })

  it('fails clearly when the tunnel cannot be opened', async () => {
    const { client, keys } = dataKeysThrough(ports.closed)
    try {
      await expect(keys.generate()).rejects.toThrow(/cannot open the KMS tunnel: .*ECONNREFUSED/)
    } finally {
      client.destroy()
    }
  })
})

describe('the production enclave\u2019s KMS client', () => {
  /**
   * One data key made in a process of its own, whose NODE_EXTRA_CA_CERTS adds the CA of the local KMS's TLS front (as
   * a base image, or an attacker's configuration, might): with `tls` `bundledRootsOnly` or not, through the tunnel or
   * straight to the front. What it printed: `made`, or the error.
   */
  async function makeKeyWithExtraCa({ pinned, tunnel }: { pinned: boolean; tunnel: boolean }): Promise<string> {
    const dir = mkdtempSync(path.join(tmpdir(), 'extra-ca-'))
    try {
      writeFileSync(path.join(dir, 'ca.pem'), ca.caPem)
      const module = (file: string) => JSON.stringify(pathToFileURL(path.resolve(file)).href)
      const script = `
        import { enclaveKmsClient, kmsTlsFor } from ${module('enclave-origin/enclave/kmsClient.ts')}
        import { DeliveredCredentials } from ${module('enclave-origin/enclave/deliveredCredentials.ts')}
        import { developmentAttestation, KmsDataKeys } from ${module('enclave-origin/enclave/dataKey.ts')}
        const { credentials, kmsKeyId, endpoint, tunnelPort, pinned } = JSON.parse(process.env.CASE)
        const delivered = new DeliveredCredentials()
        delivered.set(credentials)
        const client = enclaveKmsClient({ endpoint, region: credentials.region, credentials: delivered, timeoutMs: 5000, tunnel: tunnelPort ? { host: '127.0.0.1', port: tunnelPort } : undefined, tls: kmsTlsFor(pinned ? 'production' : 'development') })
        await new KmsDataKeys({ client, kmsKeyId, attestation: developmentAttestation }).generate().then(() => console.log('made'), (error) => console.log(error.message))
        client.destroy()
      `
      const testCase = {
        credentials: kms.credentials,
        kmsKeyId: kms.createSymmetricKey(),
        endpoint: tunnel ? `https://${kmsHost}` : `https://127.0.0.1:${ports.direct}`,
        tunnelPort: tunnel ? ports.relay : undefined,
        pinned,
      }
      const { stdout } = await promisify(execFile)(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], {
        env: { ...process.env, NODE_EXTRA_CA_CERTS: path.join(dir, 'ca.pem'), CASE: JSON.stringify(testCase) },
        timeout: 20_000,
      })
      return stdout.trim()
    } finally {
      rmSync(dir, { recursive: true, force: true })
    }
  }

  it.each([true, false])('in production, trusts Node\u2019s bundled roots alone, not a CA added by NODE_EXTRA_CA_CERTS (through the tunnel: %s)', async (tunnel) => {
    // In development the added CA vouches for whoever holds its certificate: the key is made.
    const [development, production] = await Promise.all([makeKeyWithExtraCa({ pinned: false, tunnel }), makeKeyWithExtraCa({ pinned: true, tunnel })])
    expect(development).toBe('made')
    expect(production).toMatch(/unable to verify|unable to get local issuer|self[- ]signed/)
  }, 30_000)

  it('takes its endpoint from the region when KMS_ENDPOINT is unset, never from AWS_ENDPOINT_URL_KMS, which the start-up checks do not see', async () => {
    const before = process.env.AWS_ENDPOINT_URL_KMS
    process.env.AWS_ENDPOINT_URL_KMS = `https://127.0.0.1:${ports.direct}`
    const credentials = new DeliveredCredentials()
    credentials.set(kms.credentials)
    const client = enclaveKmsClient({ region: 'us-east-1', credentials, timeoutMs: 1_000 })
    // Where each request would go, stopped before it is sent: nothing here reaches the network.
    const hosts: string[] = []
    client.middlewareStack.add(
      (_next, _context) => async (args) => {
        hosts.push((args.request as { hostname: string }).hostname)
        throw new Error('stopped before sending')
      },
      { step: 'finalizeRequest' },
    )
    try {
      await expect(new KmsDataKeys({ client, kmsKeyId: 'alias/test', attestation: developmentAttestation }).generate()).rejects.toThrow('stopped before sending')
      expect(new Set(hosts)).toEqual(new Set(['kms.us-east-1.amazonaws.com']))
    } finally {
      client.destroy()
      if (before === undefined) delete process.env.AWS_ENDPOINT_URL_KMS
      else process.env.AWS_ENDPOINT_URL_KMS = before
    }
  })
})
