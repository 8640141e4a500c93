import { z } from 'zod'
import { numberToHex } from 'viem'
import { findChain } from '../sponsor/sponsor.js'
import { chainOf, type RpcContext } from './context.js'
import type { RpcMethod } from './jsonRpc.js'

const params = z.tuple([])

export const eth_chainId: RpcMethod<RpcContext> = {
  name: 'eth_chainId',
  paramNames: [],
  params,
  handler: async (_params: z.infer<typeof params>, context: RpcContext) =>
    numberToHex(findChain(context.services.config, chainOf(context)).chainId),
}
