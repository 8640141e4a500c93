import { CreateBucketCommand, DeleteBucketCommand, GetObjectCommand, PutObjectCommand, S3Client } from '@aws-sdk/client-s3'
import { createServer } from 'node:http'
import type { AddressInfo } from 'node:net'
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest'
import { openS3BlobStore, parentS3Client, type S3BlobStore, type S3BlobStoreOptions } from '../../enclave-origin/parent/s3BlobStore.js'
import { KeyArchivedError, WrappedDekChangedError } from '../../enclave-origin/parent/blobStore.js'
import type { SealedKeyRecord } from '../../enclave-origin/types.js'
import { startLocalS3, type LocalS3 } from '../support/s3Server.js'
import { listAll, sealedRecord } from '../support/sealedRecords.js'

const BUCKET = 'sealed-keys'

let s3: LocalS3
/** Every store and client a test opens, closed afterwards even when the test fails. */
let opened: S3BlobStore[] = []
let clients: S3Client[] = []
/** Each test writes under its own prefix, so tests never see each other's objects. */
let prefix: string
let testNumber = 0

beforeAll(async () => {
  s3 = await startLocalS3({ buckets: [BUCKET] })
})

afterAll(async () => {
  await s3?.stop()
})

beforeEach(() => {
  prefix = `test-${++testNumber}/`
})

afterEach(async () => {
  await Promise.allSettled(opened.map((store) => store.close()))
  for (const client of clients) client.destroy()
  opened = []
  clients = []
})

function newClient(credentials: { accessKeyId: string; secretAccessKey: string } = s3.credentials): S3Client {
  const client = new S3Client({ endpoint: s3.url, forcePathStyle: true, region: s3.credentials.region, credentials, maxAttempts: 1 })
  clients.push(client)
  return client
}

/** A fresh instance on the bucket and prefix, with its own client: what a restarted parent sees. */
async function openStore(options: Partial<S3BlobStoreOptions> = {}): Promise<S3BlobStore> {
  const store = await openS3BlobStore({ client: newClient(), bucket: BUCKET, prefix, ...options })
  opened.push(store)
  return store
}

async function reopen(store: S3BlobStore, options: Partial<S3BlobStoreOptions> = {}): Promise<S3BlobStore> {
  await store.close()
  return openStore(options)
}

/** Runs `action` before each PutObject `client` sends: after the store's read of the object, before its write. */
function beforeEachPut(client: S3Client, action: () => Promise<unknown>): void {
  client.middlewareStack.add(
    (next, context) => async (args) => {
      if (context.commandName === 'PutObjectCommand') await action()
      return next(args)
    },
    { step: 'initialize', name: 'beforeEachPut' },
  )
}

/** An object as the store writes it, for another writer in a test. */
function objectBody(record: SealedKeyRecord): string {
  const base64 = (bytes: Uint8Array) => Buffer.from(bytes).toString('base64')
  return JSON.stringify({ format: 'sealed-blob-store/v1', ...record, publicKey: base64(record.publicKey), sealed: base64(record.sealed) })
}

function byKeyId(records: SealedKeyRecord[]): SealedKeyRecord[] {
  return [...records].sort((a, b) => (a.keyId < b.keyId ? -1 : a.keyId > b.keyId ? 1 : 0))
}

async function readObject(name: string): Promise<string> {
  const response = await newClient().send(new GetObjectCommand({ Bucket: BUCKET, Key: name }))
  return response.Body!.transformToString('utf8')
}

describe('openS3BlobStore', () => {
  it('round-trips records, state changes and the wrapped DEK across a fresh instance', async () => {
    const store = await openStore()
    expect(await store.get('key-1')).toBeUndefined()
    expect(await store.getWrappedDek()).toBeUndefined()
    expect(await listAll(store)).toEqual([])

    const first = sealedRecord(1)
    const second = sealedRecord(2, 7)
    await store.put(first)
    await store.put(second)
    await store.setState('key-1', 'frozen')
    await store.putWrappedDek({ keyId: 'arn:aws:kms:us-east-1:111122223333:key/one', ciphertext: new Uint8Array([1, 2, 3]) }, await store.getWrappedDek())
    await store.putWrappedDek({ keyId: 'arn:aws:kms:us-east-1:111122223333:key/two', ciphertext: new Uint8Array([9, 8, 7, 6]) }, await store.getWrappedDek())

    const frozen = { ...first, state: 'frozen' as const }
    expect(await store.get('key-1')).toEqual(frozen)
    expect(await store.get('key-2')).toEqual(second)

    const fresh = await reopen(store)
    expect(await fresh.get('key-1')).toEqual(frozen)
    expect(await fresh.get('key-2')).toEqual(second)
    expect(await fresh.get('key-3')).toBeUndefined()
    expect(byKeyId(await listAll(fresh))).toEqual([frozen, second])
    expect(await fresh.getWrappedDek()).toEqual({ keyId: 'arn:aws:kms:us-east-1:111122223333:key/two', ciphertext: new Uint8Array([9, 8, 7, 6]) })

    // setState on a fresh instance reads the stored object and keeps the rest of it.
    await fresh.setState('key-2', 'archived')
    const again = await reopen(fresh)
    expect(await again.get('key-2')).toEqual({ ...second, state: 'archived' })
  })

  it('keeps the retiring DEK of a rotation under way across a fresh instance, and forgets it when the rotation ends', async () => {
    const store = await openStore()
    const rotating = { keyId: 'key/two', ciphertext: new Uint8Array([2, 2]), retiring: { keyId: 'key/one', ciphertext: new Uint8Array([1, 1, 1]) } }
    await store.putWrappedDek(rotating, await store.getWrappedDek())
    const fresh = await reopen(store)
    expect(await fresh.getWrappedDek()).toEqual(rotating)
    await fresh.putWrappedDek({ keyId: 'key/two', ciphertext: new Uint8Array([2, 2]) }, await fresh.getWrappedDek())
    expect(await (await reopen(fresh)).getWrappedDek()).toEqual({ keyId: 'key/two', ciphertext: new Uint8Array([2, 2]) })
  })

  it('stores one JSON object per key under <prefix>keys/ with base64 binary fields, and the DEK in <prefix>dek.json', async () => {
    const store = await openStore()
    const record = { ...sealedRecord(5), keyId: 'tenant/a b?#%é' }
    await store.put(record)
    await store.putWrappedDek({ keyId: 'kms-key', ciphertext: new Uint8Array([0xff, 0x00]) }, await store.getWrappedDek())

    const stored = JSON.parse(await readObject(`${prefix}keys/${encodeURIComponent(record.keyId)}.json`))
    expect(stored).toMatchObject({
      keyId: record.keyId,
      version: 1,
      state: 'active',
      publicKey: Buffer.from(record.publicKey).toString('base64'),
      sealed: Buffer.from(record.sealed).toString('base64'),
    })
    expect(JSON.parse(await readObject(`${prefix}dek.json`))).toMatchObject({ keyId: 'kms-key', ciphertext: '/wA=' })

    const fresh = await reopen(store)
    expect(await listAll(fresh)).toEqual([record])
    expect(await fresh.get(record.keyId)).toEqual(record)
  })

  it('copies records in and out, so callers cannot change what it holds', async () => {
    const store = await openStore()
    const record = sealedRecord(1)
    await store.put(record)
    record.sealed.fill(0)
    record.publicKey[1] = 0
    const got = (await store.get('key-1'))!
    expect(got).toEqual(sealedRecord(1))
    got.sealed.fill(1)
    expect(await store.get('key-1')).toEqual(sealedRecord(1))
    const [listed] = await listAll(store)
    listed!.publicKey.fill(2)
    expect(await store.get('key-1')).toEqual(sealedRecord(1))

    const dek = { keyId: 'kms', ciphertext: new Uint8Array([1, 2]) }
    await store.putWrappedDek(dek, await store.getWrappedDek())
    dek.ciphertext.fill(0)
    const gotDek = (await store.getWrappedDek())!
    gotDek.ciphertext.fill(5)
    expect(await store.getWrappedDek()).toEqual({ keyId: 'kms', ciphertext: new Uint8Array([1, 2]) })
  })

  it('lists every one of 200 concurrent puts, paging and keeping at most listConcurrency GETs in flight', async () => {
    const store = await openStore()
    const records = Array.from({ length: 200 }, (_, index) => sealedRecord(index))
    await Promise.all(records.map((record) => store.put(record)))
    expect(store.stats().records).toBe(200)
    expect(byKeyId(await listAll(store))).toEqual(byKeyId(records))

    const fresh = await reopen(store, { listPageSize: 37, listConcurrency: 16 })
    const client = clients.at(-1)!
    let inFlight = 0
    let maxInFlight = 0
    client.middlewareStack.add(
      (next, context) => async (args) => {
        if (context.commandName !== 'GetObjectCommand') return next(args)
        maxInFlight = Math.max(maxInFlight, ++inFlight)
        try {
          return await next(args)
        } finally {
          inFlight--
        }
      },
      { step: 'initialize', name: 'countInFlightGets' },
    )
    const listed = await listAll(fresh)
    expect(byKeyId(listed)).toEqual(byKeyId(records))
    expect(fresh.stats()).toMatchObject({ gets: 200, lists: 1 + Math.ceil(200 / 37), failures: 0 })
    expect(maxInFlight).toBeGreaterThan(1)
    expect(maxInFlight).toBeLessThanOrEqual(16)
  })

  it('keeps versions monotonic: an older version than stored is refused, also by a fresh instance', async () => {
    const store = await openStore()
    await store.put(sealedRecord(1, 1))
    await store.put(sealedRecord(1, 3))
    await expect(store.put(sealedRecord(1, 2))).rejects.toThrow(/version 2 is older than the stored version 3/)
    // The same version again is a re-put, not a rollback.
    await store.put(sealedRecord(1, 3))

    const fresh = await reopen(store)
    await expect(fresh.put(sealedRecord(1, 1))).rejects.toThrow(/version 1 is older than the stored version 3/)
    expect(await fresh.get('key-1')).toEqual(sealedRecord(1, 3))

    // Queued puts are checked in call order against the ones before them.
    const results = await Promise.allSettled([fresh.put(sealedRecord(1, 5)), fresh.put(sealedRecord(1, 4)), fresh.put(sealedRecord(1, 6))])
    expect(results.map((result) => result.status)).toEqual(['fulfilled', 'rejected', 'fulfilled'])

    const last = await reopen(fresh)
    expect(await last.get('key-1')).toEqual(sealedRecord(1, 6))
    expect(await listAll(last)).toEqual([sealedRecord(1, 6)])
  })

  it('rejects setState for a key that was never put, and writes nothing', async () => {
    const store = await openStore()
    await expect(store.setState('never-put', 'frozen')).rejects.toThrow(/key never-put is not stored/)
    await store.put(sealedRecord(1))
    await expect(store.setState('key-2', 'archived')).rejects.toThrow(/key key-2 is not stored/)

    const fresh = await reopen(store)
    await expect(fresh.setState('never-put', 'frozen')).rejects.toThrow(/is not stored/)
    expect(await listAll(fresh)).toEqual([sealedRecord(1)])
    expect(fresh.stats().puts).toBe(0)
  })

  it('validates records, states and key ids before sending anything', async () => {
    const store = await openStore()
    await expect(store.put({ ...sealedRecord(1), keyId: '' })).rejects.toThrow(TypeError)
    await expect(store.put({ ...sealedRecord(1), version: -1 })).rejects.toThrow(RangeError)
    await expect(store.put({ ...sealedRecord(1), version: 1.5 })).rejects.toThrow(RangeError)
    await expect(store.put({ ...sealedRecord(1), state: 'deleted' as never })).rejects.toThrow(/unknown key state/)
    await expect(store.put({ ...sealedRecord(1), sealed: [1, 2] as never })).rejects.toThrow(TypeError)
    await expect(store.put({ ...sealedRecord(1), keyId: 'x'.repeat(1100) })).rejects.toThrow(/longer than 1024 bytes/)
    await expect(store.setState('key-1', 'gone' as never)).rejects.toThrow(/unknown key state/)
    expect(store.stats()).toMatchObject({ puts: 0, gets: 0 })
  })

  it('refuses a stored object it cannot read, with a message naming it', async () => {
    const store = await openStore()
    await newClient().send(new PutObjectCommand({ Bucket: BUCKET, Key: `${prefix}keys/key-9.json`, Body: '{"format":"sealed-blob-store/v1","keyId":"key-9"' }))
    await expect(store.get('key-9')).rejects.toThrow(new RegExp(`s3://${BUCKET}/${prefix}keys/key-9.json cannot be read \\(the object is not valid JSON`))
    // Nothing of the object's text in the message: a damaged record's base64 is its sealed key.
    await newClient().send(new PutObjectCommand({ Bucket: BUCKET, Key: `${prefix}keys/key-9.json`, Body: '{"sealed":QUJDREVGR0hJSktMTU5PUA}' }))
    const refusal = await store.get('key-9').catch((error: unknown) => String(error))
    expect(refusal).toContain('the object is not valid JSON')
    expect(refusal).not.toContain('QUJD')
    await expect(listAll(store)).rejects.toThrow(/key-9.json cannot be read/)
  })

  it('waits in close for writes in flight, and refuses work after it', async () => {
    const store = await openStore()
    const writes = Array.from({ length: 20 }, (_, index) => store.put(sealedRecord(index)))
    const dek = store.putWrappedDek({ keyId: 'kms', ciphertext: new Uint8Array([1]) }, await store.getWrappedDek())
    let settled = 0
    for (const write of [...writes, dek]) void write.then(() => settled++)
    await store.close()
    expect(settled).toBe(21)
    await expect(store.put(sealedRecord(99))).rejects.toThrow(/closed/)
    await expect(store.get('key-1')).rejects.toThrow(/closed/)
    await expect(store.setState('key-1', 'frozen')).rejects.toThrow(/closed/)
    await expect(store.putWrappedDek({ keyId: 'kms', ciphertext: new Uint8Array([2]) }, undefined)).rejects.toThrow(/closed/)
    expect(await store.close()).toBeUndefined()

    const fresh = await openStore()
    expect(await listAll(fresh)).toHaveLength(20)
    expect(await fresh.getWrappedDek()).toEqual({ keyId: 'kms', ciphertext: new Uint8Array([1]) })
  })

  it('rejects a write whose answer was lost, then reads what S3 really holds', async () => {
    const store = await openStore()
    await store.put(sealedRecord(1, 1))
    const client = clients.at(-1)!
    let failPut: 'before-sending' | 'after-sending' | undefined
    client.middlewareStack.add(
      (next, context) => async (args) => {
        if (context.commandName !== 'PutObjectCommand' || !failPut) return next(args)
        if (failPut === 'before-sending') throw Object.assign(new Error('connect ECONNRESET'), { name: 'TimeoutError' })
        await next(args)
        throw Object.assign(new Error('socket hang up'), { name: 'TimeoutError' })
      },
      { step: 'initialize', name: 'failPuts' },
    )

    failPut = 'after-sending'
    await expect(store.put(sealedRecord(1, 2))).rejects.toThrow(/PutObject .* failed: .*the write may or may not be stored/)
    failPut = undefined
    // The request did reach S3: the store must not keep claiming version 1.
    expect(await store.get('key-1')).toEqual(sealedRecord(1, 2))

    failPut = 'before-sending'
    await expect(store.setState('key-1', 'frozen')).rejects.toThrow(/may or may not be stored/)
    failPut = undefined
    expect(await store.get('key-1')).toEqual(sealedRecord(1, 2))
    expect(store.stats().failures).toBe(2)
  })
})

describe('conditional writes', () => {
  /** A store on the production client: two attempts of 300 ms each, so a held write is given up on quickly. */
  async function openTimingOutStore(): Promise<S3BlobStore> {
    const client = parentS3Client({ region: s3.credentials.region, endpoint: s3.url, timeoutMs: 300, credentials: s3.credentials })
    clients.push(client)
    const store = await openS3BlobStore({ client, bucket: BUCKET, prefix })
    opened.push(store)
    return store
  }

  it('refuses a write it gave up on that S3 takes later, once a later write of the object has landed, also one of a restarted store', async () => {
    for (const fencedBy of ['the same store', 'a restarted store']) {
      const store = await openTimingOutStore()
      await store.put(sealedRecord(1))
      await store.setState('key-1', 'frozen')

      // An unfreeze S3 receives and holds while the store gives up on it (both attempts).
      const held = s3.holdWrites(BUCKET, `${prefix}keys/key-1.json`)
      await expect(store.setState('key-1', 'active')).rejects.toThrow(/may or may not be stored/)
      expect(held.parked()).toBe(2)
      held.stopHolding()
      // S3 still says frozen, but this freeze is written anyway, so that it lands before the unfreeze can.
      const fencing = fencedBy === 'the same store' ? store : await reopen(store)
      await fencing.setState('key-1', 'frozen')
      expect(held.release(), fencedBy).toEqual([412, 412])
      expect(await (await reopen(fencing)).get('key-1'), fencedBy).toEqual({ ...sealedRecord(1), state: 'frozen' })
    }

    // The wrapped DEK likewise: a rotation's first DEK landing late does not replace a later one.
    const dekStore = await openTimingOutStore()
    await dekStore.putWrappedDek({ keyId: 'kms/one', ciphertext: new Uint8Array([1]) }, await dekStore.getWrappedDek())
    const heldDek = s3.holdWrites(BUCKET, `${prefix}dek.json`)
    await expect(dekStore.putWrappedDek({ keyId: 'kms/two', ciphertext: new Uint8Array([2]) }, await dekStore.getWrappedDek())).rejects.toThrow(/may or may not be stored/)
    heldDek.stopHolding()
    await dekStore.putWrappedDek({ keyId: 'kms/three', ciphertext: new Uint8Array([3]) }, await dekStore.getWrappedDek())
    expect(heldDek.release()).toEqual([412, 412])
    expect(await (await reopen(dekStore)).getWrappedDek()).toEqual({ keyId: 'kms/three', ciphertext: new Uint8Array([3]) })
  })

  it('keeps an archived key archived: a put from an earlier read stays archived, and no state change brings it back', async () => {
    const store = await openStore()
    await store.put(sealedRecord(1))
    await store.setState('key-1', 'archived')
    // A re-seal made from a read taken before the archiving, as a rotation's may be when that archiving landed late.
    await store.put(sealedRecord(1, 2))
    for (const state of ['active', 'frozen'] as const) await expect(store.setState('key-1', state)).rejects.toThrow(KeyArchivedError)
    expect(await (await reopen(store)).get('key-1')).toEqual({ ...sealedRecord(1, 2), state: 'archived' })
  })

  it('writes a wrapped DEK only over the one its caller read: one given up on that landed after all is not written over', async () => {
    const store = await openTimingOutStore()
    const first = { keyId: 'kms', ciphertext: new Uint8Array([0]) }
    await store.putWrappedDek(first, undefined)
    await expect(store.putWrappedDek({ keyId: 'kms', ciphertext: new Uint8Array([9]) }, undefined)).rejects.toThrow(WrappedDekChangedError)
    // A rotation's first step, given up on; the rotation, run again, reads what S3 shows, and the first attempt lands.
    const held = s3.holdWrites(BUCKET, `${prefix}dek.json`)
    const rotating = { keyId: 'kms', ciphertext: new Uint8Array([1]), retiring: first }
    await expect(store.putWrappedDek(rotating, first)).rejects.toThrow(/may or may not be stored/)
    const readAgain = await store.getWrappedDek()
    expect(readAgain).toEqual(first)
    expect(held.release()).toEqual([200, 412])
    // Its own new DEK would have replaced the one that landed, under which keys may be sealed by now.
    await expect(store.putWrappedDek({ keyId: 'kms', ciphertext: new Uint8Array([2]), retiring: first }, readAgain)).rejects.toThrow(WrappedDekChangedError)
    expect(await (await reopen(store)).getWrappedDek()).toEqual(rotating)
  })

  it('takes a DEK write whose answer was lost, and whose SDK retry met a 412, as done when S3 holds that DEK', async () => {
    const real = newClient()
    let lostAnswers = 1
    let dekPuts = 0
    // The first DEK PutObject lands, but its answer is lost and the SDK's retry of it is refused: a 412 after two attempts.
    const client = {
      send: async (command: unknown, options?: unknown) => {
        const answer = await real.send(command as never, options as never)
        if (command instanceof PutObjectCommand && command.input.Key === `${prefix}dek.json`) dekPuts++
        if (command instanceof PutObjectCommand && command.input.Key === `${prefix}dek.json` && lostAnswers-- > 0) {
          throw Object.assign(new Error('At least one of the pre-conditions you specified did not hold'), { name: 'PreconditionFailed', $metadata: { httpStatusCode: 412, attempts: 2 } })
        }
        return answer
      },
    } as unknown as S3Client
    const store = await openStore({ client })
    const dek = { keyId: 'kms', ciphertext: new Uint8Array([7]) }
    await store.putWrappedDek(dek, undefined)
    // Written once more over itself, which fences any earlier attempt still under way.
    expect(dekPuts).toBe(2)
    expect(await (await reopen(store)).getWrappedDek()).toEqual(dek)
  })

  it('reads an object from S3 each time while a write of it it gave up on may still land', async () => {
    const store = await openTimingOutStore()
    await store.put(sealedRecord(1, 1))
    const held = s3.holdWrites(BUCKET, `${prefix}keys/key-1.json`)
    await expect(store.put(sealedRecord(1, 2))).rejects.toThrow(/may or may not be stored/)
    held.stopHolding()
    expect(await store.get('key-1')).toEqual(sealedRecord(1, 1))
    // The first attempt lands (S3 still held the version it was conditioned on); the second, after it, cannot.
    expect(held.release()).toEqual([200, 412])
    expect(await store.get('key-1')).toEqual(sealedRecord(1, 2))

    // A write that lands settles the key: reads are served from the cache again.
    await store.setState('key-1', 'frozen')
    const gets = store.stats().gets
    expect(await store.get('key-1')).toEqual({ ...sealedRecord(1, 2), state: 'frozen' })
    expect(store.stats().gets).toBe(gets)
  })

  it('takes a 409 (a write of the object under way, here its own first attempt) as leaving the object unsettled', async () => {
    const store = await openTimingOutStore()
    await store.put(sealedRecord(1))
    await store.setState('key-1', 'frozen')
    // The unfreeze's first attempt is parked; its retry, and each try after re-reading, is answered 409.
    const held = s3.holdWrites(BUCKET, `${prefix}keys/key-1.json`, { conflictWhileParked: true })
    await expect(store.setState('key-1', 'active')).rejects.toThrow(/was refused 3 times .*; an attempt of it may or may not be stored$/)
    expect(store.stats().conflicts).toBe(3)
    held.stopHolding()
    // The first attempt lands after all: a read must not be served from a cache of what the store read before.
    expect(held.release()).toEqual([200])
    expect(await store.get('key-1')).toEqual(sealedRecord(1))
  })

  it('reads and checks again a write whose object changed after it was read, three times at most', async () => {
    const store = await openStore()
    const other = newClient()
    const objectName = `${prefix}keys/key-1.json`
    const writeAsOther = (record: SealedKeyRecord) =>
      other.send(new PutObjectCommand({ Bucket: BUCKET, Key: objectName, Body: objectBody(record), ContentType: 'application/json' }))
    let beforeWrite: (() => Promise<unknown>) | undefined
    beforeEachPut(clients.at(-2)!, async () => beforeWrite?.())

    // A create raced by a newer version: read again, it is refused as older.
    beforeWrite = async () => {
      beforeWrite = undefined
      await writeAsOther(sealedRecord(1, 3))
    }
    await expect(store.put(sealedRecord(1, 1))).rejects.toThrow(/version 1 is older than the stored version 3/)
    expect(store.stats()).toMatchObject({ puts: 1, conflicts: 1, failures: 0 })

    // A state change raced by another: applied to what S3 holds now.
    await store.put(sealedRecord(1, 4))
    beforeWrite = async () => {
      beforeWrite = undefined
      await writeAsOther(sealedRecord(1, 6))
    }
    await store.setState('key-1', 'archived')
    expect(await (await reopen(store)).get('key-1')).toEqual({ ...sealedRecord(1, 6), state: 'archived' })
  })

  it('gives up on a write whose object changes under each of three tries, storing nothing', async () => {
    const store = await openStore()
    const other = newClient()
    const objectName = `${prefix}keys/key-1.json`
    let version = 10
    beforeEachPut(clients.at(-2)!, () => other.send(new PutObjectCommand({ Bucket: BUCKET, Key: objectName, Body: objectBody(sealedRecord(1, ++version)) })))
    await expect(store.put(sealedRecord(1, 99))).rejects.toThrow(
      new RegExp(`PutObject s3://${BUCKET}/${objectName} was refused 3 times because the object changed after it was read or another write of it was under way .*; nothing was stored$`),
    )
    expect(store.stats()).toMatchObject({ puts: 3, conflicts: 3, failures: 0, records: 0 })
    expect(await (await reopen(store)).get('key-1')).toEqual(sealedRecord(1, 13))
  })
})

describe('S3 errors', () => {
  it('gives a clear error for a bucket that does not exist', async () => {
    await expect(openS3BlobStore({ client: newClient(), bucket: 'no-such-bucket', prefix })).rejects.toThrow(
      /S3 blob store: ListObjectsV2 s3:\/\/no-such-bucket\/.* failed: bucket "no-such-bucket" does not exist \(NoSuchBucket\)/,
    )
  })

  it('gives a clear error for credentials S3 refuses', async () => {
    const client = newClient({ accessKeyId: 'NOT-A-KEY', secretAccessKey: 'nope' })
    await expect(openS3BlobStore({ client, bucket: BUCKET, prefix })).rejects.toThrow(/access denied \(InvalidAccessKeyId/)
    const wrongSecret = newClient({ accessKeyId: s3.credentials.accessKeyId, secretAccessKey: 'not-the-secret' })
    await expect(openS3BlobStore({ client: wrongSecret, bucket: BUCKET, prefix })).rejects.toThrow(/access denied \(SignatureDoesNotMatch/)
  })

  it('rejects writes, without claiming them durable, once the bucket is gone', async () => {
    const client = newClient()
    const bucket = 'short-lived'
    await client.send(new CreateBucketCommand({ Bucket: bucket }))
    const store = await openS3BlobStore({ client, bucket, prefix })
    opened.push(store)
    await client.send(new DeleteBucketCommand({ Bucket: bucket }))

    await expect(store.put(sealedRecord(1))).rejects.toThrow(/bucket "short-lived" does not exist/)
    await expect(store.putWrappedDek({ keyId: 'kms', ciphertext: new Uint8Array([1]) }, undefined)).rejects.toThrow(
      /s3:\/\/short-lived\/.*dek.json failed: bucket "short-lived" does not exist \(NoSuchBucket\)/,
    )
    await expect(store.get('key-1')).rejects.toThrow(/bucket "short-lived" does not exist/)
    await expect(listAll(store)).rejects.toThrow(/bucket "short-lived" does not exist/)
    expect(store.stats().records).toBe(0)
  })

  /** Opening a store against `server` fails in two attempts of 300 ms (and the SDK's backoff), rather than hang. */
  async function expectOpenFailsFastAgainst(server: ReturnType<typeof createServer>) {
    await new Promise<void>((listening) => server.listen(0, '127.0.0.1', listening))
    const client = parentS3Client({ region: 'us-east-1', endpoint: `http://127.0.0.1:${(server.address() as AddressInfo).port}`, timeoutMs: 300, credentials: s3.credentials })
    clients.push(client)
    try {
      const started = Date.now()
      await expect(openS3BlobStore({ client, bucket: BUCKET, prefix })).rejects.toThrow(/S3 blob store: ListObjectsV2 .* failed/)
      expect(Date.now() - started).toBeLessThan(5_000)
    } finally {
      server.closeAllConnections()
      server.close()
    }
  }

  it('fails, rather than hangs, against an endpoint that accepts connections and never answers', async () => {
    await expectOpenFailsFastAgainst(createServer(() => {}))
  })

  it('fails, rather than hangs, against an endpoint that sends the head of its answer and then stops', async () => {
    // The head of a 200 and a little of its body, then nothing: a relay that held back the rest.
    await expectOpenFailsFastAgainst(
      createServer((request, response) => {
        request.resume()
        response.writeHead(200, { 'content-type': 'application/xml', 'content-length': '4096' })
        response.write('<?xml version="1.0" encoding="UTF-8"?><ListBucketResult>')
      }),
    )
  })

  it('rejects bad options at open', async () => {
    await expect(openS3BlobStore({ client: newClient(), bucket: '' })).rejects.toThrow(TypeError)
    await expect(openS3BlobStore({ client: newClient(), bucket: BUCKET, listConcurrency: 0 })).rejects.toThrow(RangeError)
    await expect(openS3BlobStore({ client: newClient(), bucket: BUCKET, listPageSize: 1001 })).rejects.toThrow(RangeError)
  })
})
