import { app } from './app.js'
import type { Env } from './services.js'

export { SponsorshipQuota } from './quotas/sponsorshipQuota.js'

export default {
  fetch: (request: Request, env: Env, ctx: ExecutionContext) => app.fetch(request, env, ctx),
} satisfies ExportedHandler<Env>
