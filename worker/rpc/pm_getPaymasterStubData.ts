import type { z } from 'zod'
import { stubFor } from '../sponsor/sponsor.js'
import { chainOf, erc7677ParamNames, erc7677Params, type RpcContext } from './context.js'
import { paymasterFieldsJson } from '../paymasterFieldsJson.js'
import type { RpcMethod } from './jsonRpc.js'

/**
 * ERC-7677 stub data for gas estimation: the final layout with a stand-in
 * signature. Not final: the real signature covers gas fields the wallet has
 * yet to estimate. Declined as signing would be for the sender and a used-up
 * quota; nothing is counted.
 */
export const pm_getPaymasterStubData: RpcMethod<RpcContext> = {
  name: 'pm_getPaymasterStubData',
  paramNames: erc7677ParamNames,
  params: erc7677Params,
  handler: async ([userOperation, entryPoint, chainId]: z.infer<typeof erc7677Params>, context: RpcContext) => {
    const stub = await stubFor(context.services.sponsor, {
      chainId: chainOf(context, chainId),
      entryPoint,
      userOperation,
      apiKeyId: context.apiKeyId,
    })
    return { ...paymasterFieldsJson(stub), sponsor: context.services.config.sponsor, isFinal: false }
  },
}
