import { z } from 'zod'
import type { Services } from '../services.js'
import { InvalidParamsError } from '../errors.js'
import { addressSchema, chainIdSchema } from '../sponsor/hexSchemas.js'

export type RpcContext = {
  services: Services
  /** The chain named in the URL (`/rpc/:chainId`), if any. */
  routeChainId: number | undefined
  /** The caller's verified API key, by id; undefined where none is required. */
  apiKeyId: string | undefined
}

/** A UserOperation is checked field by field once its EntryPoint version is known. */
const userOperationParam = z.record(z.string(), z.unknown(), { error: 'expected a UserOperation object' })

/** ERC-7677 params: [userOp, entryPoint, chainId, context]. */
export const erc7677Params = z.tuple([
  userOperationParam,
  addressSchema,
  chainIdSchema,
  z.record(z.string(), z.unknown()).nullish(),
])
export const erc7677ParamNames = ['userOperation', 'entryPoint', 'chainId', 'context'] as const

/** The chain a request is for: the param must agree with the URL when both name one. */
export function chainOf(context: RpcContext, paramChainId?: number): number {
  const { routeChainId, services } = context
  if (paramChainId !== undefined) {
    if (routeChainId !== undefined && routeChainId !== paramChainId) {
      throw new InvalidParamsError(`chainId ${paramChainId} does not match chain ${routeChainId} of this endpoint`, {
        reason: 'chain_mismatch',
      })
    }
    return paramChainId
  }
  if (routeChainId !== undefined) return routeChainId
  const { chains, defaultChainId } = services.config
  if (defaultChainId !== undefined) return defaultChainId
  if (chains.length === 1) return chains[0]!.chainId
  throw new InvalidParamsError(
    `several chains are configured (${chains.map((c) => c.chainId).join(', ')}); call /rpc/<chainId> to pick one`,
    { reason: 'chain_required' },
  )
}
