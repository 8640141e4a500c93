import { z } from 'zod'
import { numberToHex } from 'viem'
import { sponsor } from '../sponsor/sponsor.js'
import { addressSchema } from '../sponsor/hexSchemas.js'
import { chainOf, type RpcContext } from './context.js'
import { paymasterFieldsJson } from '../paymasterFieldsJson.js'
import type { RpcMethod } from './jsonRpc.js'

const params = z.tuple([
  z.record(z.string(), z.unknown(), { error: 'expected a UserOperation object' }),
  addressSchema,
  z.record(z.string(), z.unknown()).nullish(),
])

/**
 * Pimlico-style sponsorship: params [userOp, entryPoint, sponsorshipPolicyData?],
 * chain from the URL. We do not estimate gas (no chain round trip per request):
 * the caller's gas fields are signed and echoed back in Pimlico's shape.
 */
export const pm_sponsorUserOperation: RpcMethod<RpcContext> = {
  name: 'pm_sponsorUserOperation',
  paramNames: ['userOperation', 'entryPoint', 'sponsorshipPolicyData'],
  params,
  handler: async ([userOperation, entryPoint]: z.infer<typeof params>, context: RpcContext) => {
    const sponsorship = await sponsor(context.services.sponsor, {
      chainId: chainOf(context),
      entryPoint,
      userOperation,
      apiKeyId: context.apiKeyId,
    })
    const op = sponsorship.userOperation
    return {
      ...paymasterFieldsJson(sponsorship),
      preVerificationGas: numberToHex(op.preVerificationGas),
      verificationGasLimit: numberToHex(op.verificationGasLimit),
      callGasLimit: numberToHex(op.callGasLimit),
      userOpHash: sponsorship.userOpHash,
    }
  },
}
