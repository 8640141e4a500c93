/**
 * `npm run bench:origin`: the enclave origin's acceptance scenario scaled to
 * this machine. The enclave and the parent run as processes over TCP (as in
 * production, minus vsock), the data key comes from the local KMS server, and
 * this process is the load generator, sharing the same cores.
 *
 * 1. Pre-creates ORIGIN_KEYS keys (default 50,000) through the parent API.
 * 2. Measures the raw single-thread native sign rate (the hardware's limit).
 * 3. Closed loop, ORIGIN_CONNECTIONS (500) concurrent requests, uniformly random
 *    key ids and 32-byte digests, BENCH_SECONDS (60) each, as A/B runs of the
 *    enclave's signing threads and batching (each run restarts the enclave and
 *    parent, then signs once with every key so that all are WARM, as in the
 *    open loops judged against this capacity; the rehydrate p95 comes from
 *    that warm-up).
 * 4. Open loop at fixed offered rates, ORIGIN_OFFERED_FRACTIONS (default 0.6; a
 *    list such as 0.3,0.45,0.6 sweeps) of the best closed-loop capacity, latency
 *    measured from each request's scheduled time, with the 500 connections
 *    held open. A request that would be the 501st in flight is not queued but
 *    counted as skipped, and skipped requests count as errors. Each open loop
 *    starts with every key WARM (one signature each) and runs 2 s at its rate
 *    unrecorded first: the steady state.
 * 5. The floors: the same open loops against servers that sign nothing: one
 *    that speaks the enclave protocol (frameEcho.ts) for the direct runs, and
 *    the parent's HTTP server answering at once (httpEcho.ts) for the runs
 *    through the parent. They show what the machine, the sockets, the HTTP
 *    server and this generator cost on their own.
 *
 * The HTTP client is httpLoadClient.ts over 500 pre-opened keep-alive
 * connections; digests come from a fast PRNG and request HMACs from Node's
 * native hashing, so that the generator spends as little of the shared CPU as
 * it can.
 *
 * Prints throughput; p50/p90/p99/p99.9 per phase (client = end to end, parent =
 * the sign handler's own work (Server-Timing total − rpc: the request's reading,
 * verification and the answer's writing are outside it), rpc = parent↔enclave
 * incl. signing, from Server-Timing);
 * error and NEEDS_UNLOCK rates; rehydrate p95 (enclave histogram); the
 * enclave's memory with every key WARM (from HEALTH, before each open loop); CPU per
 * process, the host's busy cores, the cores the hypervisor stole and the cores
 * the kernel's own threads took (with the busiest of them; and whether DAMON's
 * kdamond runs, and how often it samples); for the native generator's runs,
 * how the requests of 10 ms or more lay in time (how many bursts, how far
 * apart: openLoad.c); with
 * BENCH_WAKE_PROBE=1, how late an idle thread's wake-ups were (wakeProbe.ts;
 * off by default, since its own wake-ups raise the tail it explains: see the
 * README); this generator's own GC pauses
 * (gcPauses.ts), which every latency it measures includes; and for each open
 * loop through the parent, the parent's GC pause time (its own
 * nodejs_gc_duration_seconds). The generator, the floor servers and the origin
 * all run without V8's allocation-site pretenuring (heapTuning.ts).
 * Closed loop at 500 in flight, latency is bounded below by 500 / throughput:
 * read the open-loop figures for latency below saturation. Last, it says
 * whether each default open loop at the highest fraction (if at least 0.6)
 * met the issue's target: p99 under 10 ms with errors under 0.1%.
 *
 * With ORIGIN_BATCH_SWEEP=1 it measures the engine's batch settings instead,
 * after steps 1 and 2: directly on the enclave, for each ENGINE_MAX_BATCH
 * and ENGINE_MAX_WAIT_MS in `batchSweep`, a closed loop (capacity) and an
 * open loop at ORIGIN_OFFERED_FRACTIONS' highest fraction of the default's
 * capacity, with the native generator where there is one (latency).
 */
import { spawn } from 'node:child_process'
import { existsSync, mkdtempSync, rmSync } from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import { performance } from 'node:perf_hooks'
import { fileURLToPath } from 'node:url'
import { rehydrateBucketsMs } from '../../enclave-origin/protocol/histograms.js'
import { secp256k1 } from '../../enclave-origin/enclave/nativeSecp256k1.js'
import { opcodes, statuses } from '../../enclave-origin/protocol/frames.js'
import { decodeSignResponse, encodeSignRequest } from '../../enclave-origin/protocol/messages.js'
import { nodeHashing } from '../../enclave-origin/protocol/nodeHashing.js'
import { signRequest } from '../../enclave-origin/protocol/requestSigning.js'
import { EnclavePool } from '../../enclave-origin/parent/enclavePool.js'
import { keepRequestObjectsYoung } from '../../enclave-origin/heapTuning.js'
import { stopProcess } from '../support/anvil.js'
import { startLocalKms } from '../support/kmsServer.js'
import { originHmac, startOrigin, symmetricKmsKey, type Origin } from '../support/origin.js'
import { LeanHttpConnection } from './httpLoadClient.js'
import { allProcesses, clockTicksPerSecond, cpuMsByCommand, damonSampleIntervalsMs, hostTicks, kernelThreads, percentile, processTree, type ProcStat } from './procStats.js'
import { startWakeProbe } from './wakeProbe.js'
import { startGcPauseLog, type GcPauses } from './gcPauses.js'

const seconds = Number(process.env.BENCH_SECONDS ?? 60)
const keyCount = Number(process.env.ORIGIN_KEYS ?? 50_000)
const connections = Number(process.env.ORIGIN_CONNECTIONS ?? 500)
/** Each open loop first runs this long at its rate, unrecorded. */
const warmupSeconds = 2
const offeredFractions = (process.env.ORIGIN_OFFERED_FRACTIONS ?? '0.6').split(',').map(Number)
/** The issue's acceptance target, which the benchmark judges its default open loops at the highest fraction against. */
const target = { p99Ms: 10, errorRate: 0.001, offeredFraction: 0.6 }
if (!offeredFractions.every((f) => f > 0 && f <= 1)) throw new Error(`ORIGIN_OFFERED_FRACTIONS must be fractions in (0, 1], got ${process.env.ORIGIN_OFFERED_FRACTIONS}`)
/**
 * `npm run bench:origin` builds the origin (what production runs) and this
 * benchmark with its floor servers into dist/ first, so that no process here
 * pays for a TypeScript loader on the shared CPU.
 */
const builtCli = 'dist/enclave-origin/cli.js'
if (!existsSync(builtCli) || !import.meta.url.endsWith('/dist/bench/origin.js')) throw new Error('run the benchmark as npm run bench:origin, which builds it and the origin first')
// The generator's own GC pauses are in every latency it measures; the origin's processes run with the same setting.
keepRequestObjectsYoung()
/** Run for the whole benchmark; each run reads what they saw (see wakeProbe.ts and gcPauses.ts). */
const wakeProbe = process.env.BENCH_WAKE_PROBE === '1' ? startWakeProbe() : undefined
const generatorGc = startGcPauseLog()
const ports = { kms: 18971, enclave: 18972, parent: 18973, echo: 18974, httpEcho: 18975 }
const scenarios = [
  { name: '2 threads, batching', env: { ENGINE_THREADS: '2', ENGINE_BATCHING: '1' } },
  { name: '2 threads, no batching', env: { ENGINE_THREADS: '2', ENGINE_BATCHING: '0' } },
  { name: '1 thread, batching', env: { ENGINE_THREADS: '1', ENGINE_BATCHING: '1' } },
]
/** ORIGIN_BATCH_SWEEP=1: the engine batch settings measured against each other, the default first. */
const batchSweep = process.env.ORIGIN_BATCH_SWEEP === '1'
const batchSettings = [
  { maxBatch: 32, maxWaitMs: 1 },
  { maxBatch: 8, maxWaitMs: 1 },
  { maxBatch: 16, maxWaitMs: 1 },
  { maxBatch: 64, maxWaitMs: 1 },
  { maxBatch: 32, maxWaitMs: 2 },
]
/** Open loop only: under closed-loop load the threads always have work, so the inline path never runs there. */
const withoutInline = { name: '2 threads, batching, no inline signing', env: { ENGINE_THREADS: '2', ENGINE_BATCHING: '1', ENGINE_INLINE_PER_TURN: '0' } }

type Sample = { ok: boolean; needsUnlock: boolean; clientMs: number; rpcMs?: number; parentMs?: number; enclaveMs?: number }

const phases = ['client', 'rpc', 'parent', 'enclave'] as const

/**
 * A run's samples, kept in typed arrays. Holding one object per request for
 * the whole run would have them promoted and scanned by the generator's own
 * garbage collector, whose pauses then show up in the very tail we measure.
 */
class SampleLog {
  count = 0
  failed = 0
  needsUnlock = 0
  private columns = Object.fromEntries(phases.map((phase) => [phase, new Float64Array(1 << 16)])) as Record<(typeof phases)[number], Float64Array>

  add(sample: Sample): void {
    if (sample.needsUnlock) this.needsUnlock++
    if (!sample.ok) {
      this.failed++
      return
    }
    if (this.count === this.columns.client.length) {
      for (const phase of phases) {
        const grown = new Float64Array(this.count * 2)
        grown.set(this.columns[phase])
        this.columns[phase] = grown
      }
    }
    const at = this.count++
    this.columns.client[at] = sample.clientMs
    this.columns.rpc[at] = sample.rpcMs ?? NaN
    this.columns.parent[at] = sample.parentMs ?? NaN
    this.columns.enclave[at] = sample.enclaveMs ?? NaN
  }

  /** p50/p90/p99/p99.9 of one phase over the successful samples. */
  quantiles(phase: (typeof phases)[number]) {
    const sorted = this.columns[phase].slice(0, this.count).filter(Number.isFinite).sort()
    const q = (p: number) => Number(percentile(sorted, p).toFixed(2))
    return { p50: q(0.5), p90: q(0.9), p99: q(0.99), p999: q(0.999) }
  }
}

/** xorshift32: digests only need to differ, and crypto.getRandomValues costs the shared CPU several µs each. */
let prngState = 0x9e3779b9
function randomDigest(): Uint8Array {
  const digest = new Uint8Array(32)
  const words = new Uint32Array(digest.buffer)
  for (let i = 0; i < words.length; i++) {
    prngState ^= prngState << 13
    prngState ^= prngState >>> 17
    prngState ^= prngState << 5
    words[i] = prngState >>> 0
  }
  return digest
}

const randomKeyId = (keyIds: string[]) => keyIds[Math.floor(Math.random() * keyIds.length)]!

/** `skipped`: requests the open loop could not send (all connections busy), counted as errors. */
function summarise(samples: SampleLog, elapsedMs: number, skipped = 0) {
  const requests = samples.count + samples.failed
  return {
    requests,
    throughput: Number((samples.count / (elapsedMs / 1_000)).toFixed(0)),
    errorRate: Number(((samples.failed + skipped) / Math.max(requests + skipped, 1)).toFixed(5)),
    needsUnlockRate: Number((samples.needsUnlock / Math.max(requests, 1)).toFixed(5)),
    latencyMs: Object.fromEntries(phases.map((phase) => [phase, samples.quantiles(phase)])),
  }
}

type EnclaveStats = { cache?: { inlineRefreshMs?: { count: number; buckets: number[] } }; memory?: { heapUsedBytes: number; residentBytes: number } }

/** The enclave's HEALTH figures, through the parent's /healthz. */
async function enclaveStats(origin: Origin): Promise<EnclaveStats | undefined> {
  // Signed: the figures are for authenticated callers.
  const health = (await origin.request('GET', '/healthz')).body as { enclaves: Array<{ stats?: EnclaveStats }> }
  return health.enclaves[0]?.stats
}

/** The rehydrate (inline refresh) p95 from the enclave's histogram, as a bucket upper bound. */
async function rehydrateP95(origin: Origin): Promise<string> {
  const histogram = (await enclaveStats(origin))?.cache?.inlineRefreshMs
  if (!histogram || histogram.count === 0) return 'n/a'
  let seen = 0
  for (const [index, count] of histogram.buckets.entries()) {
    seen += count
    if (seen >= 0.95 * histogram.count) return index < rehydrateBucketsMs.length ? `≤${rehydrateBucketsMs[index]} ms (${histogram.count} rehydrates)` : `>${rehydrateBucketsMs.at(-1)} ms`
  }
  return 'n/a'
}

/** The enclave's memory (HEALTH's figures) in MB. */
async function enclaveMemoryMb(origin: Origin): Promise<{ heap: number; resident: number }> {
  const memory = (await enclaveStats(origin))?.memory
  const mb = (bytes: number | undefined) => Number(((bytes ?? NaN) / 1_048_576).toFixed(1))
  return { heap: mb(memory?.heapUsedBytes), resident: mb(memory?.residentBytes) }
}

/** The parent's GC pauses so far (prom-client's `nodejs_gc_duration_seconds`, all kinds), from its /metrics. */
async function parentGcPauses(origin: Origin): Promise<{ seconds: number; count: number }> {
  const text = await (await fetch(`${origin.url}/metrics`)).text()
  const total = (suffix: string) => [...text.matchAll(new RegExp(`^nodejs_gc_duration_seconds_${suffix}\\{[^}]*\\} ([\\d.e+-]+)$`, 'gm'))].reduce((sum, match) => sum + Number(match[1]), 0)
  return { seconds: total('sum'), count: total('count') }
}

/** The processes whose CPU a run reports: the origin's, or a floor server's (frame echo in the enclave column, HTTP echo in the parent's). */
type Pids = () => { enclave?: number; parent?: number }

function cpuOf(pids: Pids) {
  const { enclave, parent } = pids()
  const all = allProcesses()
  const trees = { enclave: enclave ? processTree(enclave, all) : [], parent: parent ? processTree(parent, all) : [], kernel: kernelThreads(all) }
  return { trees, host: hostTicks(), generator: process.cpuUsage() }
}

/** A run's starting point: CPU so far, and the wake-up probe and GC pause log emptied. */
function startMeasuring(pids: Pids) {
  wakeProbe?.reset()
  generatorGc.reset()
  return cpuOf(pids)
}

/**
 * CPU per process and per request since `before`; the host's busy and
 * stolen cores; the kernel threads' cores, with the busiest of them; and the
 * probe's wake-up delays.
 */
function measuredSince(pids: Pids, before: ReturnType<typeof cpuOf>, elapsedMs: number, requests: number, nativeGeneratorCpuMs?: number) {
  const after = cpuOf(pids)
  const total = (a: ProcStat[], b: ProcStat[]) => Object.values(cpuMsByCommand(a, b)).reduce((x, y) => x + y, 0)
  const enclaveMs = total(before.trees.enclave, after.trees.enclave)
  const parentMs = total(before.trees.parent, after.trees.parent)
  const kernelByThread = Object.entries(cpuMsByCommand(before.trees.kernel, after.trees.kernel)).sort(([, a], [, b]) => b - a)
  const kernelMs = kernelByThread.reduce((sum, [, ms]) => sum + ms, 0)
  const generator = process.cpuUsage(before.generator)
  // With openLoad as the generator, its own figure; this process only waits for it then.
  const generatorMs = nativeGeneratorCpuMs ?? (generator.user + generator.system) / 1_000
  const perRequest = (ms: number) => Number((ms / Math.max(requests, 1)).toFixed(3))
  const cores = (ms: number) => Number((ms / elapsedMs).toFixed(2))
  const ticksMs = (ticks: number) => (ticks * 1_000) / clockTicksPerSecond
  const hostMs = ticksMs(after.host.busy - before.host.busy)
  return {
    cpu: {
      // `other`: the host's busy time that none of the measured processes took (another tenant, a build): a run
      // that lost a share of the machine to it is no measure of the origin (±0.1 core is tick noise).
      cores: { enclave: cores(enclaveMs), parent: cores(parentMs), generator: cores(generatorMs), host: cores(hostMs), steal: cores(ticksMs(after.host.steal - before.host.steal)), kernel: cores(kernelMs), other: cores(hostMs - enclaveMs - parentMs - generatorMs - kernelMs) },
      busiestKernelThread: kernelByThread[0] ? { name: kernelByThread[0][0], cores: cores(kernelByThread[0][1]) } : undefined,
      msPerRequest: { enclave: perRequest(enclaveMs), parent: perRequest(parentMs), generator: perRequest(generatorMs) },
    },
    wakeDelay: wakeProbe?.read(),
    generatorGc: generatorGc.read(),
  }
}

type Send = (scheduledAt?: number) => Promise<Sample>

/** Compiled once, not three times per response: the generator's own garbage shows up in the tail it measures. */
const timingPatterns = { rpc: /rpc;dur=([\d.]+)/, total: /total;dur=([\d.]+)/, enclave: /enclave;dur=([\d.]+)/ }

/**
 * Signs through the parent's HTTP API, as the Worker does, over `connections`
 * pre-opened keep-alive connections (each request takes the free one idle the
 * longest, so all of them carry requests and none idles into the parent's
 * keep-alive timeout; the loops never have more than `connections` in flight).
 */
async function viaParent(url: string, keyIds: string[]): Promise<{ send: Send; close(): void }> {
  const { hostname, port } = new URL(url)
  const all = await Promise.all(Array.from({ length: connections }, () => LeanHttpConnection.open({ host: hostname, port: Number(port), keepHeaders: ['server-timing'] })))
  const free = [...all]
  const send: Send = async (scheduledAt) => {
    const requestPath = `/v1/keys/${randomKeyId(keyIds)}/sign`
    const body = Buffer.from(JSON.stringify({ digest: `0x${Buffer.from(randomDigest()).toString('hex')}` }))
    const started = scheduledAt ?? performance.now()
    const connection = free.shift()!
    try {
      // Named fields: V8 spends several µs adding properties to a spread copy, on the shared CPU.
      const headers = signRequest({ keyId: originHmac.keyId, secret: originHmac.secret, method: 'POST', path: requestPath, body, hashing: nodeHashing })
      const response = await connection.request({ method: 'POST', path: requestPath, headers, body })
      free.push(connection)
      const clientMs = performance.now() - started
      const timing = response.headers['server-timing'] ?? ''
      const phase = (pattern: RegExp) => Number(pattern.exec(timing)?.[1])
      const rpcMs = phase(timingPatterns.rpc)
      return { ok: response.status === 200, needsUnlock: response.status === 503 && response.body.includes('"needs_unlock"'), clientMs, rpcMs, parentMs: phase(timingPatterns.total) - rpcMs, enclaveMs: phase(timingPatterns.enclave) }
    } catch {
      // A broken connection is not put back: the run goes on with one fewer.
      return { ok: false, needsUnlock: false, clientMs: performance.now() - started }
    }
  }
  return { send, close: () => all.forEach((connection) => connection.close()) }
}

/** Signs on the enclave over the binary protocol, as the parent does: the enclave's capacity without the HTTP layer. */
async function viaEnclave(keyIds: string[], port = ports.enclave, pickKey = () => randomKeyId(keyIds)): Promise<{ send: Send; close(): void }> {
  const pool = new EnclavePool({ address: { host: '127.0.0.1', port }, size: 16 })
  await pool.connect()
  const send: Send = async (scheduledAt) => {
    const keyId = pickKey()
    const started = scheduledAt ?? performance.now()
    const payload = encodeSignRequest({ keyId, digest: randomDigest() })
    const frame = await pool.request({ opcode: opcodes.SIGN, payload, timeoutMs: 10_000 }).catch(() => undefined)
    const ms = performance.now() - started
    const ok = frame?.status === statuses.OK
    const enclaveMs = ok ? decodeSignResponse(frame.payload).enclaveMicros / 1_000 : NaN
    return { ok, needsUnlock: frame?.status === statuses.NEEDS_UNLOCK, clientMs: ms, rpcMs: ms, parentMs: 0, enclaveMs }
  }
  return { send, close: () => pool.close() }
}

async function closedLoop(pids: Pids, send: Send) {
  const samples = new SampleLog()
  const deadline = performance.now() + seconds * 1_000
  const started = performance.now()
  const before = startMeasuring(pids)
  await Promise.all(
    Array.from({ length: connections }, async () => {
      while (performance.now() < deadline) samples.add(await send())
    }),
  )
  const elapsedMs = performance.now() - started
  return { ...summarise(samples, elapsedMs), ...measuredSince(pids, before, elapsedMs, samples.count + samples.failed) }
}

/**
 * Runs `warmupSeconds` at `rate` unrecorded (JIT and connections warm, as in
 * steady service), then records a run. Through the parent, it also reports
 * the parent's GC pauses during the run: how often its event loop stopped, and for how long.
 */
async function openLoop(pids: Pids, send: Send, rate: number, parent?: Origin) {
  await driveOpenLoop(pids, send, rate, warmupSeconds)
  if (!parent) return driveOpenLoop(pids, send, rate, seconds)
  const before = await parentGcPauses(parent)
  const result = await driveOpenLoop(pids, send, rate, seconds)
  const after = await parentGcPauses(parent)
  const pauses = after.count - before.count
  const pausedMs = (after.seconds - before.seconds) * 1_000
  return { ...result, parentGc: { pauses, pausedMsPerSecond: Number((pausedMs / seconds).toFixed(1)), meanPauseMs: Number((pausedMs / Math.max(pauses, 1)).toFixed(2)) } }
}

/** openLoad.c as built by `npm run bench:origin` (absent where there is no C compiler). */
const openLoadBinary = fileURLToPath(new URL('./openLoad', import.meta.url))
const haveOpenLoad = existsSync(openLoadBinary)

/**
 * An open loop again, driven by openLoad.c, a generator without a garbage
 * collector, so that its figures are the origin's and the machine's: the
 * same SIGN frames at the same offered rate over 16 connections (`frames`),
 * or the same signed requests to the parent's HTTP API over `connections`
 * keep-alive connections (`http`). CPU and wake-up figures cover the
 * recorded seconds; the generator's CPU is the one openLoad reports.
 */
async function nativeOpenLoop(pids: Pids, keyIds: string[], rate: number, mode: 'frames' | 'http', port: number) {
  const env = { ...process.env, ORIGIN_HMAC_KEY_ID: originHmac.keyId, ORIGIN_HMAC_SECRET: originHmac.secret }
  const child = spawn(openLoadBinary, [mode, port, rate, seconds, warmupSeconds, mode === 'frames' ? 16 : connections, connections].map(String), { env, stdio: ['pipe', 'pipe', 'inherit'] })
  let output = ''
  child.stdout!.on('data', (chunk) => (output += chunk))
  const exited = new Promise<number | null>((resolve) => child.once('exit', resolve))
  child.stdin!.end(keyIds.join('\n'))
  await new Promise((resolve) => setTimeout(resolve, warmupSeconds * 1_000))
  const before = startMeasuring(pids)
  const startedMs = performance.now()
  const code = await exited
  if (code !== 0) throw new Error(`openLoad exited with ${code}`)
  const run = JSON.parse(output) as {
    offered: number; ok: number; failed: number; needsUnlock: number; skipped: number; seconds: number; cpuMs: number
    slow: { overMs: number; requests: number; bursts: number; medianBurstGapMs: number }
    latencyMs: Record<(typeof phases)[number], Record<'p50' | 'p90' | 'p99' | 'p999', number>>
  }
  const measured = measuredSince(pids, before, Math.min(performance.now() - startedMs, seconds * 1_000), run.ok + run.failed, run.cpuMs)
  return {
    offeredRate: rate,
    skipped: run.skipped,
    requests: run.ok + run.failed,
    throughput: Math.round(run.ok / run.seconds),
    errorRate: Number(((run.failed + run.skipped) / Math.max(run.offered, 1)).toFixed(5)),
    needsUnlockRate: Number((run.needsUnlock / Math.max(run.ok + run.failed, 1)).toFixed(5)),
    latencyMs: run.latencyMs,
    slow: run.slow,
    ...measured,
  }
}

async function driveOpenLoop(pids: Pids, send: Send, rate: number, durationSeconds: number) {
  const samples = new SampleLog()
  const pending = new Set<Promise<void>>()
  let skipped = 0
  const started = performance.now()
  const before = startMeasuring(pids)
  let sent = 0
  await new Promise<void>((resolve) => {
    const timer = setInterval(() => {
      const now = performance.now()
      if (now - started >= durationSeconds * 1_000) {
        clearInterval(timer)
        resolve()
        return
      }
      const due = Math.floor(((now - started) / 1_000) * rate)
      for (; sent < due; sent++) {
        const scheduledAt = started + (sent / rate) * 1_000
        // More than `connections` in flight means the origin is past saturation: count, don't queue.
        if (pending.size >= connections) {
          skipped++
          continue
        }
        const request = send(scheduledAt).then((sample) => {
          samples.add(sample)
          pending.delete(request)
        })
        pending.add(request)
      }
    }, 1)
  })
  await Promise.all(pending)
  const elapsedMs = performance.now() - started
  return { offeredRate: rate, skipped, ...summarise(samples, elapsedMs, skipped), ...measuredSince(pids, before, elapsedMs, samples.count + samples.failed) }
}

/** A run's end-to-end p99, in ms. */
function clientP99(row: Record<string, unknown>): number {
  return (row.latencyMs as Record<string, { p99: number }>).client!.p99
}

/**
 * One signature per key, so that a run measures the steady state (keys WARM,
 * as the pre-warmer keeps used keys in production) rather than the
 * rehydration of a freshly restarted enclave; the rehydrate p95 reported
 * comes from these first signatures.
 */

async function warmEveryKey(keyIds: string[]): Promise<void> {
  let next = 0
  const enclave = await viaEnclave(keyIds, ports.enclave, () => keyIds[next++]!)
  let failed = 0
  await Promise.all(
    Array.from({ length: connections }, async () => {
      while (next < keyIds.length) if (!(await enclave.send()).ok) failed++
    }),
  )
  enclave.close()
  if (failed > 0) throw new Error(`warm-up: ${failed} of ${keyIds.length} signatures failed`)
}

/** A no-op floor server (frameEcho.ts or httpEcho.ts) as a child process, listening once this resolves. */
async function startFloorServer(script: 'frameEcho' | 'httpEcho', port: number): Promise<{ pid: number; stop(): Promise<void> }> {
  const child = spawn(process.execPath, [fileURLToPath(new URL(`./${script}.js`, import.meta.url)), String(port)], { stdio: ['ignore', 'pipe', 'inherit'] })
  await new Promise<void>((resolve, reject) => {
    child.stdout!.once('data', () => resolve())
    child.once('exit', (code) => reject(new Error(`${script} exited (${code})`)))
  })
  return { pid: child.pid!, stop: () => stopProcess(child) }
}

/**
 * Signatures per second of the native binding in a tight loop on this thread:
 * the hardware limit the benchmark compares the engine against. Blocks the
 * event loop for `seconds`.
 */
function measureRawSignRate({ seconds }: { seconds: number }): number {
  const privateKey = new Uint8Array(32).fill(7)
  const digest = new Uint8Array(32)
  const signature = new Uint8Array(64)
  const view = new DataView(digest.buffer)
  const started = performance.now()
  const deadline = started + seconds * 1000
  let signed = 0
  let now = started
  while (now < deadline) {
    // Checking the clock every 256 signs keeps it out of the measurement.
    for (let i = 0; i < 256; i++) {
      view.setUint32(0, signed++)
      secp256k1.ecdsaSign(digest, privateKey, {}, signature)
    }
    now = performance.now()
  }
  return signed / ((now - started) / 1000)
}

async function main() {
  const kms = await startLocalKms({ port: ports.kms })
  const kmsKeyId = await symmetricKmsKey(kms)
  const storeDir = mkdtempSync(path.join(os.tmpdir(), 'origin-bench-'))
  let origin: Origin | undefined
  const stopAll = async () => {
    await origin?.stop()
    await kms.stop()
    await wakeProbe?.stop()
    generatorGc.stop()
    rmSync(storeDir, { recursive: true, force: true })
  }
  process.once('SIGINT', () => void stopAll().then(() => process.exit(130)))
  try {
    const cpus = os.cpus()
    console.log(`machine: ${cpus.length} × ${cpus[0]?.model}, Node ${process.version}; ${keyCount} keys, ${connections} connections, ${seconds} s per run`)
    const damon = damonSampleIntervalsMs()
    if (damon.length > 0) console.log(`kernel: DAMON memory monitoring on (kdamond), sampling every ${damon.join(' / ')} ms: it takes CPU from the runs (kernel-thread cores below)`)
    origin = await startOrigin({ kms, kmsKeyId, enclavePort: ports.enclave, parentPort: ports.parent, storeDir, extraEnv: scenarios[0]!.env, builtCli })

    const createStarted = performance.now()
    const keyIds: string[] = []
    let next = 0
    await Promise.all(
      Array.from({ length: 64 }, async () => {
        while (next++ < keyCount) keyIds.push((await origin!.request('POST', '/v1/keys')).body.keyId as string)
      }),
    )
    const createSeconds = (performance.now() - createStarted) / 1_000
    console.log(`created ${keyIds.length} keys in ${createSeconds.toFixed(1)} s (${(keyIds.length / createSeconds).toFixed(0)}/s, each acknowledged after fsync)`)

    const rawRate = measureRawSignRate({ seconds: 3 })
    console.log(`raw native sign rate, one thread: ${rawRate.toFixed(0)}/s`)

    const results: Array<{ scenario: string } & Record<string, unknown>> = []
    const record = (scenario: string, result: Record<string, unknown>) => {
      results.push({ scenario, ...result })
      console.log(JSON.stringify(results.at(-1)))
      return results.at(-1)!
    }
    const restart = async (env: Record<string, string>) => {
      await origin!.stop()
      origin = await startOrigin({ kms, kmsKeyId, enclavePort: ports.enclave, parentPort: ports.parent, storeDir, extraEnv: env, builtCli })
      return origin
    }
    const pidsOfOrigin: Pids = () => origin!.pids()
    /** `loop` with one client of the enclave's binary protocol, closed after. */
    const directly = async (loop: (send: Send) => Promise<Record<string, unknown>>) => {
      const enclave = await viaEnclave(keyIds)
      try {
        return await loop(enclave.send)
      } finally {
        enclave.close()
      }
    }
    if (batchSweep) {
      const highestFraction = Math.max(...offeredFractions)
      let defaultCapacity = 0
      const rows: string[] = []
      for (const { maxBatch, maxWaitMs } of batchSettings) {
        const name = `maxBatch ${maxBatch}, maxWait ${maxWaitMs} ms`
        await restart({ ...scenarios[0]!.env, ENGINE_MAX_BATCH: String(maxBatch), ENGINE_MAX_WAIT_MS: String(maxWaitMs) })
        await warmEveryKey(keyIds)
        const closed = record(`closed loop direct, ${name}`, await directly((send) => closedLoop(pidsOfOrigin, send)))
        defaultCapacity ||= closed.throughput as number
        const rate = Math.round(defaultCapacity * highestFraction)
        const scenario = `open loop ${Math.round(highestFraction * 100)}% of ${defaultCapacity}/s direct${haveOpenLoad ? ', native generator' : ''}, ${name}`
        const open = record(scenario, haveOpenLoad ? await nativeOpenLoop(pidsOfOrigin, keyIds, rate, 'frames', ports.enclave) : await directly((send) => openLoop(pidsOfOrigin, send, rate)))
        rows.push(`${name.padEnd(28)} ${String(closed.throughput).padStart(8)}/s  closed p99 ${String(clientP99(closed)).padStart(6)} ms   open at ${rate}/s: p99 ${String(clientP99(open)).padStart(6)} ms, errors ${((open.errorRate as number) * 100).toFixed(2)}%`)
      }
      console.log(`\nengine batch settings, directly on the enclave (2 threads, keys WARM):\n${rows.join('\n')}`)
      console.log(JSON.stringify({ bench: 'origin-batch-sweep', keyCount, connections, seconds, rawRate: Math.round(rawRate), results }))
      return
    }
    /** The open loops the acceptance target is judged on: the defaults at the highest offered fraction. */
    const judged: Array<{ path: string; row: Record<string, unknown> }> = []
    for (const scenario of scenarios) {
      const running = await restart(scenario.env)
      // Capacity with every key WARM, as the open loops judged against it run: rehydrating cold keys costs the
      // enclave a third more per request. The rehydrate p95 comes from this warm-up's rehydrates.
      await warmEveryKey(keyIds)
      const http = await viaParent(running.url, keyIds)
      record(`closed loop, ${scenario.name}`, { ...(await closedLoop(pidsOfOrigin, http.send)), rehydrateP95: await rehydrateP95(running) })
      http.close()
      record(`enclave direct (binary), ${scenario.name}`, await directly((send) => closedLoop(pidsOfOrigin, send)))
    }

    /** The closed loops of each path: the most any served is the capacity that path's open loops are judged against. */
    const capacityRows = { parent: results.filter((r) => r.scenario.startsWith('closed loop')), direct: results.filter((r) => r.scenario.startsWith('enclave direct')) }
    const best = Math.max(...capacityRows.parent.map((r) => r.throughput as number))
    const bestDirect = Math.max(...capacityRows.direct.map((r) => r.throughput as number))
    // Open loop at each offered fraction with the defaults; at the highest, also without batching and without inline signing (the A/B).
    const highest = Math.max(...offeredFractions)
    const openRuns = [
      ...offeredFractions.map((fraction) => ({ fraction, scenario: scenarios[0]! })),
      { fraction: highest, scenario: scenarios[1]! },
      { fraction: highest, scenario: withoutInline },
    ]
    for (const { fraction, scenario } of openRuns) {
      const running = await restart(scenario.env)
      await warmEveryKey(keyIds)
      const memory = await enclaveMemoryMb(running)
      const percent = Math.round(fraction * 100)
      const judge = (path: string, row: Record<string, unknown>) => {
        if (scenario === scenarios[0] && fraction === highest) judged.push({ path, row })
      }
      const http = await viaParent(running.url, keyIds)
      judge('via the parent, JavaScript generator', record(`open loop ${percent}% of ${best}/s via parent, ${scenario.name}`, { ...(await openLoop(pidsOfOrigin, http.send, Math.round(best * fraction), running)), enclaveMemoryMbWithKeysWarm: memory }))
      http.close()
      if (haveOpenLoad) judge('via the parent, native generator', record(`open loop ${percent}% of ${best}/s via parent, native generator, ${scenario.name}`, await nativeOpenLoop(pidsOfOrigin, keyIds, Math.round(best * fraction), 'http', ports.parent)))
      judge('direct, JavaScript generator', record(`open loop ${percent}% of ${bestDirect}/s direct, ${scenario.name}`, await directly((send) => openLoop(pidsOfOrigin, send, Math.round(bestDirect * fraction)))))
      if (haveOpenLoad) judge('direct, native generator', record(`open loop ${percent}% of ${bestDirect}/s direct, native generator, ${scenario.name}`, await nativeOpenLoop(pidsOfOrigin, keyIds, Math.round(bestDirect * fraction), 'frames', ports.enclave)))
    }
    // The floors: the same open loops against servers that sign nothing.
    await origin.stop()
    const floors = [
      { script: 'frameEcho' as const, mode: 'frames' as const, port: ports.echo, rate: bestDirect, label: 'no-op frame echo (direct floor)', pids: (pid: number) => ({ enclave: pid }), connect: () => viaEnclave(keyIds, ports.echo) },
      { script: 'httpEcho' as const, mode: 'http' as const, port: ports.httpEcho, rate: best, label: 'no-op HTTP server (parent floor)', pids: (pid: number) => ({ parent: pid }), connect: () => viaParent(`http://127.0.0.1:${ports.httpEcho}`, keyIds) },
    ]
    for (const floor of floors) {
      const server = await startFloorServer(floor.script, floor.port)
      try {
        for (const fraction of offeredFractions) {
          const rate = Math.round(floor.rate * fraction)
          const client = await floor.connect()
          record(`floor: ${floor.label} at ${rate}/s`, await openLoop(() => floor.pids(server.pid), client.send, rate))
          client.close()
          if (haveOpenLoad) record(`floor: ${floor.label} at ${rate}/s, native generator`, await nativeOpenLoop(() => floor.pids(server.pid), keyIds, rate, floor.mode, floor.port))
        }
      } finally {
        await server.stop()
      }
    }

    console.log(`\n${'scenario (in floor rows the enclave or parent column is the floor server)'.padEnd(72)}  req/s   err%  unlk%  client p50/p99/p99.9 ms       rpc p99  enclave p99  parent p99  cores enclave/parent/gen/host/steal/kernel/other  busiest kernel thread  ≥10 ms: requests/bursts/every ms  wake p99/max ms  generator GC ms/s (max)  parent GC ms/s (mean pause)`)
    for (const r of results) {
      const latency = r.latencyMs as Record<string, Record<string, number>>
      const { cores: cpu, busiestKernelThread: kernel } = r.cpu as { cores: Record<string, number>; busiestKernelThread?: { name: string; cores: number } }
      const slow = r.slow as { requests: number; bursts: number; medianBurstGapMs: number } | undefined
      const wake = r.wakeDelay as { p99Ms: number; maxMs: number } | undefined
      const generator = r.generatorGc as GcPauses
      const gc = r.parentGc as { pausedMsPerSecond: number; meanPauseMs: number } | undefined
      console.log(
        `${r.scenario.padEnd(72)} ${String(r.throughput).padStart(6)} ${((r.errorRate as number) * 100).toFixed(2).padStart(6)} ${((r.needsUnlockRate as number) * 100).toFixed(2).padStart(6)}  ${`${latency.client!.p50}/${latency.client!.p99}/${latency.client!.p999}`.padEnd(26)} ${String(latency.rpc!.p99).padStart(8)} ${String(latency.enclave!.p99).padStart(12)} ${String(latency.parent!.p99).padStart(10)}  ${`${cpu.enclave}/${cpu.parent}/${cpu.generator}/${cpu.host}/${cpu.steal}/${cpu.kernel}/${cpu.other}`.padEnd(44)}  ${(kernel ? `${kernel.name} ${kernel.cores}` : '–').padEnd(21)}  ${(slow ? `${slow.requests}/${slow.bursts}/${slow.medianBurstGapMs}` : '–').padEnd(32)} ${(wake ? `${wake.p99Ms}/${wake.maxMs}` : '–').padEnd(16)} ${`${generator.pausedMsPerSecond} (${generator.maxPauseMs} ms)`.padEnd(24)} ${gc ? `${gc.pausedMsPerSecond} (${gc.meanPauseMs} ms)` : ''}`,
      )
    }
    console.log(`\n${'latency per phase, p50/p90/p99/p99.9 ms'.padEnd(72)} ${phases.map((phase) => phase.padEnd(30)).join(' ')}`)
    for (const r of results) {
      const latency = r.latencyMs as Record<string, Record<'p50' | 'p90' | 'p99' | 'p999', number>>
      const cells = phases.map((phase) => {
        const q = latency[phase]
        return (q ? `${q.p50}/${q.p90}/${q.p99}/${q.p999}` : '–').padEnd(30)
      })
      console.log(`${r.scenario.padEnd(72)} ${cells.join(' ')}`)
    }
    const memory = results.find((r) => r.enclaveMemoryMbWithKeysWarm)?.enclaveMemoryMbWithKeysWarm as { heap: number; resident: number }
    console.log(`\nenclave memory with all ${keyIds.length} keys WARM: V8 heap ${memory.heap} MB in use, resident ${memory.resident} MB`)
    console.log(
      `raw native single-thread sign rate ${rawRate.toFixed(0)}/s; best enclave-direct ${bestDirect}/s (${((bestDirect / rawRate) * 100).toFixed(0)}%); best through the parent's HTTP API ${best}/s (${((best / rawRate) * 100).toFixed(0)}%)`,
    )
    if (highest < target.offeredFraction) console.log(`\ntarget not judged: the highest offered fraction, ${highest}, is below ${target.offeredFraction}`)
    else {
      console.log(`\ntarget: p99 < ${target.p99Ms} ms with errors < ${target.errorRate * 100}% at ${Math.round(highest * 100)}% of capacity (at least ${target.offeredFraction * 100}%), ${connections} connections open`)
      for (const { path: judgedPath, row } of judged) {
        const p99 = clientP99(row)
        const errorRate = row.errorRate as number
        const skippedRate = ((row.skipped as number | undefined) ?? 0) / Math.max(((row.skipped as number | undefined) ?? 0) + (row.requests as number), 1)
        const other = otherCores(row)
        // A shared machine during any closed loop of the path lowers the capacity (the best one's, or leaves a worse
        // configuration's the best), and so the rate offered here: the target looks easier than it is.
        const capacityOther = Math.max(...(judgedPath.startsWith('via the parent') ? capacityRows.parent : capacityRows.direct).map(otherCores))
        const met = p99 >= 0 && p99 < target.p99Ms && errorRate < target.errorRate
        // Only the runs through the parent hold 500 connections open, as the target says; direct runs use the
        // parent's pool of 16, with at most 500 in flight: a figure for the enclave alone.
        const verdict = judgedPath.startsWith('via the parent') ? (met ? 'met' : 'not met') : `${met ? 'met' : 'not met'} (16 connections: the enclave alone, not the target's scenario)`
        const shared = [
          ...(other > 0.15 ? [`${other} cores went to processes outside the origin and the generator`] : []),
          ...(capacityOther > 0.15 ? [`up to ${capacityOther} cores went elsewhere in the closed loops that set the capacity, so the rate offered may be too low`] : []),
        ]
        const contaminated = shared.length > 0 ? `; ${shared.join('; ')}: the machine was shared, repeat this run` : ''
        console.log(`  ${judgedPath.padEnd(36)} p99 ${p99} ms, errors ${(errorRate * 100).toFixed(2)}% (${(skippedRate * 100).toFixed(2)}% not sent in time): ${verdict}${contaminated}`)
      }
    }
    console.log(JSON.stringify({ bench: 'origin', keyCount, connections, seconds, rawRate: Math.round(rawRate), results }))
  } finally {
    await stopAll()
  }
}

main().catch((error: unknown) => {
  console.error(error)
  process.exitCode = 1
})

/** The host's busy cores that none of the measured processes took during a row. */
function otherCores(row: Record<string, unknown>): number {
  return (row.cpu as { cores: { other: number } }).cores.other
}
