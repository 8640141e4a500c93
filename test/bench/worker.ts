/**
 * Closed-loop load benchmark of `pm_getPaymasterData` (EntryPoint v0.7, chain
 * 31337) against the Worker under real `wrangler dev` with the local signer
 * (well-known anvil key #1; signing is off-chain, no chain is needed).
 *
 * For each concurrency C in [16, 64], C loops each send a request, await the
 * full response and repeat, for BENCH_SECONDS (default 10). Every request uses
 * a new nonce, so each one signs a different hash. It prints requests/s,
 * p50/p90/p99/max latency, errors, and CPU time per request: of the Worker
 * (wrangler's node process and all its descendants, read from /proc; workerd
 * is the one that signs) and of this load generator, which shares the cores.
 * Host-wide busy CPU (/proc/stat) is reported too: anything beyond the Worker
 * and the generator is other load on the machine, which disturbs the figures.
 *
 * Run: npm run bench:worker            (BENCH_SECONDS=30 npm run bench:worker)
 * Optional: BENCH_PORT (18900-18998; the next port is wrangler's inspector).
 * Linux only (/proc). Output: an aligned table, then one JSON line.
 */
import { randomBytes } from 'node:crypto'
import { createServer } from 'node:net'
import os from 'node:os'
import { performance } from 'node:perf_hooks'
import { canonicalEntryPoints } from '../../worker/sponsor/entryPoints.js'
import { anvilWellKnownKeys } from '../support/anvilKeys.js'
import { rpcUserOperationV07 } from '../support/userOperations.js'
import { startLocalKms, type LocalKms } from '../support/kmsServer.js'
import { clockTicksPerSecond, cpuMsByCommand, hostTicks, percentile, processTree } from './procStats.js'
import { startWorker, type RunningWorker } from '../support/wranglerDev.js'
import { wranglerProfileConfigs } from '../support/wranglerProfiles.js'

const chainIdHex = '0x7a69' // 31337
/**
 * Each scenario runs the Worker with its own signer configuration:
 * - the local signer alone, at concurrency 16 and 64;
 * - a fallback whose primary (AWS KMS, against the local KMS server) hangs: once its
 *   breaker has opened (during warm-up) the local backup signs, so the difference
 *   from the first scenario is what a dead primary costs per request;
 * - the local signer with a per-sender quota (the Durable Object, in workerd's local
 *   SQLite storage): every request from one sender, which one object serves one at a
 *   time, and every request from a sender of its own, a new object each.
 */
type Scenario = { name: string; concurrencies: number[]; vars: Record<string, string>; senders: 'one' | 'a new one each request' }
const kmsPort = 18960
const warmUpRequests = 200
const warmUpConcurrency = 8
const requestTimeoutMs = 10_000

const seconds = Number(process.env.BENCH_SECONDS ?? '10')
const port = Number(process.env.BENCH_PORT ?? '18931')
if (!(seconds > 0 && seconds <= 600)) throw new Error(`BENCH_SECONDS must be in (0, 600], got ${process.env.BENCH_SECONDS}`)
if (!(Number.isInteger(port) && port >= 18900 && port <= 18998)) throw new Error(`BENCH_PORT must be in 18900-18998, got ${process.env.BENCH_PORT}`)

// ---------------------------------------------------------------- load

let nonce = 0

type Outcome = { ok: true; ms: number } | { ok: false; error: string }

async function sendOne(url: string, senders: Scenario['senders']): Promise<Outcome> {
  const sender = senders === 'one' ? undefined : `0x${randomBytes(20).toString('hex')}`
  const body = JSON.stringify({
    jsonrpc: '2.0',
    id: ++nonce,
    method: 'pm_getPaymasterData',
    params: [rpcUserOperationV07({ nonce: `0x${nonce.toString(16)}`, ...(sender && { sender }) }), canonicalEntryPoints['0.7'], chainIdHex, {}],
  })
  const start = performance.now()
  try {
    // Node's fetch (undici) keeps connections alive by default: C loops reuse C connections.
    const response = await fetch(`${url}/rpc`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body,
      signal: AbortSignal.timeout(requestTimeoutMs),
    })
    const text = await response.text()
    const ms = performance.now() - start
    const data = (() => {
      try {
        return JSON.parse(text) as { result?: { paymasterData?: unknown } }
      } catch {
        return undefined
      }
    })()
    if (response.status === 200 && typeof data?.result?.paymasterData === 'string') return { ok: true, ms }
    return { ok: false, error: `HTTP ${response.status}: ${text.slice(0, 300)}` }
  } catch (error) {
    return { ok: false, error: String(error) }
  }
}

type Tally = { latencies: number[]; errors: number; firstError?: string }

/** `concurrency` loops, each sending one request at a time while `more()` holds. */
async function closedLoop(options: { url: string; senders: Scenario['senders']; concurrency: number; more: () => boolean }): Promise<Tally> {
  const { url, senders, concurrency, more } = options
  const tally: Tally = { latencies: [], errors: 0 }
  const loop = async () => {
    while (more()) {
      const outcome = await sendOne(url, senders)
      if (outcome.ok) tally.latencies.push(outcome.ms)
      else {
        tally.errors++
        tally.firstError ??= outcome.error
      }
    }
  }
  await Promise.all(Array.from({ length: concurrency }, loop))
  return tally
}


type RunResult = {
  scenario: string
  concurrency: number
  seconds: number
  requests: number
  errors: number
  errorRate: number
  requestsPerSecond: number
  latencyMs: { p50: number; p90: number; p99: number; max: number }
  workerCpuMsPerRequest: number
  workerdCpuMsPerRequest: number
  workerCpuByProcessMs: Record<string, number>
  generatorCpuMsPerRequest: number
  benchBusyCores: number
  hostBusyCores: number
  otherBusyCores: number
  /** Cores' worth of time the hypervisor took from this VM while it had work (not in hostBusyCores). */
  stealCores: number
  firstError?: string
}

async function run(worker: RunningWorker, scenario: Scenario, concurrency: number): Promise<RunResult> {
  const treeBefore = processTree(worker.pid)
  const hostBefore = hostTicks()
  const generatorBefore = process.cpuUsage()
  const start = performance.now()
  const deadline = start + seconds * 1_000
  const tally = await closedLoop({ url: worker.url, senders: scenario.senders, concurrency, more: () => performance.now() < deadline })
  const elapsedMs = performance.now() - start // includes the responses still in flight at the deadline
  const generator = process.cpuUsage(generatorBefore)
  const hostAfter = hostTicks()
  const hostMs = ((hostAfter.busy - hostBefore.busy) * 1_000) / clockTicksPerSecond
  const stealMs = ((hostAfter.steal - hostBefore.steal) * 1_000) / clockTicksPerSecond
  const workerCpu = cpuMsByCommand(treeBefore, processTree(worker.pid))

  const completed = tally.latencies.length + tally.errors
  const sorted = [...tally.latencies].sort((a, b) => a - b)
  const workerMs = Object.values(workerCpu).reduce((a, b) => a + b, 0)
  const generatorMs = (generator.user + generator.system) / 1_000
  const round = (n: number, digits = 2) => Number(n.toFixed(digits))
  return {
    scenario: scenario.name,
    concurrency,
    seconds: round(elapsedMs / 1_000, 3),
    requests: tally.latencies.length,
    errors: tally.errors,
    errorRate: round(completed ? tally.errors / completed : 0, 4),
    requestsPerSecond: round(tally.latencies.length / (elapsedMs / 1_000), 1),
    latencyMs: {
      p50: round(percentile(sorted, 0.5)),
      p90: round(percentile(sorted, 0.9)),
      p99: round(percentile(sorted, 0.99)),
      max: round(sorted.at(-1) ?? NaN),
    },
    // CPU is divided by every completed request (errors included); with no errors that is the request count.
    workerCpuMsPerRequest: round(workerMs / completed, 3),
    workerdCpuMsPerRequest: round((workerCpu['workerd'] ?? 0) / completed, 3),
    workerCpuByProcessMs: Object.fromEntries(Object.entries(workerCpu).map(([comm, ms]) => [comm, round(ms, 0)])),
    generatorCpuMsPerRequest: round(generatorMs / completed, 3),
    // Cores kept busy on average: by the Worker and generator, by the whole host, and by everything else.
    benchBusyCores: round((workerMs + generatorMs) / elapsedMs),
    hostBusyCores: round(hostMs / elapsedMs),
    otherBusyCores: round(Math.max(0, hostMs - workerMs - generatorMs) / elapsedMs),
    stealCores: round(stealMs / elapsedMs),
    ...(tally.firstError ? { firstError: tally.firstError } : {}),
  }
}

// ---------------------------------------------------------------- report

function table(results: RunResult[]): string {
  const header = ['scenario', 'conc', 'requests', 'errors', 'req/s', 'p50 ms', 'p90 ms', 'p99 ms', 'max ms', 'worker CPU ms/req', 'workerd ms/req', 'generator CPU ms/req', 'bench cores', 'host cores', 'steal cores']
  const rows = results.map((r) => [
    r.scenario,
    r.concurrency,
    r.requests,
    `${r.errors} (${(r.errorRate * 100).toFixed(2)}%)`,
    r.requestsPerSecond.toFixed(1),
    r.latencyMs.p50.toFixed(2),
    r.latencyMs.p90.toFixed(2),
    r.latencyMs.p99.toFixed(2),
    r.latencyMs.max.toFixed(2),
    r.workerCpuMsPerRequest.toFixed(3),
    r.workerdCpuMsPerRequest.toFixed(3),
    r.generatorCpuMsPerRequest.toFixed(3),
    r.benchBusyCores.toFixed(2),
    r.hostBusyCores.toFixed(2),
    r.stealCores.toFixed(2),
  ].map(String))
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((row) => row[i]!.length)))
  const line = (cells: string[]) => cells.map((cell, i) => (i === 0 ? cell.padEnd(widths[i]!) : cell.padStart(widths[i]!))).join('  ')
  return [line(header), line(widths.map((w) => '-'.repeat(w))), ...rows.map(line)].join('\n')
}

function portIsFree(candidate: number): Promise<boolean> {
  return new Promise((resolve) => {
    const server = createServer()
    server.once('error', () => resolve(false))
    server.listen(candidate, '127.0.0.1', () => server.close(() => resolve(true)))
  })
}

function scenarios(kms: LocalKms, kmsKeyId: string): Scenario[] {
  const development = wranglerProfileConfigs()[0]!
  const chains = (JSON.parse(development.config) as { chains: unknown[] }).chains
  const deadPrimary = {
    chains,
    signers: {
      primary: { kind: 'fallback', members: ['kms', 'edge'], timeoutMs: 500, failureThreshold: 3, coolDownSeconds: 3_600 },
      kms: { kind: 'aws-kms', keyId: kmsKeyId, region: kms.credentials.region, endpoint: kms.url, maxAttempts: 1 },
      edge: { kind: 'local' },
    },
  }
  // A limit no run reaches: what is measured is the counting, not a decline.
  const withQuota = { chains, policy: { quotas: { limits: [{ per: 'sender', windowSeconds: 3_600, maxOperations: 1_000_000_000 }] } } }
  const localSigner = { PAYMASTER_PRIVATE_KEY: anvilWellKnownKeys.paymasterSigner }
  return [
    { name: 'local signer', concurrencies: [16, 64], vars: localSigner, senders: 'one' },
    {
      name: 'fallback, KMS primary dead',
      concurrencies: [16],
      vars: {
        ...localSigner,
        AWS_ACCESS_KEY_ID: kms.credentials.accessKeyId,
        AWS_SECRET_ACCESS_KEY: kms.credentials.secretAccessKey,
        PAYMASTER_CONFIG: JSON.stringify(deadPrimary),
      },
      senders: 'one',
    },
    { name: 'quota, one sender', concurrencies: [16], vars: { ...localSigner, PAYMASTER_CONFIG: JSON.stringify(withQuota) }, senders: 'one' },
    {
      name: 'quota, a sender per request',
      concurrencies: [16],
      vars: { ...localSigner, PAYMASTER_CONFIG: JSON.stringify(withQuota) },
      senders: 'a new one each request',
    },
  ]
}

async function main(): Promise<void> {
  const cpus = os.cpus()
  const machine = { cpus: cpus.length, model: cpus[0]?.model ?? 'unknown', node: process.version, platform: `${os.platform()} ${os.release()}`, clockTicksPerSecond }
  console.log(`machine: ${machine.cpus} × ${machine.model}, Node ${machine.node}, ${machine.platform}, CLK_TCK ${clockTicksPerSecond}`)
  console.log(`load:    pm_getPaymasterData (v0.7, chain 31337), closed loop, ${seconds} s per concurrency, warm-up ${warmUpRequests} requests per scenario`)

  for (const candidate of [port, port + 1]) {
    if (!(await portIsFree(candidate))) throw new Error(`127.0.0.1:${candidate} is in use; pick another BENCH_PORT`)
  }

  const kms = await startLocalKms({ port: kmsPort })
  const kmsKeyId = kms.createKey({ privateKey: anvilWellKnownKeys.paymasterSigner })
  kms.setFault('hang') // the dead primary of the fallback scenario
  const plan = scenarios(kms, kmsKeyId)
  let worker: RunningWorker | undefined
  // Bound the whole run: per scenario start-up (60 s) + warm-up (60 s) + each run + slack.
  const budgetMs = plan.reduce((ms, s) => ms + 120_000 + s.concurrencies.length * (seconds * 1_000 + requestTimeoutMs + 10_000), 0)
  const watchdog = setTimeout(() => {
    console.error(`benchmark exceeded ${budgetMs / 1_000} s; stopping`)
    void Promise.all([worker?.stop(), kms.stop()]).finally(() => process.exit(2))
  }, budgetMs)
  // wrangler runs in its own process group, so Ctrl-C does not reach it: stop it here.
  const onSignal = () => void Promise.all([worker?.stop(), kms.stop()]).finally(() => process.exit(130))
  process.once('SIGINT', onSignal)
  process.once('SIGTERM', onSignal)

  try {
    const results: RunResult[] = []
    for (const scenario of plan) {
      worker = await startWorker({ port, vars: scenario.vars })
      const workerTree = processTree(worker.pid)
      console.log(`worker:  ${scenario.name}: ${worker.url} (wrangler pid ${worker.pid}; tree: ${workerTree.map((s) => `${s.comm}:${s.pid}`).join(' ')})`)
      let sent = 0
      const warmUp = await closedLoop({ url: worker.url, senders: scenario.senders, concurrency: warmUpConcurrency, more: () => sent++ < warmUpRequests })
      if (warmUp.latencies.length === 0) throw new Error(`every warm-up request failed; first error: ${warmUp.firstError}`)
      if (warmUp.errors > 0) console.log(`warm-up: ${warmUp.errors} errors; first: ${warmUp.firstError}`)
      for (const concurrency of scenario.concurrencies) results.push(await run(worker, scenario, concurrency))
      await worker.stop()
      worker = undefined
    }

    console.log()
    console.log(table(results))
    for (const r of results) {
      const byProcess = Object.entries(r.workerCpuByProcessMs).map(([comm, ms]) => `${comm} ${ms} ms`).join(', ')
      console.log(`${r.scenario}, c=${r.concurrency}: ${r.seconds} s wall; Worker CPU by process: ${byProcess}`)
      if (r.otherBusyCores > 0.2) console.log(`${r.scenario}, c=${r.concurrency}: warning: other processes kept ${r.otherBusyCores} cores busy; figures are disturbed`)
      if (r.firstError) console.log(`${r.scenario}, c=${r.concurrency}: first error: ${r.firstError}`)
    }
    const baseline = results.find((r) => r.scenario === plan[0]!.name && r.concurrency === 16)
    const added = (what: string, scenario: Scenario, extra = '') => {
      const other = results.find((r) => r.scenario === scenario.name)
      if (!baseline || !other) return
      const p50 = (other.latencyMs.p50 - baseline.latencyMs.p50).toFixed(2)
      const p99 = (other.latencyMs.p99 - baseline.latencyMs.p99).toFixed(2)
      const cpu = (other.workerdCpuMsPerRequest - baseline.workerdCpuMsPerRequest).toFixed(3)
      console.log(`added by ${what} (c=16): p50 ${p50} ms, p99 ${p99} ms, workerd CPU ${cpu} ms/req${extra}`)
    }
    console.log()
    added('a dead primary with its breaker open', plan[1]!, `, KMS Sign calls ${kms.calls.Sign ?? 0}`)
    added('a per-sender quota, one sender', plan[2]!)
    added('a per-sender quota, a new sender each request', plan[3]!)
    console.log()
    console.log(JSON.stringify({ bench: 'worker pm_getPaymasterData', machine, seconds, warmUpRequests, results }))
  } finally {
    await worker?.stop()
    await kms.stop()
    clearTimeout(watchdog)
    process.off('SIGINT', onSignal)
    process.off('SIGTERM', onSignal)
  }
}

main().catch((error: unknown) => {
  console.error(error)
  process.exitCode = 1
})
