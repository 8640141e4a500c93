import { z } from 'zod'
import { errorCodes, InvalidParamsError, InvalidRequestError, MethodNotFoundError, toServiceError, type ServiceError } from '../errors.js'
import { describeZodError } from '../validation.js'

/**
 * JSON-RPC 2.0 over one parsed payload: single requests, batches and
 * notifications (which are not run: they get no answer). Methods are plain objects (a zod schema for the positional
 * params, names for those params in error messages, and a handler); the
 * transport validates, dispatches and shapes every answer, so no method ever
 * formats an error itself.
 */

export type RpcMethod<Context> = {
  name: string
  /** Names of the positional params, used to name the field in validation errors. */
  paramNames: readonly string[]
  params: z.ZodType
  handler: (params: never, context: Context) => Promise<unknown>
}

export type RpcId = string | number | null
export type RpcResponse =
  | { jsonrpc: '2.0'; id: RpcId; result: unknown }
  | { jsonrpc: '2.0'; id: RpcId; error: { code: number; message: string; data?: unknown } }

const requestSchema = z.object({
  jsonrpc: z.literal('2.0'),
  method: z.string().min(1),
  // JSON-RPC 2.0 allows params by name; every method here takes them by position, which the method then says.
  params: z.union([z.array(z.unknown()), z.record(z.string(), z.unknown())]).optional(),
  id: z.union([z.string(), z.number(), z.null()]).optional(),
})

export function errorResponse(id: RpcId, error: ServiceError): RpcResponse {
  return {
    jsonrpc: '2.0',
    id,
    error: { code: errorCodes[error.kind].rpc, message: error.message, ...(error.data ? { data: error.data } : {}) },
  }
}

/** Answers a payload; undefined when it held only notifications (nothing to send back). */
export async function dispatchJsonRpc<Context>(options: {
  payload: unknown
  methods: ReadonlyMap<string, RpcMethod<Context>>
  context: Context
  maxBatchSize: number
  onError?: (error: unknown, method: string) => void
}): Promise<RpcResponse | RpcResponse[] | undefined> {
  const { payload, maxBatchSize } = options
  if (!Array.isArray(payload)) return handleOne(payload, options)
  if (payload.length === 0) return errorResponse(null, new InvalidRequestError('empty batch'))
  if (payload.length > maxBatchSize) {
    return errorResponse(null, new InvalidRequestError(`batch of ${payload.length} requests exceeds the limit of ${maxBatchSize}`))
  }
  const answers = await Promise.all(payload.map((request) => handleOne(request, options)))
  const sent = answers.filter((answer): answer is RpcResponse => answer !== undefined)
  return sent.length ? sent : undefined
}

async function handleOne<Context>(
  raw: unknown,
  options: {
    methods: ReadonlyMap<string, RpcMethod<Context>>
    context: Context
    onError?: (error: unknown, method: string) => void
  },
): Promise<RpcResponse | undefined> {
  const parsed = requestSchema.safeParse(raw)
  if (!parsed.success) {
    return errorResponse(idOf(raw), new InvalidRequestError(`invalid JSON-RPC request: ${describeZodError(parsed.error)}`))
  }
  const request = parsed.data
  // A notification asks for no answer, so none is worked out: a sponsorship no one receives would still cost a
  // signature (a KMS call, a use of the enclave key's budget).
  if (request.id === undefined) return undefined
  const id = request.id
  try {
    const method = options.methods.get(request.method)
    if (!method) throw new MethodNotFoundError(`method ${request.method} is not supported`)
    const given = request.params ?? []
    // An empty object names nothing, so it is as good as no params.
    if (!Array.isArray(given) && Object.keys(given).length > 0) {
      throw new InvalidParamsError(`invalid params: ${method.name} takes its params by position, as an array [${method.paramNames.join(', ')}], not by name`)
    }
    const params = method.params.safeParse(Array.isArray(given) ? given : [])
    if (!params.success) {
      const expected = method.paramNames.length ? `; ${method.name} takes [${method.paramNames.join(', ')}]` : ''
      throw new InvalidParamsError(`invalid params: ${describeZodError(params.error, { rootNames: method.paramNames })}${expected}`)
    }
    const result = await method.handler(params.data as never, options.context)
    return { jsonrpc: '2.0', id, result }
  } catch (error) {
    options.onError?.(error, request.method)
    return errorResponse(id, toServiceError(error))
  }
}

/** The id of a request we could not validate, when it has a usable one. */
function idOf(raw: unknown): RpcId {
  if (typeof raw !== 'object' || raw === null || !('id' in raw)) return null
  const id = (raw as { id: unknown }).id
  return typeof id === 'string' || typeof id === 'number' ? id : null
}
