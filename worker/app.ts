import { Hono, type Context } from 'hono'
import { ConfigError } from '../config/load.js'
import { errorCodes, InternalError, MethodNotFoundError, toServiceError, type ServiceError } from './errors.js'
import { readJsonBody } from './http/readJsonBody.js'
import { failureFields, logEvent } from './log.js'
import { healthReport, recentHealthStatus } from './health.js'
import { restRoutes, type RestVariables } from './rest/routes.js'
import { dispatchJsonRpc, errorResponse } from './rpc/jsonRpc.js'
import { rpcMethods } from './rpc/methods.js'
import { servicesFor, type Env } from './services.js'

/**
 * The Worker's HTTP surface. Transports only: parse, authenticate, dispatch
 * to the sponsor domain, and shape answers; every error becomes a JSON body
 * with the code and status `errorCodes` gives it.
 */

type AppEnv = { Bindings: Env; Variables: RestVariables & { transport: 'rpc' | 'rest' } }

function requestServices(env: Env) {
  try {
    return servicesFor(env)
  } catch (error) {
    if (error instanceof ConfigError) throw new InternalError(error.message)
    throw error
  }
}

function apiKeyOf(c: Context): string | undefined {
  return c.req.header('x-api-key') ?? c.req.query('apiKey') ?? undefined
}

function errorJson(c: Context<AppEnv>, error: ServiceError) {
  const status = errorCodes[error.kind].http
  if (c.get('transport') === 'rpc') return c.json(errorResponse(null, error), status)
  const retryAfter = error.data?.retryAfterSeconds
  if (typeof retryAfter === 'number') c.header('retry-after', String(retryAfter))
  return c.json({ error: { code: error.kind, message: error.message, ...(error.data ? { data: error.data } : {}) } }, status)
}

export const app = new Hono<AppEnv>()

app.onError((error, c) => {
  const serviceError = toServiceError(error)
  if (serviceError.kind === 'internal') {
    // Name and message only: a stack can carry paths and values we never log.
    logEvent({ level: 'error', event: 'request_failed', path: c.req.path, error: error.name, message: error.message.slice(0, 200) })
  } else if (serviceError.kind === 'signer_unavailable') {
    // Why the signer failed is for this log only (JSON-RPC logs its failures as it dispatches them).
    logEvent({ level: 'error', event: 'request_failed', path: c.req.path, ...failureFields(serviceError) })
  }
  return errorJson(c, serviceError)
})

app.notFound((c) => errorJson(c, new MethodNotFoundError(`no route ${c.req.method} ${c.req.path}`)))

app.get('/health', async (c) => {
  // The details name backends, their URLs and key ids, and why they fail: for operators (an operator key, or the
  // development profile). Anyone else, a load balancer or an API key holder, gets the status of a report at most a few
  // seconds old, so probing it often costs the backends little.
  const body = (await mayReadHealthDetails(c)) ? await healthReport(c.env) : { status: await recentHealthStatus(c.env) }
  return c.json(body, body.status === 'ok' || body.status === 'degraded' ? 200 : 503)
})

/** An operator key in the header (never the query: it would end up in URLs and their logs), or the development profile. */
async function mayReadHealthDetails(c: Context<AppEnv>): Promise<boolean> {
  let services
  try {
    services = servicesFor(c.env)
  } catch (error) {
    // Misconfigured: the report is the configuration error, which every route answers anyway.
    if (error instanceof ConfigError) return true
    throw error
  }
  const presented = c.req.header('x-api-key')
  if (services.operatorKeys && presented && (await services.operatorKeys.verify(presented).then(() => true, () => false))) return true
  return services.config.profile === 'development'
}

app.get('/metrics', authenticate('rest'), (c) => {
  const services = c.get('services')
  return c.text(services.metrics.toPrometheus() + services.sponsorshipMetrics.toPrometheus(), 200, { 'content-type': 'text/plain; version=0.0.4' })
})

// Authenticated routes: JSON-RPC and the paymaster REST API.
app.use('/', authenticate('rpc'))
app.use('/rpc', authenticate('rpc'))
app.use('/rpc/*', authenticate('rpc'))
app.use('/api/*', authenticate('rest'))

function authenticate(transport: 'rpc' | 'rest') {
  return async (c: Context<AppEnv>, next: () => Promise<void>) => {
    c.set('transport', transport)
    if (c.req.method !== 'POST' && transport === 'rpc') {
      return errorJson(c, new MethodNotFoundError('JSON-RPC is served with POST'))
    }
    const services = requestServices(c.env)
    c.set('services', services)
    c.set('apiKeyId', await services.apiKeys?.verify(apiKeyOf(c)))
    await next()
  }
}

async function handleRpc(c: Context<AppEnv>, routeChainId: number | undefined) {
  const services = c.get('services')
  const started = Date.now()
  const payload = await readJsonBody(c.req.raw, services.config.limits.maxBodyBytes)
  const answer = await dispatchJsonRpc({
    payload,
    methods: rpcMethods,
    context: { services, routeChainId, apiKeyId: c.get('apiKeyId') },
    maxBatchSize: services.config.limits.maxBatchSize,
    onError: (error, method) =>
      logEvent({ event: 'rpc', method, ms: Date.now() - started, ...failureFields(toServiceError(error)) }),
  })
  if (answer === undefined) return c.body(null, 204)
  return c.json(answer)
}

app.post('/', (c) => handleRpc(c, undefined))
app.post('/rpc', (c) => handleRpc(c, undefined))
app.post('/rpc/:chainId', (c) => {
  const chainId = Number(c.req.param('chainId'))
  if (!Number.isSafeInteger(chainId) || chainId <= 0) {
    return errorJson(c, new MethodNotFoundError(`no route: ${c.req.param('chainId')} is not a chain id`))
  }
  return handleRpc(c, chainId)
})

app.route('/', restRoutes)
