import type { RpcContext } from './context.js'
import { eth_chainId } from './eth_chainId.js'
import type { RpcMethod } from './jsonRpc.js'
import { pm_getPaymasterData } from './pm_getPaymasterData.js'
import { pm_getPaymasterStubData } from './pm_getPaymasterStubData.js'
import { pm_sponsorUserOperation } from './pm_sponsorUserOperation.js'
import { pm_supportedEntryPoints } from './pm_supportedEntryPoints.js'

export const rpcMethods: ReadonlyMap<string, RpcMethod<RpcContext>> = new Map(
  [pm_getPaymasterStubData, pm_getPaymasterData, pm_sponsorUserOperation, pm_supportedEntryPoints, eth_chainId].map(
    (method) => [method.name, method],
  ),
)
