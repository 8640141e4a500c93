import { createServer } from 'node:http'
import type { AddressInfo } from 'node:net'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { pad } from 'viem'
import { healthReport } from '../../worker/health.js'
import { listenLocal, readBody } from '../support/localHttp.js'

/**
 * /health's chain checks against a local JSON-RPC server that holds each request a while and counts how many it
 * held at once: one report's requests, across all its chains, take turns four at a time, so that none spends its
 * timeout queued behind the Worker's six connections.
 */

let inFlight = 0
let mostInFlight = 0
let received = 0
let stop: () => Promise<void>
let rpcUrl: string

beforeAll(async () => {
  const server = createServer(async (request, response) => {
    const { id } = JSON.parse((await readBody(request)).toString('utf8')) as { id: number }
    received += 1
    inFlight += 1
    mostInFlight = Math.max(mostInFlight, inFlight)
    // Long enough for every request sent at once to be here together.
    await new Promise((answer) => setTimeout(answer, 100))
    inFlight -= 1
    response.setHeader('content-type', 'application/json')
    response.end(JSON.stringify({ jsonrpc: '2.0', id, result: pad('0x01') }))
  })
  stop = await listenLocal(server, 0)
  rpcUrl = `http://127.0.0.1:${(server.address() as AddressInfo).port}`
})

afterAll(() => stop())

describe('/health over a chain RPC', () => {
  it('has at most four requests out at once across all its chains', async () => {
    const chain = (chainId: number) => ({
      chainId,
      rpcUrl,
      paymasters: [
        { entryPointVersion: '0.6', contract: 'pimlico-singleton', address: '0x3dd4568B46ec6fB9333F57Ec0E780CC94D19B322' },
        { entryPointVersion: '0.7', contract: 'pimlico-singleton', address: '0xd8A5406E24dcDc93656c1eF20E491a1FcF43b558' },
        { entryPointVersion: '0.8', contract: 'pimlico-singleton', address: '0x7B6310A3247EcCCF0c34Ae6c77f6837d193077CF' },
      ],
    })
    const report = await healthReport({ PROFILE: 'development', PAYMASTER_CONFIG: { chains: [chain(1), chain(10), chain(8453)] } })
    // Per chain: each paymaster's signer list, and its getHash.
    expect(received).toBe(3 * (3 + 3))
    expect(mostInFlight).toBe(4)
    // Every request was answered: each signer authorised (true), and each getHash answered a hash (not ours).
    expect(report.chains!.flatMap((c) => c.signerAuthorisation ?? []).map((a) => a.authorised)).toEqual(Array(9).fill(true))
    expect(report.chains!.flatMap((c) => c.paymasterHashes ?? []).map((h) => h.agrees)).toEqual(Array(9).fill(false))
  })
})
