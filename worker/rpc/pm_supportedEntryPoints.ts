import { z } from 'zod'
import { findChain } from '../sponsor/sponsor.js'
import { supportedEntryPoints } from '../sponsor/entryPoints.js'
import { chainOf, type RpcContext } from './context.js'
import type { RpcMethod } from './jsonRpc.js'

const params = z.tuple([])

/** The entry points this endpoint's chain sponsors for. */
export const pm_supportedEntryPoints: RpcMethod<RpcContext> = {
  name: 'pm_supportedEntryPoints',
  paramNames: [],
  params,
  handler: async (_params: z.infer<typeof params>, context: RpcContext) =>
    supportedEntryPoints(findChain(context.services.config, chainOf(context))).map((ep) => ep.address),
}
