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
 *    parent, so keys start COOL and are rehydrated on first use).
 * 4. Open loop at a fixed offered rate, ORIGIN_OFFERED_FRACTION (0.6) of the best
 *    closed-loop capacity, latency measured from each request's scheduled time.
 *
 * Prints throughput; p50/p90/p99/p99.9 per phase (client = end to end, parent =
 * the parent's handling, rpc = parent↔enclave incl. signing, from Server-Timing);
 * error and NEEDS_UNLOCK rates; rehydrate p95 (enclave histogram); CPU per
 * process. Closed loop at 500 in flight, latency is bounded below by
 * 500 / throughput: read the open-loop figures for latency below saturation.
 */
import { mkdtempSync, rmSync } from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import { performance } from 'node:perf_hooks'
import { Agent, setGlobalDispatcher } from 'undici'
import { measureRawSignRate } from '../../enclave-origin/enclave/engine.js'
import { rehydrateBucketsMs } from '../../enclave-origin/enclave/keyCache.js'
import { opcodes, statuses } from '../../enclave-origin/protocol/frames.js'
import { decodeSignResponse, encodeSignRequest } from '../../enclave-origin/protocol/messages.js'
import { signRequest } from '../../enclave-origin/protocol/requestSigning.js'
import { EnclavePool } from '../../enclave-origin/parent/enclavePool.js'
import { startLocalKms } from '../support/kmsServer.js'
import { originHmac, startOrigin, symmetricKmsKey, type Origin } from '../support/origin.js'
import { clockTicksPerSecond, cpuMsByCommand, hostBusyTicks, percentile, processTree, type ProcStat } from './procStats.js'

const seconds = Number(process.env.BENCH_SECONDS ?? 60)
const keyCount = Number(process.env.ORIGIN_KEYS ?? 50_000)
const connections = Number(process.env.ORIGIN_CONNECTIONS ?? 500)
const offeredFraction = Number(process.env.ORIGIN_OFFERED_FRACTION ?? 0.6)
const ports = { kms: 18971, enclave: 18972, parent: 18973 }
const scenarios = [
  { name: '2 threads, batching', env: { ENGINE_THREADS: '2', ENGINE_BATCHING: '1' } },
  { name: '2 threads, no batching', env: { ENGINE_THREADS: '2', ENGINE_BATCHING: '0' } },
  { name: '1 thread, batching', env: { ENGINE_THREADS: '1', ENGINE_BATCHING: '1' } },
]

// Enough sockets for every concurrent request, kept alive.
setGlobalDispatcher(new Agent({ connections: connections + 16, keepAliveTimeout: 60_000, pipelining: 1 }))

type Sample = { ok: boolean; needsUnlock: boolean; clientMs: number; rpcMs?: number; parentMs?: number; enclaveMs?: number }

async function signOnce(url: string, keyIds: string[], scheduledAt?: number): Promise<Sample> {
  const keyId = keyIds[Math.floor(Math.random() * keyIds.length)]!
  const digest = `0x${Buffer.from(crypto.getRandomValues(new Uint8Array(32))).toString('hex')}`
  const requestPath = `/v1/keys/${keyId}/sign`
  const body = new TextEncoder().encode(JSON.stringify({ digest }))
  const started = scheduledAt ?? performance.now()
  try {
    const headers = await signRequest({ ...originHmac, method: 'POST', path: requestPath, body })
    const response = await fetch(`${url}${requestPath}`, { method: 'POST', headers, body })
    await response.arrayBuffer()
    const clientMs = performance.now() - started
    const timing = response.headers.get('server-timing') ?? ''
    const phase = (name: string) => Number(new RegExp(`${name};dur=([\\d.]+)`).exec(timing)?.[1])
    const rpcMs = phase('rpc')
    return { ok: response.status === 200, needsUnlock: response.status === 503, clientMs, rpcMs, parentMs: phase('total') - rpcMs, enclaveMs: phase('enclave') }
  } catch {
    return { ok: false, needsUnlock: false, clientMs: performance.now() - started }
  }
}

function summarise(samples: Sample[], elapsedMs: number) {
  const ok = samples.filter((s) => s.ok)
  const quantiles = (values: number[]) => {
    const sorted = values.filter((v) => Number.isFinite(v)).sort((a, b) => a - b)
    const q = (p: number) => Number(percentile(sorted, p).toFixed(2))
    return { p50: q(0.5), p90: q(0.9), p99: q(0.99), p999: q(0.999) }
  }
  return {
    requests: samples.length,
    throughput: Number((ok.length / (elapsedMs / 1_000)).toFixed(0)),
    errorRate: Number(((samples.length - ok.length) / Math.max(samples.length, 1)).toFixed(5)),
    needsUnlockRate: Number((samples.filter((s) => s.needsUnlock).length / Math.max(samples.length, 1)).toFixed(5)),
    latencyMs: {
      client: quantiles(ok.map((s) => s.clientMs)),
      parent: quantiles(ok.map((s) => s.parentMs ?? NaN)),
      rpc: quantiles(ok.map((s) => s.rpcMs ?? NaN)),
      enclave: quantiles(ok.map((s) => s.enclaveMs ?? NaN)),
    },
  }
}

/** The rehydrate (inline refresh) p95 from the enclave's histogram, as a bucket upper bound. */
async function rehydrateP95(origin: Origin): Promise<string> {
  const health = (await (await fetch(`${origin.url}/healthz`)).json()) as { enclaves: Array<{ stats?: { cache?: { inlineRefreshMs?: { count: number; buckets: number[] } } } }> }
  const histogram = health.enclaves[0]?.stats?.cache?.inlineRefreshMs
  if (!histogram || histogram.count === 0) return 'n/a'
  let seen = 0
  for (const [index, count] of histogram.buckets.entries()) {
    seen += count
    if (seen >= 0.95 * histogram.count) return index < rehydrateBucketsMs.length ? `≤${rehydrateBucketsMs[index]} ms (${histogram.count} rehydrates)` : `>${rehydrateBucketsMs.at(-1)} ms`
  }
  return 'n/a'
}

function cpuOf(origin: Origin) {
  const { enclave, parent } = origin.pids()
  const trees = { enclave: enclave ? processTree(enclave) : [], parent: parent ? processTree(parent) : [] }
  return { trees, host: hostBusyTicks(), generator: process.cpuUsage() }
}

function cpuSince(origin: Origin, before: ReturnType<typeof cpuOf>, elapsedMs: number, requests: number) {
  const after = cpuOf(origin)
  const total = (a: ProcStat[], b: ProcStat[]) => Object.values(cpuMsByCommand(a, b)).reduce((x, y) => x + y, 0)
  const enclaveMs = total(before.trees.enclave, after.trees.enclave)
  const parentMs = total(before.trees.parent, after.trees.parent)
  const generator = process.cpuUsage(before.generator)
  const generatorMs = (generator.user + generator.system) / 1_000
  const perRequest = (ms: number) => Number((ms / Math.max(requests, 1)).toFixed(3))
  return {
    cores: { enclave: Number((enclaveMs / elapsedMs).toFixed(2)), parent: Number((parentMs / elapsedMs).toFixed(2)), generator: Number((generatorMs / elapsedMs).toFixed(2)), host: Number(((after.host - before.host) * 1_000 / clockTicksPerSecond / elapsedMs).toFixed(2)) },
    msPerRequest: { enclave: perRequest(enclaveMs), parent: perRequest(parentMs), generator: perRequest(generatorMs) },
  }
}

type Send = (scheduledAt?: number) => Promise<Sample>

/** Signs through the parent's HTTP API, as the Worker does. */
const viaParent = (origin: Origin, keyIds: string[]): Send => (scheduledAt) => signOnce(origin.url, keyIds, scheduledAt)

/** Signs on the enclave over the binary protocol, as the parent does: the enclave's capacity without the HTTP layer. */
async function viaEnclave(keyIds: string[]): Promise<{ send: Send; close(): void }> {
  const pool = new EnclavePool({ address: { host: '127.0.0.1', port: ports.enclave }, size: 16 })
  await pool.connect()
  const send: Send = async (scheduledAt) => {
    const keyId = keyIds[Math.floor(Math.random() * keyIds.length)]!
    const started = scheduledAt ?? performance.now()
    const payload = encodeSignRequest({ keyId, digest: crypto.getRandomValues(new Uint8Array(32)) })
    const frame = await pool.request({ opcode: opcodes.SIGN, payload, timeoutMs: 10_000 }).catch(() => undefined)
    const ms = performance.now() - started
    const ok = frame?.status === statuses.OK
    const enclaveMs = ok ? decodeSignResponse(frame.payload).enclaveMicros / 1_000 : NaN
    return { ok, needsUnlock: frame?.status === statuses.NEEDS_UNLOCK, clientMs: ms, rpcMs: ms, parentMs: 0, enclaveMs }
  }
  return { send, close: () => pool.close() }
}

async function closedLoop(origin: Origin, send: Send) {
  const samples: Sample[] = []
  const deadline = performance.now() + seconds * 1_000
  const started = performance.now()
  const before = cpuOf(origin)
  await Promise.all(
    Array.from({ length: connections }, async () => {
      while (performance.now() < deadline) samples.push(await send())
    }),
  )
  const elapsedMs = performance.now() - started
  return { ...summarise(samples, elapsedMs), cpu: cpuSince(origin, before, elapsedMs, samples.length) }
}

async function openLoop(origin: Origin, send: Send, rate: number) {
  const samples: Sample[] = []
  const pending = new Set<Promise<void>>()
  let skipped = 0
  const started = performance.now()
  const before = cpuOf(origin)
  let sent = 0
  await new Promise<void>((resolve) => {
    const timer = setInterval(() => {
      const now = performance.now()
      if (now - started >= seconds * 1_000) {
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
          samples.push(sample)
          pending.delete(request)
        })
        pending.add(request)
      }
    }, 1)
  })
  await Promise.all(pending)
  const elapsedMs = performance.now() - started
  return { offeredRate: rate, skipped, ...summarise(samples, elapsedMs), cpu: cpuSince(origin, before, elapsedMs, samples.length) }
}

async function main() {
  const kms = await startLocalKms({ port: ports.kms })
  const kmsKeyId = await symmetricKmsKey(kms)
  const storeDir = mkdtempSync(path.join(os.tmpdir(), 'origin-bench-'))
  let origin: Origin | undefined
  const stopAll = async () => {
    await origin?.stop()
    await kms.stop()
    rmSync(storeDir, { recursive: true, force: true })
  }
  process.once('SIGINT', () => void stopAll().then(() => process.exit(130)))
  try {
    const cpus = os.cpus()
    console.log(`machine: ${cpus.length} × ${cpus[0]?.model}, Node ${process.version}; ${keyCount} keys, ${connections} connections, ${seconds} s per run`)
    origin = await startOrigin({ kms, kmsKeyId, enclavePort: ports.enclave, parentPort: ports.parent, storeDir, extraEnv: scenarios[0]!.env })

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
    for (const scenario of scenarios) {
      await origin.stop()
      origin = await startOrigin({ kms, kmsKeyId, enclavePort: ports.enclave, parentPort: ports.parent, storeDir, extraEnv: scenario.env })
      const result = await closedLoop(origin, viaParent(origin, keyIds))
      results.push({ scenario: `closed loop, ${scenario.name}`, ...result, rehydrateP95: await rehydrateP95(origin) })
      console.log(JSON.stringify(results.at(-1)))
      const enclave = await viaEnclave(keyIds)
      results.push({ scenario: `enclave direct (binary), ${scenario.name}`, ...(await closedLoop(origin, enclave.send)) })
      enclave.close()
      console.log(JSON.stringify(results.at(-1)))
    }

    const throughParent = results.filter((r) => r.scenario.startsWith('closed loop'))
    const best = Math.max(...throughParent.map((r) => r.throughput as number))
    const bestDirect = Math.max(...results.filter((r) => r.scenario.startsWith('enclave direct')).map((r) => r.throughput as number))
    // Open loop at the same offered rates, with batching on and off.
    for (const scenario of scenarios.slice(0, 2)) {
      await origin.stop()
      origin = await startOrigin({ kms, kmsKeyId, enclavePort: ports.enclave, parentPort: ports.parent, storeDir, extraEnv: scenario.env })
      const open = await openLoop(origin, viaParent(origin, keyIds), Math.round(best * offeredFraction))
      results.push({ scenario: `open loop ${Math.round(offeredFraction * 100)}% of ${best}/s via parent, ${scenario.name}`, ...open })
      console.log(JSON.stringify(results.at(-1)))
      const enclave = await viaEnclave(keyIds)
      const openDirect = await openLoop(origin, enclave.send, Math.round(bestDirect * offeredFraction))
      enclave.close()
      results.push({ scenario: `open loop ${Math.round(offeredFraction * 100)}% of ${bestDirect}/s direct, ${scenario.name}`, ...openDirect })
      console.log(JSON.stringify(results.at(-1)))
    }

    console.log('\nscenario                                                                 req/s   err%   503%  client p50/p99/p99.9 ms       rpc p99  enclave p99  parent p99  cores enclave/parent/gen/host')
    for (const r of results) {
      const latency = r.latencyMs as Record<string, Record<string, number>>
      const cpu = (r.cpu as { cores: Record<string, number> }).cores
      console.log(
        `${r.scenario.padEnd(72)} ${String(r.throughput).padStart(6)} ${((r.errorRate as number) * 100).toFixed(2).padStart(6)} ${((r.needsUnlockRate as number) * 100).toFixed(2).padStart(6)}  ${`${latency.client!.p50}/${latency.client!.p99}/${latency.client!.p999}`.padEnd(26)} ${String(latency.rpc!.p99).padStart(8)} ${String(latency.enclave!.p99).padStart(12)} ${String(latency.parent!.p99).padStart(10)}  ${cpu.enclave}/${cpu.parent}/${cpu.generator}/${cpu.host}`,
      )
    }
    console.log(
      `\nraw native single-thread sign rate ${rawRate.toFixed(0)}/s; best enclave-direct ${bestDirect}/s (${((bestDirect / rawRate) * 100).toFixed(0)}%); best through the parent's HTTP API ${best}/s (${((best / rawRate) * 100).toFixed(0)}%)`,
    )
    console.log(JSON.stringify({ bench: 'origin', keyCount, connections, seconds, rawRate: Math.round(rawRate), results }))
  } finally {
    await stopAll()
  }
}

main().catch((error: unknown) => {
  console.error(error)
  process.exitCode = 1
})
