import { randomBytes } from 'node:crypto'
import { availableParallelism } from 'node:os'
import type { Worker } from 'node:worker_threads'
import { secp256k1 as noble } from '@noble/curves/secp256k1'
import { afterEach, describe, expect, it } from 'vitest'
import { bytesToHex, recoverAddress, type Hex } from 'viem'
import { privateKeyToAddress } from 'viem/accounts'
import { SignEngine, type SignRequest } from '../../enclave-origin/enclave/engine.js'
import { batchSizeBuckets } from '../../enclave-origin/protocol/histograms.js'
import type { RawSignature } from '../../enclave-origin/types.js'

const halfOrder = 0x7fffffffffffffffffffffffffffffff5d576e7357a4501ddfe92f46681b20a0n

const engines: SignEngine[] = []
afterEach(async () => {
  await Promise.all(engines.splice(0).map((engine) => engine.stop()))
})

async function started(options: ConstructorParameters<typeof SignEngine>[0]): Promise<SignEngine> {
  const engine = new SignEngine(options)
  engines.push(engine)
  await engine.start()
  return engine
}

/** The engine's threads and the script they run, which these tests reach into. */
function internalsOf(engine: SignEngine): { slots: { worker: Worker }[]; workerScript: URL } {
  return engine as unknown as { slots: { worker: Worker }[]; workerScript: URL }
}

/** A malformed batch, sent behind the engine's back: the first thread throws on it and dies. */
function poisonThread(engine: SignEngine): void {
  internalsOf(engine).slots[0]!.worker.postMessage({ batchId: -1, count: 1, buffer: new ArrayBuffer(1) })
}

function randomRequest(): SignRequest {
  return { privateKey: new Uint8Array(randomBytes(32)), digest: new Uint8Array(randomBytes(32)) }
}

/** The Ethereum check: r ‖ s ‖ (27 + recid) recovers the key's address, and s is low. */
async function expectValid(request: SignRequest, result: RawSignature): Promise<void> {
  expect(result.signature).toHaveLength(64)
  expect([0, 1]).toContain(result.recoveryId)
  const s = BigInt(bytesToHex(result.signature.subarray(32)))
  expect(s <= halfOrder).toBe(true)
  const signature = bytesToHex(new Uint8Array([...result.signature, 27 + result.recoveryId]))
  const recovered = await recoverAddress({ hash: bytesToHex(request.digest), signature })
  expect(recovered).toBe(privateKeyToAddress(bytesToHex(request.privateKey) as Hex))
}

describe('SignEngine', () => {
  it('signs so that the signature recovers the signer and is low-s', async () => {
    const engine = await started({ threads: 1 })
    const request = randomRequest()
    await expectValid(request, await engine.sign(request))
  })

  it('leaves the caller\u2019s key and digest untouched', async () => {
    const engine = await started({ threads: 1 })
    const request = randomRequest()
    const before = { privateKey: request.privateKey.slice(), digest: request.digest.slice() }
    await engine.sign(request)
    expect(request).toEqual(before)
  })

  it('has copied each key and digest when sign() returns: the caller may reuse their memory at once (inline, alone, in a batch)', async () => {
    const expectSignedAsGiven = async (engine: SignEngine, count: number) => {
      const requests = Array.from({ length: count }, randomRequest)
      const given = requests.map((request) => ({ privateKey: request.privateKey.slice(), digest: request.digest.slice() }))
      const signing = requests.map((request) => engine.sign(request))
      // As the key cache reuses a slab slot: other bytes where the key was, before anything was signed.
      for (const request of requests) {
        request.privateKey.set(randomBytes(32))
        request.digest.fill(0)
      }
      for (const [i, result] of (await Promise.all(signing)).entries()) await expectValid(given[i]!, result)
    }
    const inline = await started({ threads: 1 })
    await expectSignedAsGiven(inline, 1)
    expect(inline.stats().inline).toBe(1)
    // One thread, no inline signing: the first goes alone to the idle thread, the next two wait together in a batch.
    const threaded = await started({ threads: 1, inlinePerTurn: 0 })
    await expectSignedAsGiven(threaded, 3)
    expect(threaded.stats()).toMatchObject({ inline: 0, batches: 2, batchedSigns: 3 })
  })

  it('signs 2,000 concurrent requests across threads, all correctly', { timeout: 30_000 }, async () => {
    const engine = await started({ threads: 2 })
    const requests = Array.from({ length: 2000 }, randomRequest)
    const results = await Promise.all(requests.map((request) => engine.sign(request)))
    // Every signature byte-for-byte equals an independent RFC 6979 implementation's (about 0.5 ms each);
    // viem's recovery (about 3 ms each) checks a sample.
    for (const [i, result] of results.entries()) {
      const reference = noble.sign(requests[i]!.digest, requests[i]!.privateKey, { lowS: true })
      expect(result).toEqual({ signature: reference.toCompactRawBytes(), recoveryId: reference.recovery })
      if (i % 40 === 0) await expectValid(requests[i]!, result)
    }
    const stats = engine.stats()
    expect(stats).toMatchObject({ threads: 2, inflight: 0, queued: 0 })
    // Far fewer messages than requests: the load was batched.
    expect(stats.batches).toBeLessThan(2000)
    expect(stats.meanBatchSize).toBeGreaterThan(1)
  })

  it('gives identical (RFC 6979) signatures with batching on and off', async () => {
    const batched = await started({ threads: 2, inlinePerTurn: 0 })
    const unbatched = await started({ threads: 2, batching: false, inlinePerTurn: 0 })
    const requests = Array.from({ length: 200 }, randomRequest)
    const a = await Promise.all(requests.map((request) => batched.sign(request)))
    const b = await Promise.all(requests.map((request) => unbatched.sign(request)))
    expect(a).toEqual(b)
    expect(unbatched.stats()).toMatchObject({ batches: 200, meanBatchSize: 1 })
    expect(batched.stats().batches).toBeLessThan(200)
  })

  it('signs the first requests of a turn on the calling thread while no thread has work, and the rest on the threads', async () => {
    const engine = await started({ threads: 1, inlinePerTurn: 3, maxWaitMs: 1 })
    const requests = Array.from({ length: 6 }, randomRequest)
    const signing = requests.map((request) => engine.sign(request))
    // Three were signed before sign() returned; the fourth went alone to the idle thread, the last two wait in a batch.
    expect(engine.stats()).toMatchObject({ inline: 3, batches: 1, queued: 2 })
    const results = await Promise.all(signing)
    for (const [i, result] of results.entries()) await expectValid(requests[i]!, result)
    expect(engine.stats()).toMatchObject({ inline: 3, batches: 2, meanBatchSize: 1.5 })
  })

  it('gives inline and thread signatures that are byte-for-byte the same', async () => {
    const inline = await started({ threads: 1, inlinePerTurn: 1 })
    const threaded = await started({ threads: 1, inlinePerTurn: 0 })
    const request = randomRequest()
    expect(await inline.sign(request)).toEqual(await threaded.sign(request))
    expect(inline.stats()).toMatchObject({ inline: 1, batches: 0 })
    expect(threaded.stats()).toMatchObject({ inline: 0, batches: 1 })
  })

  it('refills the inline allowance each event-loop turn, and signs nothing inline while the threads have work', async () => {
    const engine = await started({ threads: 1, inlinePerTurn: 1, maxWaitMs: 10_000 })
    const first = Array.from({ length: 50 }, () => engine.sign(randomRequest()))
    expect(engine.stats().inline).toBe(1)
    await new Promise((resolve) => setImmediate(resolve))
    // The allowance is back, but the thread still holds the other 49.
    const during = engine.sign(randomRequest())
    expect(engine.stats().inline).toBe(1)
    await Promise.all([...first, during])
    await engine.sign(randomRequest())
    expect(engine.stats().inline).toBe(2)
  })

  it('signs nothing inline in the turn after one that brought more requests than its allowance, until a light turn', async () => {
    const engine = await started({ threads: 1, inlinePerTurn: 2, maxWaitMs: 1 })
    // Each step in a turn of its own: a turn ends at its setImmediate, and the answers may come back before that one
    // runs (when the turn began in the loop's check phase), which would make the next step part of the same turn.
    const nextTurn = () => new Promise((resolve) => setImmediate(resolve))
    await Promise.all(Array.from({ length: 5 }, () => engine.sign(randomRequest())))
    expect(engine.stats().inline).toBe(2)
    await nextTurn()
    // The engine is idle again and this is a new turn, but the last turn was load: the thread signs it.
    await engine.sign(randomRequest())
    expect(engine.stats()).toMatchObject({ inline: 2, batches: 3 })
    await nextTurn()
    // That turn brought one request, within the allowance: inline signing is back.
    await engine.sign(randomRequest())
    expect(engine.stats().inline).toBe(3)
  })

  it('rejects an invalid (zero) key signed inline, and the engine goes on', async () => {
    const engine = await started({ threads: 1, inlinePerTurn: 1 })
    await expect(engine.sign({ privateKey: new Uint8Array(32), digest: new Uint8Array(32) })).rejects.toThrow(/invalid private key/)
    await new Promise((resolve) => setImmediate(resolve))
    const request = randomRequest()
    await expectValid(request, await engine.sign(request))
  })

  it('rejects only the request with an invalid (zero) key, not the rest of its batch', async () => {
    // One thread, so the first request goes alone to the idle thread and the next four fill one batch.
    const engine = await started({ threads: 1, maxBatch: 4, maxWaitMs: 10_000, inlinePerTurn: 0 })
    const requests = Array.from({ length: 5 }, randomRequest)
    requests[3] = { privateKey: new Uint8Array(32), digest: new Uint8Array(randomBytes(32)) }
    const settled = await Promise.allSettled(requests.map((request) => engine.sign(request)))
    expect(engine.stats()).toMatchObject({ batches: 2, meanBatchSize: 2.5 })
    for (const [i, outcome] of settled.entries()) {
      if (i === 3) {
        expect(outcome.status).toBe('rejected')
        expect((outcome as PromiseRejectedResult).reason.message).toMatch(/invalid private key/)
      } else {
        expect(outcome.status).toBe('fulfilled')
        await expectValid(requests[i]!, (outcome as PromiseFulfilledResult<RawSignature>).value)
      }
    }
  })

  it('by default runs one thread per core and sends at most 32 requests in one batch', async () => {
    const engine = await started({ inlinePerTurn: 0 })
    expect(engine.stats().threads).toBe(availableParallelism())
    // Every thread busy with a first request, then 40 more in the same turn: they leave in batches of at most 32.
    await Promise.all(Array.from({ length: availableParallelism() + 40 }, () => engine.sign(randomRequest())))
    const { batchSizes } = engine.stats()
    expect(batchSizes[batchSizeBuckets.indexOf(32)]).toBeGreaterThanOrEqual(1) // a batch of 17–32
    expect(batchSizes[batchSizeBuckets.length]).toBe(0) // none over 32
  })

  it('rejects malformed inputs without sending them', async () => {
    const engine = await started({ threads: 1 })
    await expect(engine.sign({ privateKey: new Uint8Array(31), digest: new Uint8Array(32) })).rejects.toThrow(/privateKey/)
    await expect(engine.sign({ privateKey: new Uint8Array(32), digest: new Uint8Array(33) })).rejects.toThrow(/digest/)
    expect(engine.stats().batches).toBe(0)
  })

  it('rejects a dead thread\u2019s in-flight requests and replaces the thread', async () => {
    const engine = await started({ threads: 1, inlinePerTurn: 0 })
    // The engine does not know the poison was sent, so the next request goes to the same, idle-looking thread and queues behind it.
    poisonThread(engine)
    await expect(engine.sign(randomRequest())).rejects.toThrow(/signing thread exited \(code 1\): signWorker: malformed batch/)
    expect(engine.stats()).toMatchObject({ threads: 1, inflight: 0 })
    const request = randomRequest()
    await expectValid(request, await engine.sign(request))
  })

  it('gives each line its threads write (a Node warning too) to its log, as a log line, and signs on', async () => {
    const lines: Array<Record<string, unknown>> = []
    const engine = new SignEngine({ threads: 1, inlinePerTurn: 0, log: (fields) => lines.push(fields) })
    engines.push(engine)
    const signWorker = internalsOf(engine).workerScript
    // The real signing thread, after a warning and lines of its own: a long one, and a last one it never ends.
    const script = `process.emitWarning('a test warning', 'TestWarning')
console.error('plain text on stderr')
console.log('x'.repeat(2000))
process.on('exit', () => process.stdout.write('a last line, never ended, written as it exits'))
await import(${JSON.stringify(signWorker.href)})`
    internalsOf(engine).workerScript = new URL(`data:text/javascript,${encodeURIComponent(script)}`)
    await engine.start()
    const request = randomRequest()
    await expectValid(request, await engine.sign(request))
    // Once stopped, what its threads wrote last has been logged too.
    await engine.stop()
    const output = (stream: string, text: unknown) => ({ level: 'warn', event: 'signing_thread_output', stream, text })
    expect(lines).toEqual(
      expect.arrayContaining([
        output('stderr', expect.stringContaining('TestWarning: a test warning')),
        output('stderr', 'plain text on stderr'),
        output('stdout', 'x'.repeat(500)),
        output('stdout', 'a last line, never ended, written as it exits'),
      ]),
    )
  })

  it('zeroes the keys of the batches a thread held when it died: they are not left in its freed memory', async () => {
    const engine = new SignEngine({ threads: 1, inlinePerTurn: 0 })
    engines.push(engine)
    const signWorker = internalsOf(engine).workerScript
    // A thread that shows the test each batch it is sent (as it is: the buffer is shared) and dies, unsigned, after the second.
    const script = `import { parentPort } from 'node:worker_threads'
let batches = 0
parentPort.on('message', (message) => {
  if ('close' in message) return parentPort.close()
  parentPort.postMessage({ observed: message.buffer })
  if (++batches === 2) setTimeout(() => process.exit(7), 50)
})
parentPort.postMessage({ ready: true })`
    internalsOf(engine).workerScript = new URL(`data:text/javascript,${encodeURIComponent(script)}`)
    await engine.start()
    internalsOf(engine).workerScript = signWorker
    const observed: Array<{ live: Uint8Array; asSent: Uint8Array }> = []
    internalsOf(engine).slots[0]!.worker.on('message', (message: { observed?: ArrayBufferLike }) => {
      if (message.observed) observed.push({ live: new Uint8Array(message.observed), asSent: new Uint8Array(message.observed).slice() })
    })
    // The first goes alone to the idle thread, the second in a batch behind it.
    const requests = [randomRequest(), randomRequest()]
    for (const outcome of await Promise.allSettled(requests.map((request) => engine.sign(request)))) {
      expect(outcome).toMatchObject({ status: 'rejected', reason: expect.objectContaining({ message: expect.stringMatching(/signing thread exited \(code 7\)/) }) })
    }
    expect(observed).toHaveLength(2)
    for (const [i, { live, asSent }] of observed.entries()) {
      expect(asSent.subarray(0, 32)).toEqual(requests[i]!.privateKey)
      expect(live.every((byte) => byte === 0)).toBe(true)
    }
    const request = randomRequest()
    await expectValid(request, await engine.sign(request))
  })

  it('keeps trying to replace a dead thread whose replacement fails to start, until one starts', async () => {
    const engine = await started({ threads: 1, inlinePerTurn: 0 })
    const script = internalsOf(engine).workerScript
    // Replacements now fail to start, as they would in a process short of memory.
    internalsOf(engine).workerScript = new URL('data:text/javascript,process.exit(3)')
    poisonThread(engine)
    await expect(engine.sign(randomRequest())).rejects.toThrow(/signing thread exited/)
    // The first replacement starts and fails; the next try is 0.5 s (±25%) away.
    await expect.poll(() => engine.stats().threads, { timeout: 2_000, interval: 5 }).toBe(0)
    internalsOf(engine).workerScript = script
    await expect.poll(() => engine.stats().threads, { timeout: 3_000, interval: 50 }).toBe(1)
    const request = randomRequest()
    await expectValid(request, await engine.sign(request))
  })

  it('replaces a thread that became ready and then died while the others were still starting', async () => {
    const engine = new SignEngine({ threads: 2, inlinePerTurn: 0 })
    engines.push(engine)
    const signWorker = internalsOf(engine).workerScript
    // Of the two threads (consecutive ids), one is ready at once and dies; the other loads the real script 300 ms on.
    const script = `import { parentPort, threadId } from 'node:worker_threads'
if (threadId % 2 === 0) {
  parentPort.postMessage({ ready: true })
  setTimeout(() => process.exit(3), 20)
} else setTimeout(() => import(${JSON.stringify(signWorker.href)}), 300)`
    internalsOf(engine).workerScript = new URL(`data:text/javascript,${encodeURIComponent(script)}`)
    const starting = engine.start()
    // Threads started from now on (the replacement) run the real script.
    internalsOf(engine).workerScript = signWorker
    await starting
    await expect.poll(() => engine.stats().threads, { timeout: 3_000, interval: 20 }).toBe(2)
    const requests = Array.from({ length: 20 }, randomRequest)
    const signatures = await Promise.all(requests.map((request) => engine.sign(request)))
    for (const [i, request] of requests.entries()) await expectValid(request, signatures[i]!)
  })

  it('sends nothing to a replacement still starting while a ready thread can sign', async () => {
    const engine = await started({ threads: 2, inlinePerTurn: 0 })
    // Replacements fail to start: whatever one is sent fails with it.
    internalsOf(engine).workerScript = new URL('data:text/javascript,setTimeout(() => process.exit(3), 200)')
    poisonThread(engine)
    await expect(engine.sign(randomRequest())).rejects.toThrow(/signing thread exited/)
    expect(engine.stats().threads).toBe(2)
    const requests = Array.from({ length: 20 }, randomRequest)
    const signatures = await Promise.all(requests.map((request) => engine.sign(request)))
    for (const [i, request] of requests.entries()) await expectValid(request, signatures[i]!)
  })

  it('gives up on a thread whose reply cannot be read: its requests fail, another takes its place, nothing waits for ever', async () => {
    const engine = await started({ threads: 1, inlinePerTurn: 0 })
    const { slots } = internalsOf(engine)
    const first = slots[0]!.worker
    const firstExited = new Promise<number>((resolve) => first.once('exit', resolve))
    // Sent to that (idle) thread at once, and in flight when Node reports a message from it that failed to deserialize.
    const inFlight = engine.sign(randomRequest())
    expect(engine.stats().inflight).toBe(1)
    first.emit('messageerror', new Error('could not deserialize'))
    await expect(inFlight).rejects.toThrow('a reply from the signing thread could not be read: could not deserialize')
    expect(engine.stats().inflight).toBe(0)
    await expect.poll(() => internalsOf(engine).slots[0]?.worker, { timeout: 5_000 }).not.toBe(first)
    const request = randomRequest()
    await expectValid(request, await engine.sign(request))
    // Closed once idle (exit code 0), not terminated inside the native binding.
    expect(await firstExited).toBe(0)
  })

  it('stop() finishes queued work, resolves, and later sign() rejects clearly', async () => {
    const engine = await started({ threads: 1, maxWaitMs: 10_000 })
    const requests = Array.from({ length: 10 }, randomRequest)
    const signing = Promise.all(requests.map((request) => engine.sign(request)))
    await engine.stop()
    for (const [i, result] of (await signing).entries()) await expectValid(requests[i]!, result)
    await expect(engine.sign(randomRequest())).rejects.toThrow(/SignEngine is stopped/)
    expect(engine.stats().threads).toBe(0)
    await expect(engine.start()).rejects.toThrow(/stopped/)
  })

  it('rejects sign() before start()', async () => {
    const engine = new SignEngine({ threads: 1 })
    await expect(engine.sign(randomRequest())).rejects.toThrow(/not started/)
    await engine.stop()
  })
})
