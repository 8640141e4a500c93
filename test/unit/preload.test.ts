import { constants as bufferConstants } from 'node:buffer'
import { createHash } from 'node:crypto'
import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { armor, Decrypter, Encrypter } from 'age-encryption'
import { generatePrivateKey } from 'viem/accounts'
import { hexToBytes } from 'viem'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { memoryWatch, processMemory, type MemoryGauge } from '../../enclave-origin/enclave/memory.js'
import { loadPreloadFile, maxAccountIdBytes, parseDecryptedJson, parseShareEntries, PreloadedKeys, PreloadError } from '../../enclave-origin/enclave/preload.js'
import { generatePreloadIdentity, sealShareFile, type ShareFileEntry } from '../../enclave-origin/preloadFiles.js'

/** The secp256k1 group order n: a share equal to it is 32 bytes of hex but not a private key. */
const curveOrderHex = 'fffffffffffffffffffffffffffffffebaaedce6af48a03bbfd25e8cd0364141'

type Logged = Record<string, unknown>

let identity: string
let recipient: string
let otherIdentity: string

beforeAll(async () => {
  ;({ identity, recipient } = await generatePreloadIdentity())
  ;({ identity: otherIdentity } = await generatePreloadIdentity())
})

/** `count` custodial accounts; every other share is written without its 0x, as both forms are accepted. */
function generatedEntries(count: number): ShareFileEntry[] {
  return Array.from({ length: count }, (_, index) => {
    const key = generatePrivateKey()
    return { account_id: `account-${index}`, share: index % 2 === 0 ? key : key.slice(2) }
  })
}

/** Seals arbitrary text, bypassing sealShareFile's checks, to build the files the loader must refuse. */
async function sealText(text: string): Promise<Uint8Array> {
  const encrypter = new Encrypter()
  encrypter.addRecipient(recipient)
  return encrypter.encrypt(text)
}

function collectingLog(): { log: (fields: Logged) => void; lines: Logged[] } {
  const lines: Logged[] = []
  return { log: (fields) => lines.push(fields), lines }
}

/** Loads and expects a refusal; returns it so each test can pin what it says. */
async function refusal(bytes: Uint8Array, options: { identity?: string; memory?: () => MemoryGauge[] } = {}): Promise<PreloadError> {
  const error = await loadPreloadFile({ bytes, identity: options.identity ?? identity, memory: options.memory, log: () => {} }).catch(
    (caught: unknown) => caught,
  )
  expect(error).toBeInstanceOf(PreloadError)
  return error as PreloadError
}

describe('loadPreloadFile: a sealed share file round trip', () => {
  const entries = generatedEntries(1_000)
  let file: Uint8Array

  beforeAll(async () => {
    file = await sealShareFile({ entries, recipient })
  })

  it('loads every account with its exact private key, with or without 0x', async () => {
    const { log } = collectingLog()
    const { keys, count } = await loadPreloadFile({ bytes: file, identity, log })
    expect(count).toBe(1_000)
    expect(keys.size).toBe(1_000)
    for (const { account_id, share } of entries) {
      const expected = hexToBytes(share.startsWith('0x') ? (share as `0x${string}`) : `0x${share}`)
      expect(keys.get(account_id)).toEqual(expected)
    }
  })

  it('fingerprints the encrypted file with SHA-256 and logs the fingerprint, count and load time, with no warning', async () => {
    const { log, lines } = collectingLog()
    let clock = 1_000
    const { fingerprint, loadMs } = await loadPreloadFile({ bytes: file, identity, log, now: () => (clock += 7) })
    expect(fingerprint).toBe(createHash('sha256').update(file).digest('hex'))
    expect(loadMs).toBe(7)
    expect(lines).toEqual([{ event: 'preload_loaded', fingerprint, count: 1_000, loadMs: 7 }])
  })

  it('never writes a share into the log', async () => {
    const { log, lines } = collectingLog()
    await loadPreloadFile({ bytes: file, identity, log })
    const logged = JSON.stringify(lines).toLowerCase()
    for (const { share } of entries.slice(0, 50)) expect(logged).not.toContain(share.replace(/^0x/, '').toLowerCase())
  })

  describe('from disk', () => {
    let directory: string

    beforeAll(async () => {
      directory = await mkdtemp(join(tmpdir(), 'preload-'))
    })
    afterAll(() => rm(directory, { recursive: true, force: true }))

    it('reads the file at a path and fingerprints the bytes on disk', async () => {
      const path = join(directory, 'shares.age')
      await writeFile(path, file)
      const { count, fingerprint } = await loadPreloadFile({ path, identity, log: () => {} })
      expect(count).toBe(1_000)
      expect(fingerprint).toBe(createHash('sha256').update(file).digest('hex'))
    })

    it('refuses a path that cannot be read, saying so', async () => {
      const error = await loadPreloadFile({ path: join(directory, 'missing.age'), identity, log: () => {} }).catch((caught: unknown) => caught)
      expect(error).toBeInstanceOf(PreloadError)
      expect((error as Error).message).toMatch(/cannot read.*ENOENT/)
    })
  })

  it('accepts an ASCII-armored file (age -a)', async () => {
    const armored = new TextEncoder().encode(armor.encode(file))
    const { count } = await loadPreloadFile({ bytes: armored, identity, log: () => {} })
    expect(count).toBe(1_000)
  })

  it('accepts the identity as an age-keygen identity file, comments and all', async () => {
    const keygenFile = `# created: 2025-01-01T00:00:00Z\n# public key: ${recipient}\n${identity}\n`
    const { count } = await loadPreloadFile({ bytes: file, identity: keygenFile, log: () => {} })
    expect(count).toBe(1_000)
  })
})

describe('loadPreloadFile refuses to serve, and says why', () => {
  it('refuses a file sealed for another identity, naming the identity as the cause', async () => {
    const file = await sealShareFile({ entries: generatedEntries(3), recipient })
    const error = await refusal(file, { identity: otherIdentity })
    expect(error.message).toMatch(/identity does not match/)
  })

  it('refuses an identity that is not an age secret key, without quoting it', async () => {
    const file = await sealShareFile({ entries: generatedEntries(3), recipient })
    const notAnIdentity = 'AGE-SECRET-KEY-1NOTAREALKEYATALL'
    const error = await refusal(file, { identity: notAnIdentity })
    expect(error.message).toMatch(/not an age secret key/)
    expect(error.message).not.toContain(notAnIdentity)
  })

  it('refuses a file that is not age at all', async () => {
    const plainJson = new TextEncoder().encode(JSON.stringify(generatedEntries(3)))
    expect((await refusal(plainJson)).message).toMatch(/not an age file/)
  })

  it('refuses an age file whose payload was tampered with', async () => {
    const file = await sealShareFile({ entries: generatedEntries(3), recipient })
    const tampered = file.slice()
    tampered[tampered.length - 1]! ^= 0x01
    expect((await refusal(tampered)).message).toMatch(/payload does not decrypt/)
  })

  it('refuses bad JSON inside, giving at most its position', async () => {
    const error = await refusal(await sealText('[{"account_id":"a" "share":"00"}]'))
    expect(error.message).toBe('the decrypted preload file is not valid JSON (at position 19)')
  })

  it('refuses bad JSON without quoting the text around the error, which could be a share', async () => {
    const share = generatePrivateKey().slice(2)
    // V8 quotes the text around an unexpected token in its own message.
    const error = await refusal(await sealText(`[{"account_id":"a","share":"${share}"}, x${share}]`))
    expect(error.message).toMatch(/not valid JSON/)
    expect(error.message).not.toContain(share.slice(0, 6))
  })

  it('refuses JSON that is not an array of entries', async () => {
    expect((await refusal(await sealText('{"account_id":"a"}'))).message).toMatch(/JSON array/)
  })

  it('refuses an empty array rather than serving no keys', async () => {
    expect((await refusal(await sealText('[]'))).message).toMatch(/no entries/)
  })

  it('refuses an entry whose share is not a secp256k1 private key, naming its index and not the share', async () => {
    const entries = generatedEntries(4)
    entries[2]!.share = curveOrderHex
    const error = await refusal(await sealText(JSON.stringify(entries)))
    expect(error.message).toMatch(/index 2: share is not a valid secp256k1 private key/)
    expect(error.message).not.toContain(curveOrderHex)
  })

  it('refuses a share that is not 32 bytes of hex, naming its index', async () => {
    const entries = generatedEntries(4)
    entries[3]!.share = entries[3]!.share.slice(0, -2)
    expect((await refusal(await sealText(JSON.stringify(entries)))).message).toMatch(/index 3: share is not a 32-byte private key in hex/)
  })

  it('refuses an entry without an account_id, naming its index', async () => {
    const entries: unknown[] = generatedEntries(3)
    entries[1] = { share: generatePrivateKey() }
    expect((await refusal(await sealText(JSON.stringify(entries)))).message).toMatch(/index 1: account_id is missing/)
  })

  it(`refuses an account_id over ${maxAccountIdBytes} UTF-8 bytes, and accepts one of exactly ${maxAccountIdBytes}`, async () => {
    const entries = generatedEntries(2)
    entries[0]!.account_id = 'a'.repeat(maxAccountIdBytes)
    entries[1]!.account_id = 'é'.repeat(maxAccountIdBytes / 2 + 1)
    expect((await refusal(await sealText(JSON.stringify(entries)))).message).toMatch(/index 1: account_id is 130 bytes/)
    const { count } = await loadPreloadFile({ bytes: await sealText(JSON.stringify(entries.slice(0, 1))), identity, log: () => {} })
    expect(count).toBe(1)
  })

  it('refuses an account_id with a lone surrogate, which no request could name', () => {
    const entries = generatedEntries(2)
    entries[1]!.account_id = '\ud800'
    expect(() => parseShareEntries(entries)).toThrow('entry at index 1: account_id is not well-formed Unicode (a lone surrogate)')
  })

  it('refuses a duplicate account_id, naming both indexes', async () => {
    const entries = generatedEntries(5)
    entries[3]!.account_id = entries[1]!.account_id
    expect((await refusal(await sealText(JSON.stringify(entries)))).message).toMatch(/index 3: duplicate account_id \(first at index 1\)/)
  })
})

describe('loadPreloadFile against its memory limit', () => {
  let file: Uint8Array

  beforeAll(async () => {
    file = await sealShareFile({ entries: generatedEntries(100), recipient })
  })

  it('refuses before decrypting anything when a gauge has no room for the decrypted file and its parse, naming which', async () => {
    const decrypted = JSON.stringify(generatedEntries(100)).length
    let allocated = 0
    const load = (free: number) => {
      const memory = () => [...processMemory(), { what: 'V8 heap', inUseBytes: 2 ** 30, limitBytes: 2 ** 30 + free }]
      return loadPreloadFile({ bytes: file, identity, memory, log: () => {}, allocate: (bytes) => ((allocated += 1), new ArrayBuffer(bytes)) })
    }
    // Four times the decrypted file: the file itself, and about three for its string and the parsed entries.
    const error = await load(4 * decrypted - 1).catch((caught: unknown) => caught)
    expect(error).toBeInstanceOf(PreloadError)
    expect((error as Error).message).toMatch(/^not enough memory: the decrypted preload file is [\d.]+ MB, and loading it needs about [\d.]+ MB more of V8 heap, of which [\d.]+ MB are free$/)
    expect(allocated).toBe(0)
    expect((await load(4 * decrypted)).count).toBe(100)
  })

  it('refuses, saying why, when the one buffer for every key cannot be allocated', () => {
    const entries = generatedEntries(1_000)
    // What V8 throws when it cannot allocate an ArrayBuffer; a real 32 kB allocation would not fail here.
    const allocate = () => {
      throw new RangeError('Array buffer allocation failed')
    }
    let error: unknown
    try {
      parseShareEntries(entries, { allocate })
    } catch (caught) {
      error = caught
    }
    expect(error).toBeInstanceOf(PreloadError)
    expect((error as Error).message).toBe('not enough memory: the keys of 1000 entries need 0.0 MB in one buffer, which this process could not allocate (Array buffer allocation failed)')
    // Any other failure of the allocator is not taken for a lack of memory.
    expect(() =>
      parseShareEntries(entries, {
        allocate: () => {
          throw new TypeError('not a number')
        },
      }),
    ).toThrow(TypeError)
  })

  it('refuses an ASCII-armored file without room to decode it before decoding it, naming the armor', async () => {
    const armored = new TextEncoder().encode(armor.encode(file))
    // Room for the binary file's load, but not for four times the armor's size.
    const load = (bytes: Uint8Array) => loadPreloadFile({ bytes, identity, log: () => {}, memory: () => [{ what: 'V8 heap', inUseBytes: 0, limitBytes: 4 * armored.length - 1 }] })
    expect((await load(file)).count).toBeGreaterThan(0)
    const error = await load(armored).catch((caught: unknown) => caught)
    expect(error).toBeInstanceOf(PreloadError)
    expect((error as Error).message).toMatch(/^not enough memory: the ASCII-armored preload file is [\d.]+ MB, and decoding and loading it needs about [\d.]+ MB more of V8 heap, of which [\d.]+ MB are free$/)
  })

  it('refuses, saying why, when the buffer for the decrypted file cannot be allocated', async () => {
    const sizes: number[] = []
    const allocate = (bytes: number) => {
      sizes.push(bytes)
      throw new RangeError('Array buffer allocation failed')
    }
    const error = await loadPreloadFile({ bytes: file, identity, allocate, log: () => {} }).catch((caught: unknown) => caught)
    expect(error).toBeInstanceOf(PreloadError)
    expect((error as Error).message).toMatch(/^not enough memory: the decrypted preload file needs [\d.]+ MB in one buffer, which this process could not allocate \(Array buffer allocation failed\)$/)
    // The first allocation is the plaintext, sized from the age header: JSON of 100 entries, each over 64 hex digits.
    expect(sizes).toHaveLength(1)
    expect(sizes[0]).toBeGreaterThan(100 * 64)
  })

  it('loads through an allocator that works, using it for the decrypted file and the keys', async () => {
    const sizes: number[] = []
    const result = await loadPreloadFile({ bytes: file, identity, log: () => {}, allocate: (bytes) => (sizes.push(bytes), new ArrayBuffer(bytes)) })
    expect(result.count).toBe(100)
    expect(sizes).toEqual([expect.any(Number), 100 * 32])
  })

  // Filling and decoding half a gigabyte takes seconds on a busy two-core machine.
  it('says a decrypted file is too large to be one string, rather than calling it not UTF-8 (a ~512 MB buffer, no age file)', { timeout: 30_000 }, () => {
    const tooLong = new Uint8Array(bufferConstants.MAX_STRING_LENGTH + 1).fill(0x20)
    expect(() => parseDecryptedJson(tooLong)).toThrow(
      new PreloadError(
        `the decrypted preload file (512.0 MB) is too large to parse: JSON text here is limited to ${bufferConstants.MAX_STRING_LENGTH} characters in one string (Cannot create a string longer than 0x1fffffe8 characters)`,
      ),
    )
    expect(() => parseDecryptedJson(new Uint8Array([0x5b, 0xff, 0x5d]))).toThrow(new PreloadError('the decrypted preload file is not UTF-8 text'))
  })

  it('checks the resident set, the V8 heap and the whole VM\u2019s memory by default (and a limited cgroup\u2019s, where there is one): preloaded keys live off the heap', () => {
    const gauges = processMemory().map((gauge) => gauge.what)
    expect(gauges.filter((what) => what !== 'cgroup memory')).toEqual(['resident memory', 'V8 heap', 'memory in use (MemTotal − MemAvailable)'])
    for (const gauge of processMemory()) expect(gauge.inUseBytes).toBeGreaterThan(0)
  })

  it('loads but warns when memory in use passes 70% of the limit (limit at 1.2× usage)', async () => {
    const { log, lines } = collectingLog()
    const inUseBytes = 400 * 2 ** 20
    const limitBytes = Math.round(inUseBytes * 1.2)
    const memory = () => [
      { what: 'V8 heap', inUseBytes: 1, limitBytes: 2 ** 30 },
      { what: 'resident memory', inUseBytes, limitBytes },
    ]
    const { count } = await loadPreloadFile({ bytes: file, identity, log, memory })
    expect(count).toBe(100)
    expect(lines[0]).toEqual({ level: 'warn', event: 'preload_memory_high', what: 'resident memory', inUseBytes, limitBytes, percent: 83 })
    expect(lines[1]).toMatchObject({ event: 'preload_loaded', count: 100 })
  })

  it('stays quiet below 70% of the limit', async () => {
    const { log, lines } = collectingLog()
    await loadPreloadFile({ bytes: file, identity, log, memory: () => [{ what: 'resident memory', inUseBytes: 699 * 2 ** 20, limitBytes: 1_000 * 2 ** 20 }] })
    expect(lines.map((line) => line.event)).toEqual(['preload_loaded'])
  })
})

describe('memoryWatch', () => {
  it('warns once when memory passes 70% of its limit, and says when it is back below 65%', () => {
    const { log, lines } = collectingLog()
    let inUseBytes = 500
    const watch = memoryWatch({ log, read: () => [{ what: 'resident memory', inUseBytes, limitBytes: 1_000 }] })
    watch.check()
    inUseBytes = 710
    watch.check()
    inUseBytes = 690
    watch.check()
    inUseBytes = 800
    watch.check()
    inUseBytes = 600
    watch.check()
    expect(lines).toEqual([
      { level: 'warn', event: 'memory_high', what: 'resident memory', inUseBytes: 710, limitBytes: 1_000, percent: 71 },
      { event: 'memory_normal', what: 'resident memory', inUseBytes: 600, limitBytes: 1_000, percent: 60 },
    ])
  })
})

describe('processMemory', () => {
  it('also weighs the whole VM\u2019s memory in use, which counts what the resident set does not (an enclave\u2019s root filesystem in RAM)', () => {
    const meminfo = 'MemTotal:        1000000 kB\nMemFree:          50000 kB\nMemAvailable:     200000 kB\nBuffers:  1 kB\n'
    const gauges = processMemory(() => meminfo)
    expect(gauges).toContainEqual({ what: 'memory in use (MemTotal − MemAvailable)', inUseBytes: 800_000 * 1024, limitBytes: 1_000_000 * 1024 })
    // The watch warns on it when the process itself is small.
    const logged: Array<Record<string, unknown>> = []
    memoryWatch({ log: (fields) => logged.push(fields), read: () => processMemory(() => meminfo) }).check()
    expect(logged).toMatchObject([{ event: 'memory_high', what: 'memory in use (MemTotal − MemAvailable)', percent: 80 }])
    // Without /proc/meminfo, the other gauges alone.
    expect(
      processMemory(() => {
        throw new Error('ENOENT')
      }).map((gauge) => gauge.what),
    ).toEqual(['resident memory', 'V8 heap'])
  })

  it('weighs a memory cgroup\u2019s use against its limit (v2 or v1, at the process\u2019s own path or a namespaced root), and no unlimited one', () => {
    const files = (entries: Record<string, string>) => (path: string) => {
      if (!(path in entries)) throw new Error(`ENOENT ${path}`)
      return entries[path]!
    }
    const cgroupGauge = (entries: Record<string, string>) => processMemory(files(entries)).find((gauge) => gauge.what === 'cgroup memory')
    const mib = 2 ** 20
    // v2 in a container's own namespace: its cgroup is the mount's root.
    expect(cgroupGauge({ '/proc/self/cgroup': '0::/\n', '/sys/fs/cgroup/memory.max': `${512 * mib}\n`, '/sys/fs/cgroup/memory.current': `${400 * mib}\n` })).toEqual({
      what: 'cgroup memory',
      inUseBytes: 400 * mib,
      limitBytes: 512 * mib,
    })
    // v1, the process's own path visible.
    const v1 = { '/proc/self/cgroup': '5:cpu,cpuacct:/a\n4:memory:/docker/abc\n0::/\n', '/sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes': `${256 * mib}`, '/sys/fs/cgroup/memory/docker/abc/memory.usage_in_bytes': `${100 * mib}` }
    expect(cgroupGauge(v1)).toEqual({ what: 'cgroup memory', inUseBytes: 100 * mib, limitBytes: 256 * mib })
    // Page cache the kernel would reclaim first is not counted: v2's inactive_file, v1's total_inactive_file.
    expect(cgroupGauge({ '/proc/self/cgroup': '0::/\n', '/sys/fs/cgroup/memory.max': `${512 * mib}`, '/sys/fs/cgroup/memory.current': `${400 * mib}`, '/sys/fs/cgroup/memory.stat': `anon 1\ninactive_file ${150 * mib}\nactive_file 2\n` })).toMatchObject({ inUseBytes: 250 * mib })
    expect(cgroupGauge({ ...v1, '/sys/fs/cgroup/memory/docker/abc/memory.stat': `inactive_file ${10 * mib}\ntotal_inactive_file ${40 * mib}\n` })).toMatchObject({ inUseBytes: 60 * mib })
    // No limit: 'max', or v1's near-2^63.
    expect(cgroupGauge({ '/proc/self/cgroup': '0::/\n', '/sys/fs/cgroup/memory.max': 'max\n', '/sys/fs/cgroup/memory.current': '1000\n' })).toBeUndefined()
    expect(cgroupGauge({ ...v1, '/sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes': '9223372036854771712' })).toBeUndefined()
    // The watch warns on it: 400 of 512 MiB is 78%.
    const logged: Array<Record<string, unknown>> = []
    const limited = files({ '/proc/self/cgroup': '0::/\n', '/sys/fs/cgroup/memory.max': `${512 * mib}`, '/sys/fs/cgroup/memory.current': `${400 * mib}` })
    memoryWatch({ log: (fields) => logged.push(fields), read: () => processMemory(limited) }).check()
    expect(logged).toMatchObject([{ event: 'memory_high', what: 'cgroup memory', percent: 78 }])
  })
})

describe('PreloadedKeys', () => {
  it('serves each account its key and clear() zeroes every buffer it handed out', async () => {
    const entries = generatedEntries(20)
    const { keys } = await loadPreloadFile({ bytes: await sealShareFile({ entries, recipient }), identity, log: () => {} })
    const preloaded = new PreloadedKeys(keys)
    expect(preloaded.size).toBe(20)
    expect(preloaded.get('nobody')).toBeUndefined()
    const handedOut = entries.map(({ account_id }) => preloaded.get(account_id)!)
    expect(handedOut.every((key) => key.some((byte) => byte !== 0))).toBe(true)

    preloaded.clear()

    expect(handedOut.every((key) => key.length === 32 && key.every((byte) => byte === 0))).toBe(true)
    expect(preloaded.size).toBe(0)
    expect(preloaded.get(entries[0]!.account_id)).toBeUndefined()
  })
})

describe('operator tooling', () => {
  it('generates an X25519 age identity and its matching recipient', async () => {
    const generated = await generatePreloadIdentity()
    expect(generated.identity).toMatch(/^AGE-SECRET-KEY-1[0-9A-Z]+$/)
    expect(generated.recipient).toMatch(/^age1[0-9a-z]+$/)
    expect(generated.identity).not.toBe(identity)
  })

  it('seals a standard age file holding exactly the entries as JSON', async () => {
    const entries = generatedEntries(3)
    const file = await sealShareFile({ entries: entries.map((entry) => ({ ...entry, note: 'dropped' })), recipient })
    expect(new TextDecoder().decode(file.subarray(0, 22))).toBe('age-encryption.org/v1\n')
    const decrypter = new Decrypter()
    decrypter.addIdentity(identity)
    expect(JSON.parse(await decrypter.decrypt(file, 'text'))).toEqual(entries)
  })

  it('refuses to seal what the enclave would refuse, naming the entry', async () => {
    const entries = generatedEntries(3)
    entries[2]!.share = '0x' + '00'.repeat(32)
    await expect(sealShareFile({ entries, recipient })).rejects.toThrow(/index 2: share is not a valid secp256k1 private key/)
  })

  it('refuses a recipient that is not an age recipient', async () => {
    await expect(sealShareFile({ entries: generatedEntries(1), recipient: 'ssh-ed25519 AAAA' })).rejects.toThrow(/not an age recipient/)
  })
})
