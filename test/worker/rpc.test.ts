import { beforeAll, describe, expect, it } from 'vitest'
import { hexToBigInt, hexToBytes, recoverMessageAddress, size, slice, type Address, type Hex } from 'viem'
import { getUserOperationHash, type UserOperation } from 'viem/account-abstraction'
import { pimlicoSingletonV6, pimlicoSingletonV7, pimlicoSingletonV8, pimlicoSingletonV8Eip7702 } from '../../worker/sponsor/adapters/pimlicoSingleton.js'
import { toUserOperationV06, toUserOperationV07, userOperationV06Schema, userOperationV07Schema } from '../../worker/sponsor/userOperation.js'
import { rpcUserOperationV06, rpcUserOperationV07, withoutGas } from '../support/userOperations.js'
import { chainId, entryPoints, paymasters, postWith, request, rpc, seedSignerKey, withConfig } from './helpers.js'

let signer: Address
beforeAll(async () => {
  signer = await seedSignerKey()
})

const chainHex = '0x7a69'
const zeroBytes = (hex: Hex) => hexToBytes(hex).filter((b) => b === 0).length

describe('ERC-7677 pm_getPaymasterStubData', () => {
  it('returns v0.7 paymaster fields, gas limits, sponsor and isFinal=false without gas fields', async () => {
    const { status, body } = await rpc(request('pm_getPaymasterStubData', [withoutGas(rpcUserOperationV07()), entryPoints['0.7'], chainHex, {}]))
    expect(status).toBe(200)
    expect(body.result).toMatchObject({
      paymaster: paymasters['0.7'],
      paymasterVerificationGasLimit: '0xea60',
      paymasterPostOpGasLimit: '0x1',
      sponsor: { name: 'Edge Paymaster' },
      isFinal: false,
    })
    expect(size(body.result.paymasterData)).toBe(13 + 65)
  })

  it('returns paymasterAndData for v0.6', async () => {
    const { body } = await rpc(request('pm_getPaymasterStubData', [withoutGas(rpcUserOperationV06()), entryPoints['0.6'], chainHex, null]))
    expect(body.result.paymasterAndData.slice(0, 42).toLowerCase()).toBe(paymasters['0.6'].toLowerCase())
    expect(size(body.result.paymasterAndData)).toBe(20 + 13 + 65)
    expect(body.result.isFinal).toBe(false)
  })

  it('has the final data length and no more zero bytes than the final data, for every version', async () => {
    for (const version of ['0.6', '0.7', '0.8'] as const) {
      const op = version === '0.6' ? rpcUserOperationV06() : rpcUserOperationV07()
      const stub = await rpc(request('pm_getPaymasterStubData', [op, entryPoints[version], chainHex]))
      const final = await rpc(request('pm_getPaymasterData', [op, entryPoints[version], chainHex]))
      const stubData: Hex = stub.body.result.paymasterAndData ?? stub.body.result.paymasterData
      const finalData: Hex = final.body.result.paymasterAndData ?? final.body.result.paymasterData
      expect(size(stubData)).toBe(size(finalData))
      expect(zeroBytes(stubData)).toBeLessThanOrEqual(zeroBytes(finalData))
    }
  })
})

type SignedFields = { paymaster: Address; paymasterData: Hex; paymasterVerificationGasLimit: Hex; paymasterPostOpGasLimit: Hex; userOpHash: Hex }

/** A v0.7+ RPC operation with the Pimlico paymaster fields the Worker signed, and the validity window they carry. */
function signedOperation(op: unknown, result: SignedFields) {
  const final = {
    ...toUserOperationV07(userOperationV07Schema.parse(op)),
    paymaster: result.paymaster,
    paymasterVerificationGasLimit: BigInt(result.paymasterVerificationGasLimit),
    paymasterPostOpGasLimit: BigInt(result.paymasterPostOpGasLimit),
    paymasterData: result.paymasterData,
  }
  const window = { validUntil: Number(hexToBigInt(slice(result.paymasterData, 1, 7))), validAfter: Number(hexToBigInt(slice(result.paymasterData, 7, 13))) }
  return { final, window }
}

describe('ERC-7677 pm_getPaymasterData', () => {
  it('signs the Pimlico V7 hash with the Secrets Store key and returns the userOpHash', async () => {
    const op = rpcUserOperationV07()
    const { body } = await rpc(request('pm_getPaymasterData', [op, entryPoints['0.7'], chainHex, {}]))
    const result = body.result as SignedFields
    expect(Object.keys(result).sort()).toEqual(
      ['paymaster', 'paymasterData', 'paymasterPostOpGasLimit', 'paymasterVerificationGasLimit', 'userOpHash'].sort(),
    )
    const signature = slice(result.paymasterData, 13)
    const { final, window } = signedOperation(op, result)
    const hash = pimlicoSingletonV7.hash({ op: final, chainId, paymaster: result.paymaster, window })
    expect(await recoverMessageAddress({ message: { raw: hash }, signature })).toBe(signer)
    expect(result.userOpHash).toBe(
      getUserOperationHash({ userOperation: final as UserOperation<'0.7'>, chainId, entryPointAddress: entryPoints['0.7'], entryPointVersion: '0.7' }),
    )
    expect(window.validUntil - window.validAfter).toBe(600 + 60)
  })

  it('signs v0.6 paymasterAndData over the V6 hash', async () => {
    const op = rpcUserOperationV06()
    const { body } = await rpc(request('pm_getPaymasterData', [op, entryPoints['0.6'], chainHex]))
    const paymasterAndData: Hex = body.result.paymasterAndData
    const window = { validUntil: Number(hexToBigInt(slice(paymasterAndData, 21, 27))), validAfter: Number(hexToBigInt(slice(paymasterAndData, 27, 33))) }
    const final = { ...toUserOperationV06(userOperationV06Schema.parse(op)), paymasterAndData }
    const hash = pimlicoSingletonV6.hash({ op: final, chainId, paymaster: paymasters['0.6'], window })
    expect(await recoverMessageAddress({ message: { raw: hash }, signature: slice(paymasterAndData, 33) })).toBe(signer)
  })

  it('keeps paymaster gas limits the wallet took from the stub', async () => {
    const op = rpcUserOperationV07({ paymasterVerificationGasLimit: '0x11170', paymasterPostOpGasLimit: '0x0' })
    const { body } = await rpc(request('pm_getPaymasterData', [op, entryPoints['0.8'], chainHex]))
    expect(body.result.paymaster).toBe(paymasters['0.8'])
    expect(body.result.paymasterVerificationGasLimit).toBe('0x11170')
    expect(body.result.paymasterPostOpGasLimit).toBe('0x0')
  })

  it('refuses to sign without the gas fields the signature covers, naming the field', async () => {
    const { body } = await rpc(request('pm_getPaymasterData', [withoutGas(rpcUserOperationV07()), entryPoints['0.7'], chainHex]))
    expect(body.error.code).toBe(-32602)
    expect(body.error.message).toContain('userOperation.callGasLimit')
  })
})

describe('EIP-7702 UserOperations', () => {
  const authorization = {
    address: '0xe6Cae83BdE06E4c305530e199D7217f42808555B',
    chainId: '0x7a69',
    nonce: '0x0',
    r: `0x${'11'.repeat(32)}`,
    s: `0x${'22'.repeat(32)}`,
    yParity: '0x1',
  }

  it('v0.8: signs one with its authorization, and refuses to sign the marker without one (its userOpHash needs the delegate)', async () => {
    for (const factory of ['0x7702', '0x7702000000000000000000000000000000000000']) {
      const op = rpcUserOperationV07({ factory, factoryData: '0x', eip7702Auth: authorization })
      const signed = await rpc(request('pm_getPaymasterData', [op, entryPoints['0.8'], chainHex]))
      expect(signed.body.result.paymaster).toBe(paymasters['0.8'])
      const { eip7702Auth, ...withoutAuthorization } = op
      const { body } = await rpc(request('pm_getPaymasterData', [withoutAuthorization, entryPoints['0.8'], chainHex]))
      expect(body.error).toMatchObject({ code: -32602 })
      expect(body.error.message).toBe(
        'invalid userOperation for EntryPoint v0.8: userOperation.eip7702Auth: an EIP-7702 UserOperation (factory 0x7702) needs eip7702Auth, which names the delegate the EntryPoint hashes in the marker\u2019s place',
      )
      const sponsored = await rpc(request('pm_sponsorUserOperation', [withoutAuthorization, entryPoints['0.8']]))
      expect(sponsored.body.error).toMatchObject({ code: -32602, message: body.error.message })
      // Stub data has no userOpHash: a wallet may ask for it before it has signed its authorization.
      const stub = await rpc(request('pm_getPaymasterStubData', [withoutAuthorization, entryPoints['0.8'], chainHex, {}]))
      expect(stub.body.result.paymaster).toBe(paymasters['0.8'])
    }
  })

  it('v0.8: refuses factoryData after the short marker (the EntryPoint reads the first 20 bytes of 0x7702 ‖ factoryData), and signs it after the full one', async () => {
    const short = rpcUserOperationV07({ factory: '0x7702', factoryData: '0xabcdef', eip7702Auth: authorization })
    for (const method of ['pm_getPaymasterStubData', 'pm_getPaymasterData']) {
      const { body } = await rpc(request(method, [short, entryPoints['0.8'], chainHex, {}]))
      expect(body.error, method).toMatchObject({ code: -32602 })
      expect(body.error.message).toContain('userOperation.factory: with factoryData, the EIP-7702 marker must be written in full (0x7702 and 36 zeros)')
    }
    // v0.7 refuses the marker whatever its form, and says only that.
    const onV07 = await rpc(request('pm_getPaymasterStubData', [short, entryPoints['0.7'], chainHex, {}]))
    expect(onV07.body.error.message).toContain('needs EntryPoint v0.8')
    expect(onV07.body.error.message).not.toContain('written in full')
    const full = { ...short, factory: '0x7702000000000000000000000000000000000000' }
    const { body } = await rpc(request('pm_getPaymasterData', [full, entryPoints['0.8'], chainHex]))
    expect(body.result.paymaster).toBe(paymasters['0.8'])
  })

  it('v0.8 with pimlico-singleton-7702: signs the V7 hash wrapped with the delegate’s override, not the V7 hash', async () => {
    const bindings = withConfig((config) => ({
      ...config,
      chains: config.chains.map((chain) => ({ ...chain, paymasters: chain.paymasters.map((p) => (p.entryPointVersion === '0.8' ? { ...p, contract: 'pimlico-singleton-7702' } : p)) })),
    }))
    for (const initCode of [{ factory: null, factoryData: null }, { factory: '0x7702000000000000000000000000000000000000', factoryData: '0xabcdef' }]) {
      const op = rpcUserOperationV07({ ...initCode, eip7702Auth: authorization })
      const response = await postWith(bindings, '/rpc', request('pm_getPaymasterData', [op, entryPoints['0.8'], chainHex]))
      const { result } = (await response.json()) as { result: SignedFields }
      const { final, window } = signedOperation(op, result)
      const hashes = [pimlicoSingletonV8Eip7702, pimlicoSingletonV8].map((adapter) => adapter.hash({ op: final, chainId, paymaster: result.paymaster, window }))
      const signature = slice(result.paymasterData, 13)
      expect(await Promise.all(hashes.map((hash) => recoverMessageAddress({ message: { raw: hash }, signature }))), initCode.factory ?? 'no initCode').toEqual([signer, expect.not.stringMatching(signer)])
    }
  })

  it('v0.7: refuses the marker, which that EntryPoint would call as a factory, and leaves an authorization alone to the bundler', async () => {
    const { body } = await rpc(request('pm_getPaymasterStubData', [rpcUserOperationV07({ factory: '0x7702', factoryData: '0x' }), entryPoints['0.7'], chainHex, {}]))
    expect(body.error).toMatchObject({ code: -32602 })
    expect(body.error.message).toContain('userOperation.factory: the EIP-7702 initCode marker (factory 0x7702) needs EntryPoint v0.8')
    const delegated = await rpc(request('pm_getPaymasterData', [rpcUserOperationV07({ factory: null, factoryData: null, eip7702Auth: authorization }), entryPoints['0.7'], chainHex]))
    expect(delegated.body.result.paymaster).toBe(paymasters['0.7'])
  })
})

describe('pm_sponsorUserOperation', () => {
  it('answers in the Pimlico v0.7 shape, echoing the signed gas fields', async () => {
    const op = rpcUserOperationV07()
    const { body } = await rpc(request('pm_sponsorUserOperation', [op, entryPoints['0.7']]))
    expect(body.result).toMatchObject({
      paymaster: paymasters['0.7'],
      paymasterVerificationGasLimit: '0xea60',
      paymasterPostOpGasLimit: '0x1',
      preVerificationGas: op.preVerificationGas,
      verificationGasLimit: op.verificationGasLimit,
      callGasLimit: op.callGasLimit,
    })
    expect(body.result.userOpHash).toMatch(/^0x[0-9a-f]{64}$/)
  })

  it('answers in the Pimlico v0.6 shape', async () => {
    const op = rpcUserOperationV06()
    const { body } = await rpc(request('pm_sponsorUserOperation', [op, entryPoints['0.6'], { sponsorshipPolicyId: 'sp_x' }]))
    expect(Object.keys(body.result).sort()).toEqual(
      ['callGasLimit', 'paymasterAndData', 'preVerificationGas', 'userOpHash', 'verificationGasLimit'].sort(),
    )
  })
})

describe('chain and entry point discovery', () => {
  it('eth_chainId and pm_supportedEntryPoints describe the configured chain', async () => {
    expect((await rpc(request('eth_chainId', []))).body.result).toBe(chainHex)
    expect((await rpc(request('pm_supportedEntryPoints', []))).body.result).toEqual(Object.values(entryPoints))
    expect((await rpc(request('eth_chainId', []), { path: '/rpc/31337' })).body.result).toBe(chainHex)
  })

  it('rejects an unsupported chain with data.reason and the supported list', async () => {
    const { body } = await rpc(request('pm_getPaymasterStubData', [rpcUserOperationV07(), entryPoints['0.7'], '0x1']))
    expect(body.error).toMatchObject({ code: -32602, data: { reason: 'unsupported_chain', supported: [31337] } })
    const viaRoute = await rpc(request('eth_chainId', []), { path: '/rpc/1' })
    expect(viaRoute.body.error.data.reason).toBe('unsupported_chain')
  })

  it('rejects an unknown entry point, naming the supported ones', async () => {
    const { body } = await rpc(request('pm_getPaymasterStubData', [rpcUserOperationV07(), '0x000000000000000000000000000000000000beef', chainHex]))
    expect(body.error.code).toBe(-32602)
    expect(body.error.data.reason).toBe('unsupported_entry_point')
    expect(body.error.message).toContain(entryPoints['0.7'])
  })

  it('rejects a chainId that disagrees with the URL', async () => {
    const { body } = await rpc(request('pm_getPaymasterStubData', [rpcUserOperationV07(), entryPoints['0.7'], '0x1']), { path: '/rpc/31337' })
    expect(body.error.data.reason).toBe('chain_mismatch')
  })
})

describe('policy declines', () => {
  it('declines a denied sender with its own code and data.reason, before signing', async () => {
    const op = rpcUserOperationV07({ sender: '0x000000000000000000000000000000000000dEaD' })
    for (const method of ['pm_getPaymasterStubData', 'pm_getPaymasterData']) {
      const { status, body } = await rpc(request(method, [op, entryPoints['0.7'], chainHex]))
      expect(status).toBe(200)
      expect(body.error).toMatchObject({ code: -32002, data: { reason: 'sender_denied' } })
    }
  })

  it('declines a call gas limit above the cap, naming field and limit', async () => {
    const { body } = await rpc(request('pm_getPaymasterData', [rpcUserOperationV07({ callGasLimit: '0x4c4b41' }), entryPoints['0.7'], chainHex]))
    expect(body.error).toMatchObject({ code: -32002, data: { reason: 'gas_limit_exceeded', field: 'callGasLimit', limit: '5000000' } })
  })

  it('declines a postOp gas limit above the paymaster\u2019s own (v0.7 charges the paymaster for what goes unused), on every method', async () => {
    // The testing config sets no maxPaymasterPostOpGasLimit: the cap is the adapter's postOp limit, 1.
    const op = rpcUserOperationV07({ paymasterPostOpGasLimit: '0x4c4b40' })
    for (const [method, params] of [
      ['pm_getPaymasterData', [op, entryPoints['0.7'], chainHex]],
      ['pm_sponsorUserOperation', [op, entryPoints['0.7']]],
      ['pm_getPaymasterData', [op, entryPoints['0.8'], chainHex]],
    ] as const) {
      const { body } = await rpc(request(method, [...params]))
      expect(body.error, method).toMatchObject({ code: -32002, data: { reason: 'gas_limit_exceeded', field: 'paymasterPostOpGasLimit', limit: '1', value: '5000000' } })
    }
    // The stub answers what will be signed: the paymaster's own value in place of a higher one.
    const stub = await rpc(request('pm_getPaymasterStubData', [op, entryPoints['0.7'], chainHex, {}]))
    expect(stub.body.result.paymasterPostOpGasLimit).toBe('0x1')
    const { body } = await rpc(request('pm_getPaymasterData', [{ ...op, paymasterPostOpGasLimit: stub.body.result.paymasterPostOpGasLimit }, entryPoints['0.7'], chainHex]))
    expect(body.result.paymasterPostOpGasLimit).toBe('0x1')
    // A lower one is the wallet's to keep.
    const lower = await rpc(request('pm_getPaymasterStubData', [{ ...op, paymasterPostOpGasLimit: '0x0' }, entryPoints['0.7'], chainHex, {}]))
    expect(lower.body.result.paymasterPostOpGasLimit).toBe('0x0')
  })

  it('declines when gas limits times maxFeePerGas exceed the total cost cap', async () => {
    const op = rpcUserOperationV07({ maxFeePerGas: '0x2540be4000' }) // 160 gwei × ~621k gas > 0.05 ETH
    const { body } = await rpc(request('pm_getPaymasterData', [op, entryPoints['0.7'], chainHex]))
    expect(body.error).toMatchObject({ code: -32002, data: { reason: 'max_cost_exceeded', limit: '50000000000000000' } })
  })
})
