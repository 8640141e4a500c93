import { z } from 'zod'
import {
  errorResponseSchema,
  healthResponseSchema,
  processResponseSchema,
  signerResponseSchema,
  sponsorRequestDocSchema,
  sponsorResponseSchema,
} from './schemas.js'

/** The OpenAPI 3.1 document, generated from the same zod schemas the routes validate with. */

const json = (schema: z.ZodType, io: 'input' | 'output' = 'output') => ({
  'application/json': { schema: z.toJSONSchema(schema, { io, unrepresentable: 'any' }) },
})

const errors = {
  '400': { description: 'Malformed request; the message names the field', content: json(errorResponseSchema) },
  '401': { description: 'Missing or invalid API key', content: json(errorResponseSchema) },
  '403': { description: 'Sponsorship declined by policy; data.reason says why', content: json(errorResponseSchema) },
  '413': { description: 'Body too large', content: json(errorResponseSchema) },
  '429': {
    description: 'A quota (policy.quotas) is used up; data.retryAfterSeconds, and the Retry-After header, say when one more fits (null: never, the operation alone costs more)',
    headers: { 'Retry-After': { schema: { type: 'integer' } } },
    content: json(errorResponseSchema),
  },
  '503': { description: 'Signer unavailable, or the quota counts cannot be reached (nothing was signed)', content: json(errorResponseSchema) },
}

const sponsorBody = { required: true, content: json(sponsorRequestDocSchema, 'input') }

let document: Record<string, unknown> | undefined

export function openApiDocument(): Record<string, unknown> {
  document ??= {
    openapi: '3.1.0',
    info: {
      title: 'Edge paymaster signer',
      version: '0.1.0',
      description:
        'ERC-4337 paymaster sponsorship. JSON-RPC (ERC-7677 pm_getPaymasterStubData / pm_getPaymasterData, pm_sponsorUserOperation, pm_supportedEntryPoints, eth_chainId) is served at POST /, /rpc and /rpc/{chainId}; this document covers the REST routes.',
    },
    components: {
      securitySchemes: {
        apiKeyHeader: { type: 'apiKey', in: 'header', name: 'x-api-key' },
        apiKeyQuery: { type: 'apiKey', in: 'query', name: 'apiKey' },
      },
    },
    security: [{ apiKeyHeader: [] }, { apiKeyQuery: [] }],
    paths: {
      '/api/v1/paymaster/sponsor': {
        post: {
          summary: 'Sign paymaster data for a UserOperation whose gas fields are final',
          requestBody: sponsorBody,
          responses: { '200': { description: 'Signed sponsorship', content: json(sponsorResponseSchema) }, ...errors },
        },
      },
      '/api/v1/paymaster/process': {
        post: {
          summary: 'Dry run: validate, apply policy and compute hashes without signing',
          requestBody: sponsorBody,
          responses: { '200': { description: 'The decision, hashes and stub data', content: json(processResponseSchema) }, ...errors },
        },
      },
      '/api/v1/paymaster/signer': {
        get: {
          summary: 'Signer address and backend per chain',
          parameters: [{ name: 'chainId', in: 'query', required: false, schema: { type: 'integer' } }],
          responses: { '200': { description: 'Signers', content: json(signerResponseSchema) }, ...errors },
        },
      },
      '/health': {
        get: {
          summary: 'Liveness and signer health',
          description:
            'Anyone gets the status (of a report at most 5 s old). The profile, signers and chains need an operator key (OPERATOR_KEYS) in the x-api-key header, but in the development profile.',
          security: [],
          responses: {
            '200': { description: 'Healthy', content: json(healthResponseSchema) },
            '503': { description: 'A signer is unhealthy, the report could not be made within 2 minutes, or the configuration is invalid', content: json(healthResponseSchema) },
          },
        },
      },
    },
  }
  return document
}
