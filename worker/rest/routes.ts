import { Hono } from 'hono'
import { InvalidParamsError, SponsorshipDeclinedError } from '../errors.js'
import { readJsonBody } from '../http/readJsonBody.js'
import type { Services } from '../services.js'
import { evaluate, findChain, sponsor, type SponsorRequest } from '../sponsor/sponsor.js'
import { describeZodError } from '../validation.js'
import { paymasterFieldsJson } from '../paymasterFieldsJson.js'
import { openApiDocument } from './openapi.js'
import { sponsorRequestSchema } from './schemas.js'

export type RestVariables = { services: Services; /** The caller's verified API key, by id. */ apiKeyId: string | undefined }

async function sponsorRequest(request: Request, services: Services, apiKeyId: string | undefined): Promise<SponsorRequest> {
  const body = sponsorRequestSchema.safeParse(await readJsonBody(request, services.config.limits.maxBodyBytes))
  if (!body.success) throw new InvalidParamsError(`invalid request body: ${describeZodError(body.error)}`)
  return { ...body.data, apiKeyId }
}

export const restRoutes = new Hono<{ Variables: RestVariables }>()
  .get('/openapi.json', (c) => c.json(openApiDocument()))
  .post('/api/v1/paymaster/sponsor', async (c) => {
    const services = c.get('services')
    const request = await sponsorRequest(c.req.raw, services, c.get('apiKeyId'))
    const result = await sponsor(services.sponsor, request)
    return c.json({
      chainId: request.chainId,
      entryPoint: result.entryPoint.address,
      entryPointVersion: result.entryPoint.version,
      ...paymasterFieldsJson(result),
      userOpHash: result.userOpHash,
      validUntil: result.window.validUntil,
      validAfter: result.window.validAfter,
      signer: result.signer,
    })
  })
  .post('/api/v1/paymaster/process', async (c) => {
    const services = c.get('services')
    const request = await sponsorRequest(c.req.raw, services, c.get('apiKeyId'))
    try {
      const result = await evaluate(services.sponsor, request)
      return c.json({
        decision: 'sponsor',
        chainId: request.chainId,
        entryPoint: result.entryPoint.address,
        entryPointVersion: result.entryPoint.version,
        ...paymasterFieldsJson(result),
        userOpHash: result.userOpHash,
        paymasterHash: result.paymasterHash,
        maxCostWei: result.maxCostWei.toString(),
        validUntil: result.window.validUntil,
        validAfter: result.window.validAfter,
      })
    } catch (error) {
      if (!(error instanceof SponsorshipDeclinedError)) throw error
      return c.json({ decision: 'decline', reason: error.data!.reason, message: error.message, data: error.data })
    }
  })
  .get('/api/v1/paymaster/signer', async (c) => {
    const services = c.get('services')
    const wanted = c.req.query('chainId')
    const chains =
      wanted === undefined ? services.config.chains : [findChain(services.config, parseChainQuery(wanted))]
    const signers = await Promise.all(
      chains.map(async (chain) => {
        const signer = services.signers.get(chain.signer)!
        const health = await signer.health()
        return {
          chainId: chain.chainId,
          ...signer.describe(),
          // Null while it cannot sign; why is for operators (/health, the log), not API key holders.
          address: health.ok ? health.address : null,
        }
      }),
    )
    return c.json({ signers })
  })

function parseChainQuery(value: string): number {
  const chainId = /^\d{1,15}$/.test(value) ? Number(value) : /^0x[0-9a-f]{1,13}$/i.test(value) ? Number(value) : NaN
  if (!Number.isSafeInteger(chainId) || chainId <= 0) {
    throw new InvalidParamsError('chainId query parameter must be a positive integer')
  }
  return chainId
}
