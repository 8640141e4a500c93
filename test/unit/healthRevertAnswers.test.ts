import { createServer } from 'node:http'
import type { AddressInfo } from 'node:net'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { healthReport } from '../../worker/health.js'
import { listenLocal, readBody } from '../support/localHttp.js'

/**
 * /health's getHash check against a local JSON-RPC server that answers every eth_call as one node client or another
 * answers a revert (or fails in a way that is not one): each client's revert says the contract there is not the
 * config's; anything else is the RPC's own failure.
 */

/** What the server answers: a JSON-RPC error object, or an HTTP status with a page. */
let answer: { error: { code: number; message: string; data?: string } } | { httpStatus: number; page: string }
let stop: () => Promise<void>
let rpcUrl: string

beforeAll(async () => {
  const server = createServer(async (request, response) => {
    const { id } = JSON.parse((await readBody(request)).toString('utf8')) as { id: number }
    if ('httpStatus' in answer) {
      response.statusCode = answer.httpStatus
      response.end(answer.page)
      return
    }
    response.setHeader('content-type', 'application/json')
    response.end(JSON.stringify({ jsonrpc: '2.0', id, error: answer.error }))
  })
  stop = await listenLocal(server, 0)
  rpcUrl = `http://127.0.0.1:${(server.address() as AddressInfo).port}`
})

afterAll(() => stop())

async function getHashError(): Promise<unknown> {
  const paymasters = [{ entryPointVersion: '0.7', contract: 'pimlico-singleton', address: '0xd8A5406E24dcDc93656c1eF20E491a1FcF43b558' }]
  const report = await healthReport({ PROFILE: 'development', PAYMASTER_CONFIG: { chains: [{ chainId: 31337, rpcUrl, paymasters }] } })
  const check = report.chains![0]!.paymasterHashes![0]!
  return 'error' in check ? check.error : undefined
}

const reverted = "getHash reverted: no pimlico-singleton paymaster for v0.7 at this address on the RPC's chain"
const unreachable = 'could not call getHash over the chain RPC'

describe("/health's getHash check", () => {
  it.each([
    ['geth and anvil (code 3)', { code: 3, message: 'execution reverted', data: '0x' }, reverted],
    ['newer Nethermind (-32000, "execution reverted")', { code: -32000, message: 'execution reverted', data: '0xf4f28e99' }, reverted],
    ['older Nethermind (-32015, "VM execution error.")', { code: -32015, message: 'VM execution error.', data: 'err: 0xdf2d9b42 (supplied gas 36000000)' }, reverted],
    ['Hardhat ("VM Exception … reverted with …")', { code: -32603, message: "Error: VM Exception while processing transaction: reverted with reason string 'no'" }, reverted],
    ['an RPC limit (-32005)', { code: -32005, message: 'request limit exceeded' }, unreachable],
    ['a node still syncing (-32000, "header not found")', { code: -32000, message: 'header not found' }, unreachable],
  ])('reads a revert as %s answers it, or a failure as the RPC\u2019s', async (_client, error, expected) => {
    answer = { error }
    expect(await getHashError()).toBe(expected)
  })

  it('takes an HTTP error page that says "execution reverted" for the RPC\u2019s own failure', async () => {
    answer = { httpStatus: 502, page: 'upstream said: execution reverted' }
    expect(await getHashError()).toBe(unreachable)
  })
})
