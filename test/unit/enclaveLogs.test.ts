import { describe, expect, it } from 'vitest'
import { LogRing } from '../../enclave-origin/enclave/logRing.js'
import { EnclaveLogCollector } from '../../enclave-origin/parent/enclaveLogs.js'
import { EnclaveUnavailableError } from '../../enclave-origin/parent/enclavePool.js'
import { decodeLogsRequest, encodeLogsRequest, encodeLogsResponse } from '../../enclave-origin/protocol/messages.js'
import { auditsInto, fillMustDeliverRoom } from '../support/logRingRoom.js'

/**
 * The enclave's log lines on their way to the parent's log: the ring the
 * enclave keeps them in, and the parent's collector, joined by the LOGS
 * messages' own encoding (enclaveServer.test.ts has the service answering
 * LOGS; the end-to-end test, the parent logging a real enclave's lines).
 */

const line = (n: number) => JSON.stringify({ event: `line-${n}`, n })

/** A collector reading `ring` as the parent would, through the encoded messages; what it logs, and how often it asked. */
function collectorOf(ring: LogRing, { maxBytes = 60_000 } = {}) {
  const logged: Array<Record<string, unknown>> = []
  let asked = 0
  const collector = new EnclaveLogCollector({
    enclave: 'e1',
    log: (fields) => logged.push(fields),
    ask: async (payload) => {
      asked += 1
      return encodeLogsResponse(ring.read({ ...decodeLogsRequest(payload), maxBytes }))
    },
  })
  return { collector, logged, asked: () => asked }
}

describe('LogRing', () => {
  it('answers its lines in order, forgets those a request acknowledges, and tells another instance (a new parent) what is left', () => {
    const ring = new LogRing({ maxBytes: 1_000_000 })
    for (let n = 1; n <= 3; n++) ring.write(line(n))
    expect(ring.read({ instance: 0, after: 0, maxBytes: 60_000 })).toEqual({ instance: ring.instance, first: 1, skipped: 0, more: false, lines: [line(1), line(2), line(3)] })
    ring.write(line(4))
    // Lines 1–2 acknowledged: gone; 3 and 4 are left.
    expect(ring.read({ instance: ring.instance, after: 2, maxBytes: 60_000 }).lines).toEqual([line(3), line(4)])
    // Another instance's numbering acknowledges nothing: a parent that restarted gets what is left, from its start.
    expect(ring.read({ instance: ring.instance + 1, after: 4, maxBytes: 60_000 })).toMatchObject({ first: 3, lines: [line(3), line(4)] })
    expect(ring.read({ instance: ring.instance, after: 4, maxBytes: 60_000 })).toMatchObject({ first: 5, more: false, lines: [] })
  })

  it('drops its oldest lines past maxBytes and counts them in the next answer, again until a request acknowledges that answer', () => {
    const ring = new LogRing({ maxBytes: line(1).length * 3 })
    for (let n = 1; n <= 5; n++) ring.write(line(n))
    expect(ring.read({ instance: 0, after: 0, maxBytes: 60_000 })).toEqual({ instance: ring.instance, first: 3, skipped: 2, more: false, lines: [line(3), line(4), line(5)] })
    // That answer was lost: the next request acknowledges none of it (as a parent that had read up to line 2 asks again).
    expect(ring.read({ instance: ring.instance, after: 2, maxBytes: 60_000 })).toMatchObject({ first: 3, skipped: 2, lines: [line(3), line(4), line(5)] })
    // Lines an answer carried that then make room are not lost; the acknowledgement (after 5) ends the count.
    ring.write(line(6))
    ring.write(line(7))
    expect(ring.read({ instance: ring.instance, after: 5, maxBytes: 60_000 })).toMatchObject({ first: 6, skipped: 0, lines: [line(6), line(7)] })
    for (let n = 8; n <= 10; n++) ring.write(line(n))
    // Line 10 is a byte longer, so 6, 7 and 8 make room: 6 and 7 were answered, 8 was not: one lost.
    expect(ring.read({ instance: ring.instance, after: 7, maxBytes: 60_000 })).toMatchObject({ first: 9, skipped: 1, lines: [line(9), line(10)] })
  })

  it('never drops a line that must be delivered: it moves behind the newest, and past a quarter of maxBytes of them a write throws', () => {
    const audit = (n: number) => JSON.stringify({ event: `audit-${n}`, n })
    const ring = new LogRing({ maxBytes: line(1).length * 10 })
    ring.write(audit(1), { mustDeliver: true })
    for (let n = 1; n <= 20; n++) ring.write(line(n))
    // The oldest ordinary lines went for room, the audit did not (nor is it counted lost).
    const answer = ring.read({ instance: 0, after: 0, maxBytes: 60_000 })
    expect(answer.lines).toContain(audit(1))
    const ordinary = answer.lines.filter((kept) => kept !== audit(1))
    expect(ordinary.length).toBeLessThan(10)
    expect(ordinary).toEqual(Array.from({ length: ordinary.length }, (_, i) => line(21 - ordinary.length + i)))
    expect(answer.skipped).toBe(20 - ordinary.length)
    // A quarter of 10 lines' bytes holds one audit more, not two.
    ring.write(audit(2), { mustDeliver: true })
    expect(() => ring.write(audit(3), { mustDeliver: true })).toThrow('the enclave log holds as many undelivered audit lines as it may')
    expect(ring.read({ instance: 0, after: 0, maxBytes: 60_000 }).lines).not.toContain(audit(3))
    // Collected and acknowledged, they make room again.
    const all = ring.read({ instance: 0, after: 0, maxBytes: 60_000 })
    ring.read({ instance: ring.instance, after: all.first + all.lines.length - 1, maxBytes: 60_000 })
    ring.write(audit(3), { mustDeliver: true })
    expect(ring.read({ instance: 0, after: 0, maxBytes: 60_000 }).lines).toEqual([audit(3)])
  })

  it('keeps the key cache\u2019s grace audits as lines that must be delivered, a withdrawal so if it can, the rest as ordinary lines', () => {
    const ring = new LogRing({ maxBytes: 65_536 })
    const audit = auditsInto(ring)
    const kept = () => ring.read({ instance: 0, after: 0, maxBytes: 1_000_000 }).lines.map((text) => JSON.parse(text) as { type?: string })
    // The room for lines that must be delivered, full.
    fillMustDeliverRoom(ring)
    const fullBefore = kept().length

    expect(() => audit({ type: 'grace-signature', keyId: 'k', version: 1, graceLeft: 0, at: 1 })).toThrow()
    audit({ type: 'grace-signature-withdrawn', keyId: 'k', graceLeft: 1, at: 2 })
    expect(kept().filter((line) => line.type === 'grace-signature-withdrawn')).toHaveLength(1)
    for (let n = 0; n < 1_000; n++) audit({ type: 'refresh-failed', keyId: 'k', version: 1, reason: 'the record will not open', at: 3 })

    const lines = kept()
    expect(lines.filter((line) => line.type === 'grace-signature')).toEqual([])
    // Ordinary lines: the oldest of the thousand went for room; none of the room for audits was taken.
    expect(lines.filter((line) => line.type === 'refresh-failed').length).toBeLessThan(1_000)
    expect(lines.length - fullBefore).toBeGreaterThan(10)
    expect(() => ring.write('"x"', { mustDeliver: true })).toThrow()
  })

  it('keeps order and count through many drops (its queue compacts), and cuts a long line between characters, not within one', () => {
    const ring = new LogRing({ maxBytes: line(10_000).length * 100 })
    for (let n = 1; n <= 10_000; n++) ring.write(line(n))
    const kept = ring.read({ instance: 0, after: 0, maxBytes: 60_000 })
    expect(kept.first).toBeGreaterThan(9_890)
    expect(kept.skipped).toBe(kept.first - 1)
    expect(kept.lines).toEqual(Array.from({ length: 10_001 - kept.first }, (_, i) => line(kept.first + i)))
    // A pair of code units whose first would be the last kept: both go, not half of it.
    const emoji = new LogRing({ maxBytes: 1_000_000 })
    emoji.write(`${'x'.repeat(4_094)}😀${'y'.repeat(10)}`)
    emoji.write(`${'x'.repeat(4_093)}😀${'y'.repeat(10)}`)
    expect(emoji.read({ instance: 0, after: 0, maxBytes: 60_000 }).lines).toEqual([`${'x'.repeat(4_094)}…`, `${'x'.repeat(4_093)}😀…`])
    // And the answer encodes (a lone half would not).
    expect(() => encodeLogsResponse(emoji.read({ instance: 0, after: 0, maxBytes: 60_000 }))).not.toThrow()
  })

  it('answers as many lines as fit (at least one), says there are more, and cuts a line over 4,096 characters', () => {
    const ring = new LogRing({ maxBytes: 1_000_000 })
    ring.write('x'.repeat(10_000))
    for (let n = 1; n <= 3; n++) ring.write(line(n))
    const first = ring.read({ instance: 0, after: 0, maxBytes: 100 })
    expect(first).toMatchObject({ first: 1, more: true })
    expect(first.lines).toEqual([`${'x'.repeat(4_095)}…`])
    const next = ring.read({ instance: ring.instance, after: 1, maxBytes: 2 * (2 + line(1).length) })
    expect(next).toMatchObject({ first: 2, more: true, lines: [line(1), line(2)] })
  })
})

describe('EnclaveLogCollector', () => {
  it('logs each of the enclave\u2019s lines once, with its fields, the enclave and the source, asking again at once while there are more', async () => {
    const ring = new LogRing({ maxBytes: 1_000_000 })
    for (let n = 1; n <= 50; n++) ring.write(line(n))
    ring.write('not JSON')
    // About ten lines an answer: five answers for the 51 lines, then one with none (the last acknowledges them).
    const { collector, logged, asked } = collectorOf(ring, { maxBytes: 10 * (2 + line(10).length) })
    await collector.poll()
    expect(logged).toEqual([
      ...Array.from({ length: 50 }, (_, i) => ({ event: `line-${i + 1}`, n: i + 1, source: 'enclave', enclave: 'e1' })),
      { event: 'enclave_log_line', text: 'not JSON', source: 'enclave', enclave: 'e1' },
    ])
    expect(asked()).toBeGreaterThanOrEqual(5)
    ring.write(line(51))
    await collector.poll()
    expect(logged.slice(51)).toEqual([{ event: 'line-51', n: 51, source: 'enclave', enclave: 'e1' }])
    // The enclave holds only what the last answer carried, unacknowledged.
    expect(ring.read({ instance: 0, after: 0, maxBytes: 60_000 }).lines).toEqual([line(51)])
  })

  it('reports lines the enclave dropped before they were collected, and takes a restarted enclave\u2019s lines from its first', async () => {
    let ring = new LogRing({ maxBytes: line(1).length * 2 })
    const logged: Array<Record<string, unknown>> = []
    const collector = new EnclaveLogCollector({ enclave: 'e1', log: (fields) => logged.push(fields), ask: async (payload) => encodeLogsResponse(ring.read({ ...decodeLogsRequest(payload), maxBytes: 60_000 })) })
    for (let n = 1; n <= 5; n++) ring.write(line(n))
    await collector.poll()
    expect(logged).toEqual([
      { level: 'warn', event: 'enclave_log_lines_lost', source: 'enclave', enclave: 'e1', count: 3 },
      { event: 'line-4', n: 4, source: 'enclave', enclave: 'e1' },
      { event: 'line-5', n: 5, source: 'enclave', enclave: 'e1' },
    ])
    // A restart: numbering starts again at 1, under another instance.
    ring = new LogRing({ maxBytes: 1_000_000 })
    ring.write(line(1))
    await collector.poll()
    expect(logged.slice(3)).toEqual([{ event: 'line-1', n: 1, source: 'enclave', enclave: 'e1' }])
  })

  it('gives up until the next poll on an enclave out of reach, quietly, and on a refusal or an answer it cannot read, saying so once', async () => {
    const logged: unknown[] = []
    let answer: () => Promise<Uint8Array> = () => Promise.reject(new EnclaveUnavailableError('cannot connect to the enclave'))
    const collector = new EnclaveLogCollector({ enclave: 'e1', log: (fields) => logged.push(fields), ask: () => answer() })
    await collector.poll()
    expect(logged).toEqual([])
    answer = async () => encodeLogsRequest({ instance: 1, after: 1 })
    await collector.poll()
    await collector.poll()
    expect(logged).toEqual([{ level: 'error', event: 'enclave_logs_not_collected', enclave: 'e1', error: expect.stringContaining('LOGS response') }])
    logged.length = 0
    answer = async () => encodeLogsResponse({ instance: 1, first: 1, skipped: 0, more: false, lines: [line(1)] })
    await collector.poll()
    expect(logged).toEqual([{ event: 'line-1', n: 1, source: 'enclave', enclave: 'e1' }])
  })
})
