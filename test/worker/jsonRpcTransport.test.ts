import { beforeAll, describe, expect, it, vi } from 'vitest'
import { rpcUserOperationV07 } from '../support/userOperations.js'
import { call, entryPoints, request, rpc, seedSignerKey } from './helpers.js'

beforeAll(async () => {
  await seedSignerKey()
})

describe('JSON-RPC 2.0 transport', () => {
  it('answers a batch in order, mixing results and errors, and omits notifications', async () => {
    const { status, body } = await rpc([
      request('eth_chainId', [], 'a'),
      { jsonrpc: '2.0', method: 'eth_chainId', params: [] },
      request('no_such_method', [], 'b'),
      { id: 'c', method: 'eth_chainId' },
    ])
    expect(status).toBe(200)
    expect(body).toEqual([
      { jsonrpc: '2.0', id: 'a', result: '0x7a69' },
      { jsonrpc: '2.0', id: 'b', error: { code: -32601, message: 'method no_such_method is not supported' } },
      { jsonrpc: '2.0', id: 'c', error: expect.objectContaining({ code: -32600 }) },
    ])
  })

  it('signs nothing for a notification, which no one would receive', async () => {
    const log = vi.spyOn(console, 'log')
    try {
      const sponsorships = () => log.mock.calls.filter(([line]) => typeof line === 'string' && line.includes('"event":"sponsorship"')).length
      const notification = { jsonrpc: '2.0', method: 'pm_getPaymasterData', params: [rpcUserOperationV07(), entryPoints['0.7'], '0x7a69'] }
      const { status, body } = await rpc([notification, request('pm_getPaymasterData', notification.params, 'signed')])
      expect(status).toBe(200)
      expect(body).toEqual([expect.objectContaining({ id: 'signed', result: expect.objectContaining({ paymaster: expect.any(String) }) })])
      // The request with an id was signed, and logged as such; the notification was not.
      expect(sponsorships()).toBe(1)
      expect((await rpc(notification)).status).toBe(204)
      expect(sponsorships()).toBe(1)
    } finally {
      log.mockRestore()
    }
  })

  it('answers a batch of notifications with no content', async () => {
    const response = await rpc([{ jsonrpc: '2.0', method: 'eth_chainId', params: [] }])
    expect(response.status).toBe(204)
    expect(response.body).toBeUndefined()
  })

  it('rejects an empty batch and an oversized batch with -32600', async () => {
    expect((await rpc([])).body.error.code).toBe(-32600)
    const big = Array.from({ length: 33 }, (_, i) => request('eth_chainId', [], i))
    const { body } = await rpc(big)
    expect(body.error).toMatchObject({ code: -32600, message: expect.stringContaining('limit of 32') })
  })

  it('answers a body that is not JSON with -32700', async () => {
    const { status, body } = await rpc('{"jsonrpc": "2.0", "method": ')
    expect(status).toBe(400)
    expect(body).toEqual({ jsonrpc: '2.0', id: null, error: { code: -32700, message: 'request body is not valid JSON' } })
  })

  it('answers an empty body and invalid UTF-8 with -32700', async () => {
    expect((await rpc('')).body.error.code).toBe(-32700)
    const response = await call('/rpc', { method: 'POST', headers: { 'x-api-key': 'test-key-1' }, body: new Uint8Array([0x7b, 0xff, 0xfe, 0x7d]) })
    expect(((await response.json()) as { error: { code: number } }).error.code).toBe(-32700)
  })

  it('answers a request of the wrong shape with -32600, keeping its id', async () => {
    const { body } = await rpc({ jsonrpc: '1.0', id: 7, method: 'eth_chainId' })
    expect(body).toMatchObject({ id: 7, error: { code: -32600 } })
    expect((await rpc(42)).body.error.code).toBe(-32600)
    expect((await rpc({ jsonrpc: '2.0', id: 1, method: 'eth_chainId', params: 'x' })).body.error.code).toBe(-32600)
  })

  it('answers params given by name with -32602, saying the method takes them by position', async () => {
    const { body } = await rpc({ jsonrpc: '2.0', id: 3, method: 'pm_getPaymasterStubData', params: { userOperation: rpcUserOperationV07() } })
    expect(body).toEqual({
      jsonrpc: '2.0',
      id: 3,
      error: { code: -32602, message: 'invalid params: pm_getPaymasterStubData takes its params by position, as an array [userOperation, entryPoint, chainId, context], not by name' },
    })
    // An empty object names nothing: as good as no params.
    expect((await rpc({ jsonrpc: '2.0', id: 4, method: 'eth_chainId', params: {} })).body).toEqual({ jsonrpc: '2.0', id: 4, result: '0x7a69' })
  })

  it('answers an unknown method with -32601', async () => {
    expect((await rpc(request('eth_sendTransaction', []))).body.error.code).toBe(-32601)
  })

  it('answers wrong param types with -32602 naming the field', async () => {
    const cases: Array<[unknown[], string]> = [
      [[rpcUserOperationV07({ sender: '0x1234' }), entryPoints['0.7'], '0x7a69'], 'userOperation.sender'],
      [[rpcUserOperationV07({ nonce: 5 }), entryPoints['0.7'], '0x7a69'], 'userOperation.nonce'],
      [[rpcUserOperationV07({ callData: '0xabc' }), entryPoints['0.7'], '0x7a69'], 'userOperation.callData'],
      [[rpcUserOperationV07({ callGasLimit: `0x1${'0'.repeat(32)}` }), entryPoints['0.7'], '0x7a69'], 'exceeds uint128'],
      [['not an object', entryPoints['0.7'], '0x7a69'], 'userOperation'],
      [[rpcUserOperationV07(), 'entry', '0x7a69'], 'entryPoint'],
      [[rpcUserOperationV07(), entryPoints['0.7'], 'sepolia'], 'chainId'],
      [[], 'userOperation'],
    ]
    for (const [params, named] of cases) {
      const { status, body } = await rpc(request('pm_getPaymasterData', params))
      expect(status).toBe(200)
      expect(body.error.code).toBe(-32602)
      expect(body.error.message).toContain(named)
    }
  })

  it('rejects a body above the size limit with 413 before parsing it', async () => {
    const huge = JSON.stringify(request('pm_getPaymasterData', [rpcUserOperationV07({ callData: `0x${'ab'.repeat(200_000)}` }), entryPoints['0.7'], '0x7a69']))
    const { status, body } = await rpc(huge)
    expect(status).toBe(413)
    expect(body.error).toMatchObject({ code: -32600, message: expect.stringContaining('262144') })
  })

  it('requires an API key, from the header or the apiKey query parameter', async () => {
    const missing = await rpc(request('eth_chainId', []), { headers: { 'x-api-key': '' } })
    expect(missing.status).toBe(401)
    expect(missing.body.error).toMatchObject({ code: -32001, data: { reason: 'missing_api_key' } })
    const wrong = await rpc(request('eth_chainId', []), { headers: { 'x-api-key': 'test-key-3' } })
    expect(wrong.body.error.data.reason).toBe('invalid_api_key')
    const second = await rpc(request('eth_chainId', []), { headers: { 'x-api-key': 'test-key-2' } })
    expect(second.body.result).toBe('0x7a69')
    const query = await call('/rpc?apiKey=test-key-1', { method: 'POST', body: JSON.stringify(request('eth_chainId', [])) })
    expect(((await query.json()) as { result: string }).result).toBe('0x7a69')
  })

  it('serves JSON-RPC on POST / as well, and says so for GET', async () => {
    expect((await rpc(request('eth_chainId', []), { path: '/' })).body.result).toBe('0x7a69')
    const get = await call('/rpc', { headers: { 'x-api-key': 'test-key-1' } })
    expect(get.status).toBe(404)
    expect(((await get.json()) as { error: { message: string } }).error.message).toContain('POST')
  })
})
