/**
 * What opening the parent's disk store costs: the time to replay its log and
 * the memory the open process peaks at, for a store of STORE_BENCH_KEYS keys
 * (default 1,000,000) shaped as the parent makes them: a random UUID as the
 * key id, a 65-byte public key and the enclave's 60 sealed bytes
 * (enclave/sealing.ts), in a temporary directory removed afterwards.
 *
 * The store is filled by this process, then opened by a fresh one (so the fill
 * does not count), STORE_BENCH_OPENS times (default 3). Each open reports its
 * replay time, and once it is open the process's peak resident set
 * (getrusage), V8 heap and ArrayBuffer memory: the index of every record is
 * what stays. It then lists the store to check every key is there.
 *
 * Run: npm run bench:store            (STORE_BENCH_KEYS=200000 npm run bench:store)
 * Output: one line per open, then one JSON line.
 */
import { spawnSync } from 'node:child_process'
import { randomUUID } from 'node:crypto'
import { mkdtemp, rm, stat } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { performance } from 'node:perf_hooks'
import { sealedLength } from '../../enclave-origin/enclave/sealing.js'
import { LOG_FILE_NAME, openDiskBlobStore } from '../../enclave-origin/parent/diskBlobStore.js'

type OpenFigures = { keys: number; openMs: number; peakRssMB: number; heapUsedMB: number; arrayBuffersMB: number }

const megabytes = (bytes: number) => Math.round(bytes / 1e5) / 10
/** No compaction while filling or opening: the log is what a store that took these puts holds. */
const storeOptions = { compactAfterFrames: Number.MAX_SAFE_INTEGER }

async function fill(directory: string, keys: number): Promise<void> {
  const store = await openDiskBlobStore({ directory, ...storeOptions })
  const publicKey = new Uint8Array(65).fill(4)
  for (let first = 0; first < keys; first += 5_000) {
    const puts = []
    for (let index = first; index < Math.min(keys, first + 5_000); index++) {
      puts.push(store.put({ keyId: randomUUID(), version: 1, state: 'active', publicKey, sealed: new Uint8Array(sealedLength).fill(index % 251) }))
    }
    await Promise.all(puts)
  }
  await store.close()
}

/** Run in the child: opens the store and prints its figures as JSON. */
async function openOnce(directory: string): Promise<void> {
  const started = performance.now()
  const store = await openDiskBlobStore({ directory, ...storeOptions })
  const openMs = performance.now() - started
  // Retained memory: after a full collection, and before the listing below, whose copies are garbage.
  const gc = (globalThis as { gc?: () => void }).gc
  gc?.()
  // Promises of the open's last reads still hold their buffers until the turn after.
  await new Promise((resolve) => setTimeout(resolve, 100))
  gc?.()
  const memory = process.memoryUsage()
  // getrusage's maxrss is in KiB.
  const peakRssMB = megabytes(process.resourceUsage().maxRSS * 1024)
  let keys = 0
  for await (const _ of store.list()) keys++
  const figures: OpenFigures = { keys, openMs: Math.round(openMs), peakRssMB, heapUsedMB: megabytes(memory.heapUsed), arrayBuffersMB: megabytes(memory.arrayBuffers) }
  await store.close()
  process.stdout.write(`${JSON.stringify(figures)}\n`)
}

async function main(): Promise<void> {
  if (process.argv[2] === 'open') return openOnce(process.argv[3]!)
  const keys = Number(process.env.STORE_BENCH_KEYS ?? 1_000_000)
  const opens = Number(process.env.STORE_BENCH_OPENS ?? 3)
  if (!Number.isInteger(keys) || keys < 1 || !Number.isInteger(opens) || opens < 1) throw new Error('STORE_BENCH_KEYS and STORE_BENCH_OPENS must be integers ≥ 1')
  const directory = await mkdtemp(join(tmpdir(), 'disk-store-bench-'))
  try {
    const filling = performance.now()
    await fill(directory, keys)
    const logBytes = (await stat(join(directory, LOG_FILE_NAME))).size
    console.log(`filled ${keys} keys in ${Math.round(performance.now() - filling)} ms; log ${megabytes(logBytes)} MB`)
    const runs: OpenFigures[] = []
    for (let run = 0; run < opens; run++) {
      const child = spawnSync(process.execPath, [...process.execArgv, '--expose-gc', import.meta.filename, 'open', directory], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] })
      if (child.status !== 0) throw new Error(`the open process exited with ${child.status ?? child.signal}`)
      const figures = JSON.parse(child.stdout.trim().split('\n').at(-1)!) as OpenFigures
      if (figures.keys !== keys) throw new Error(`opened ${figures.keys} keys, not ${keys}`)
      runs.push(figures)
      console.log(`open ${run + 1}: ${figures.openMs} ms, peak RSS ${figures.peakRssMB} MB, heap ${figures.heapUsedMB} MB, ArrayBuffers ${figures.arrayBuffersMB} MB`)
    }
    console.log(JSON.stringify({ keys, logMB: megabytes(logBytes), runs }))
  } finally {
    await rm(directory, { recursive: true, force: true })
  }
}

await main()
