import type { z } from 'zod'
import { sponsor } from '../sponsor/sponsor.js'
import { chainOf, erc7677ParamNames, erc7677Params, type RpcContext } from './context.js'
import { paymasterFieldsJson } from '../paymasterFieldsJson.js'
import type { RpcMethod } from './jsonRpc.js'

/** ERC-7677 final paymaster data, signed; also the userOpHash the account will sign. */
export const pm_getPaymasterData: RpcMethod<RpcContext> = {
  name: 'pm_getPaymasterData',
  paramNames: erc7677ParamNames,
  params: erc7677Params,
  handler: async ([userOperation, entryPoint, chainId]: z.infer<typeof erc7677Params>, context: RpcContext) => {
    const sponsorship = await sponsor(context.services.sponsor, {
      chainId: chainOf(context, chainId),
      entryPoint,
      userOperation,
      apiKeyId: context.apiKeyId,
    })
    return { ...paymasterFieldsJson(sponsorship), userOpHash: sponsorship.userOpHash }
  },
}
