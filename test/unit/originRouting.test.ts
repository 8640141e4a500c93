import { randomUUID } from 'node:crypto'
import { mkdtempSync, rmSync } from 'node:fs'
import { connect, createServer as createNetServer, type AddressInfo, type Socket } from 'node:net'
import { tmpdir } from 'node:os'
import path from 'node:path'
import { setFlagsFromString } from 'node:v8'
import { runInNewContext } from 'node:vm'
import { KMSClient } from '@aws-sdk/client-kms'
import { bytesToHex, hexToBytes, recoverAddress, serializeSignature, type Hex } from 'viem'
import { generatePrivateKey, privateKeyToAddress, publicKeyToAddress } from 'viem/accounts'
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest'
import type { StreamAddress } from '../../enclave-origin/config.js'
import { developmentAttestation, KmsDataKeys } from '../../enclave-origin/enclave/dataKey.js'
import { DeliveredCredentials } from '../../enclave-origin/enclave/deliveredCredentials.js'
import { SignEngine } from '../../enclave-origin/enclave/engine.js'
import { KeyCache } from '../../enclave-origin/enclave/keyCache.js'
import { EnclaveService, serveEnclave } from '../../enclave-origin/enclave/server.js'
import { openDiskBlobStore, type DiskBlobStore } from '../../enclave-origin/parent/diskBlobStore.js'
import { HashRing } from '../../enclave-origin/parent/hashRing.js'
import { originMetrics } from '../../enclave-origin/parent/metrics.js'
import { EnclaveUnavailableError } from '../../enclave-origin/parent/enclavePool.js'
import { KeyTurnTimeoutError, NeedsUnlockError, OriginParent, OriginRequestError, OverloadedError, type KeyInfo } from '../../enclave-origin/parent/origin.js'
import type { BlobStore } from '../../enclave-origin/parent/blobStore.js'
import type { SealedKeyRecord } from '../../enclave-origin/types.js'
import { secp256k1 } from '../../enclave-origin/enclave/nativeSecp256k1.js'
import { connectStream } from '../../enclave-origin/protocol/connectStream.js'
import { encodeFrame, FrameDecoder, opcodes, statuses, type Frame } from '../../enclave-origin/protocol/frames.js'
import { decodeSetStateRequest, encodeErrorMessage, encodeNeedsUnlock, encodeSignResponse, encodeUnlockResponse, sequenceEpochSize } from '../../enclave-origin/protocol/messages.js'
import { SealingError, unsealPrivateKey } from '../../enclave-origin/enclave/sealing.js'
import { startLocalKms, type LocalKms } from '../support/kmsServer.js'
import { freePort } from '../support/localHttp.js'

/**
 * The parent in front of two enclaves, one on a Unix socket and one on TCP,
 * each a real enclave service with its own key cache and signing thread, the
 * data key from the local KMS server: every key lives in the enclave the hash
 * ring names, and signs there. Also the DEK rotation across both, and the
 * credentials the parent delivers to them.
 */

let kms: LocalKms
let directory: string
let store: DiskBlobStore
let parent: OriginParent
type StartedEnclave = Awaited<ReturnType<typeof startEnclave>>
const enclaves: StartedEnclave[] = []
let addresses: Array<{ id: string; address: StreamAddress }>
let kmsKeyId: string

beforeAll(async () => {
  kms = await startLocalKms({ port: 0 })
  kmsKeyId = kms.createSymmetricKey()
  directory = mkdtempSync(path.join(tmpdir(), 'origin-routing-'))
  addresses = [
    { id: 'enclave-unix', address: { path: path.join(directory, 'enclave.sock') } },
    { id: 'enclave-tcp', address: { host: '127.0.0.1', port: await freePort() } },
  ]
  for (const { id, address } of addresses) enclaves.push(await startEnclave({ id, address }))
  store = await openDiskBlobStore({ directory: path.join(directory, 'store') })
  parent = new OriginParent({ enclaves: addresses, poolSize: 2, store, requestTimeoutMs: 2_000, credentials: async () => kms.credentials })
  await parent.start()
})

/** A real enclave service listening on `address`, with its own key cache and signing thread, and KMS through the local server. */
async function startEnclave({ id, address }: { id: string; address: StreamAddress }) {
  // Only the credentials the parent delivers: the enclave has none of its own.
  const credentials = new DeliveredCredentials()
  const client = new KMSClient({ endpoint: kms.url, region: kms.credentials.region, credentials: credentials.provider, maxAttempts: 1 })
  const dataKeys = new KmsDataKeys({ client, kmsKeyId, attestation: developmentAttestation })
  const engine = new SignEngine({ threads: 1 })
  await engine.start()
  let service: EnclaveService | undefined
  const cache = new KeyCache({ now: Date.now, unlock: () => service!.unwrapLastDataKeys() })
  service = new EnclaveService({ cache, engine, dataKeys, kmsKeyId, credentials, attestation: developmentAttestation })
  const { close } = await serveEnclave({ service, address, log: () => {} })
  const stop = async () => {
    await close()
    await engine.stop()
  }
  return { id, address, cache, service, credentials, stop }
}

/**
 * A TCP relay to `target` that can be cut (its connections dropped, new ones
 * closed at once: an enclave alive but out of the parent's reach), stalled
 * (connections taken, nothing passed on: a hung enclave) and restored.
 * `framesFromParent` lists the frames that reached it from the parent's
 * side, passed on or not; `refused` counts the connections it
 * closed at once while cut. `holdNextUnlockAnswer` keeps the enclave's next
 * UNLOCK answer from the parent until a NEEDS_UNLOCK answer has gone past it.
 */
async function relay(target: { host: string; port: number }) {
  let mode: 'open' | 'cut' | 'stalled' = 'open'
  const framesFromParent: Frame[] = []
  let refused = 0
  let unlockAnswer: { wanted: boolean; held?: { frame: Frame; to: Socket }; holding?: () => void } = { wanted: false }
  let answerHeld: { opcode: number; holding: (release: () => void) => void } | undefined
  /** SIGN answers pass this late (0: at once), as from an enclave that is slow to sign but alive. */
  let signDelayMs = 0
  /** The parent's next request of this opcode is not passed on: the relay answers it with `status` (INTERNAL) itself, `afterMs` later. */
  let failNext: { opcode: number; afterMs: number; status: number } | undefined
  const fromEnclave = (frame: Frame, to: Socket) => {
    if (signDelayMs > 0 && frame.opcode === opcodes.SIGN) return void setTimeout(() => to.writable && to.write(encodeFrame(frame)), signDelayMs)
    if (answerHeld && frame.opcode === answerHeld.opcode) {
      const { holding } = answerHeld
      answerHeld = undefined
      return holding(() => to.write(encodeFrame(frame)))
    }
    if (unlockAnswer.wanted && !unlockAnswer.held && frame.opcode === opcodes.UNLOCK) {
      unlockAnswer.held = { frame, to }
      return unlockAnswer.holding?.()
    }
    to.write(encodeFrame(frame))
    const held = unlockAnswer.held
    if (held && frame.status === statuses.NEEDS_UNLOCK) {
      unlockAnswer = { wanted: false }
      // A little later, so that the parent has read the NEEDS_UNLOCK (on whichever connection) first.
      setTimeout(() => held.to.write(encodeFrame(held.frame)), 20)
    }
  }
  const sockets = new Set<Socket>()
  const track = (socket: Socket) => {
    sockets.add(socket)
    socket.on('error', () => {}).on('close', () => sockets.delete(socket))
  }
  const server = createNetServer((client) => {
    if (mode === 'cut') {
      refused++
      return void client.destroy()
    }
    track(client)
    const frames = new FrameDecoder()
    client.on('data', (chunk: Buffer) => {
      const decoded = frames.push(chunk)
      framesFromParent.push(...decoded)
      if (mode !== 'open') return
      const failing = failNext && decoded.find((frame) => frame.opcode === failNext!.opcode)
      if (!failing) return void upstream?.write(chunk)
      const { afterMs, status } = failNext!
      failNext = undefined
      for (const frame of decoded) if (frame !== failing) upstream?.write(encodeFrame(frame))
      setTimeout(() => client.write(encodeFrame({ ...failing, status, payload: encodeErrorMessage('the relay failed this request') })), afterMs)
    })
    const upstream = mode === 'open' ? connect(target.port, target.host) : undefined
    if (upstream) {
      track(upstream)
      const answers = new FrameDecoder()
      upstream.on('data', (chunk: Buffer) => {
        try {
          answers.push(chunk).forEach((frame) => fromEnclave(frame, client))
        } catch {
          upstream.destroy()
          client.destroy()
        }
      })
      // As a pipe would: the enclave's end of a connection ends the parent's.
      upstream.on('end', () => client.end())
    }
  })
  await new Promise<void>((listening) => server.listen(0, '127.0.0.1', listening))
  const dropAll = () => sockets.forEach((socket) => socket.destroy())
  return {
    address: { host: '127.0.0.1', port: (server.address() as AddressInfo).port },
    framesFromParent,
    get refused() {
      return refused
    },
    cut: () => {
      mode = 'cut'
      dropAll()
    },
    stall: () => {
      mode = 'stalled'
    },
    delaySignAnswers: (ms: number) => {
      signDelayMs = ms
    },
    failNextRequest: (opcode: number, afterMs = 0, status: number = statuses.INTERNAL) => {
      failNext = { opcode, afterMs, status }
    },
    restore: () => {
      mode = 'open'
      dropAll()
    },
    /** Resolves, once it holds the enclave's next answer of this opcode, with what passes it on. */
    holdNextAnswer: (opcode: number = opcodes.SIGN) =>
      new Promise<() => void>((holding) => {
        answerHeld = { opcode, holding }
      }),
    /** Resolves once it holds one. */
    holdNextUnlockAnswer: () =>
      new Promise<void>((holding) => {
        unlockAnswer = { wanted: true, holding }
      }),
    close: () => {
      dropAll()
      return new Promise((closed) => server.close(closed))
    },
  }
}

/** An enclave stand-in on TCP that answers each frame as `script` says, or not at all. */
async function scriptedEnclave(script: (frame: Frame, answer: (status: number, payload: Uint8Array) => void) => void): Promise<{ address: { host: string; port: number }; close(): void }> {
  const server = createNetServer((socket) => {
    const decoder = new FrameDecoder()
    socket.on('error', () => {})
    socket.on('data', (chunk: Buffer) => {
      for (const frame of decoder.push(chunk)) script(frame, (status, payload) => socket.write(encodeFrame({ requestId: frame.requestId, opcode: frame.opcode, status, payload })))
    })
  })
  await new Promise<void>((listening) => server.listen(0, '127.0.0.1', listening))
  return { address: { host: '127.0.0.1', port: (server.address() as AddressInfo).port }, close: () => server.close() }
}

/** An enclave stand-in that unlocks, but answers every LOAD NEEDS_UNLOCK, as one that restarted since would; anything else OK, empty. */
const enclaveWantingUnlock = () =>
  scriptedEnclave((frame, answer) => {
    if (frame.opcode === opcodes.UNLOCK) answer(statuses.OK, encodeUnlockResponse({ wrappedDek: new Uint8Array(), sequenceFloor: 2 ** 32 }))
    else if (frame.opcode === opcodes.LOAD) answer(statuses.NEEDS_UNLOCK, encodeNeedsUnlock({ retryAfterMs: 100 }))
    else answer(statuses.OK, new Uint8Array())
  })

const digest = `0x${'cd'.repeat(32)}` as Hex

/** Keys created through `parent` until `enough` holds of them: at most 200, so a test whose routing goes wrong fails instead of spinning. */
async function keysUntil(parent: OriginParent, enough: (keys: KeyInfo[]) => boolean): Promise<KeyInfo[]> {
  const keys: KeyInfo[] = []
  while (!enough(keys)) {
    if (keys.length >= 200) throw new Error('200 keys created, and still not the set the test needs')
    keys.push(await parent.createKey())
  }
  return keys
}

/** The failover series `parent` has counted (it lists every pair and outcome, at 0 until counted). */
const counted = (parent: OriginParent) => parent.failovers().filter((series) => series.count > 0)

/** Signs `digest` with the key through `signer`, and checks that the signature recovers to the key's address. */
async function expectSignsAs(signer: OriginParent, key: { keyId: string; address: string }) {
  const { signature, recoveryId } = await signer.sign(key.keyId, Buffer.from(digest.slice(2), 'hex'))
  const recovered = await recoverAddress({ hash: digest, signature: serializeSignature({ r: `0x${signature.slice(2, 66)}`, s: `0x${signature.slice(66)}`, yParity: recoveryId }) })
  expect(recovered).toBe(key.address)
}

// Tests unlock the shared enclaves through parents of their own, which closes the shared parent's epoch there: each
// test starts with one of its own, as a running parent would have.
afterEach(async () => {
  await parent.unlock()
})

afterAll(async () => {
  parent?.close()
  await store?.close()
  for (const enclave of enclaves) await enclave.stop()
  await kms?.stop()
  rmSync(directory, { recursive: true, force: true })
})

describe('OriginParent with several enclaves', () => {
  it('creates each key in the enclave the hash ring picks, over a Unix socket and TCP alike, and signs it there', async () => {
    const keys = await Promise.all(Array.from({ length: 40 }, () => parent.createKey()))
    const ring = new HashRing(enclaves.map((enclave) => ({ id: enclave.id, node: enclave })))
    const perEnclave = new Map<string, number>()
    for (const key of keys) {
      const owner = ring.nodeFor(key.keyId)
      perEnclave.set(owner.id, (perEnclave.get(owner.id) ?? 0) + 1)
      expect(owner.cache.get(key.keyId)).toBeDefined()
      for (const other of enclaves.filter((enclave) => enclave !== owner)) expect(other.cache.get(key.keyId)).toBeUndefined()
    }
    expect([...perEnclave.keys()].sort()).toEqual(['enclave-tcp', 'enclave-unix'])

    for (const key of keys.slice(0, 10)) await expectSignsAs(parent, key)
  })
})

/** Another parent in front of the same enclaves and store. */
const newParent = (options: Partial<ConstructorParameters<typeof OriginParent>[0]> = {}) =>
  new OriginParent({ enclaves: addresses, poolSize: 1, store, requestTimeoutMs: 2_000, credentials: async () => kms.credentials, ...options })

describe('AWS credentials for the enclaves\u2019 KMS calls', () => {
  it('reach every enclave before its unlock, and again every refresh period', async () => {
    let deliveries = 0
    // A session token that changes with every call to the provider shows which delivery an enclave holds.
    const refreshing = newParent({ credentials: async () => ({ ...kms.credentials, sessionToken: `token-${++deliveries}` }), credentialRefreshMs: 50 })
    try {
      await refreshing.start()
      const held = () => Promise.all(enclaves.map(async (enclave) => Number((await enclave.credentials.provider()).sessionToken!.slice('token-'.length))))
      expect(Math.min(...(await held()))).toBeGreaterThan(0)
      const before = deliveries
      await new Promise((resolve) => setTimeout(resolve, 300))
      expect(deliveries).toBeGreaterThanOrEqual(before + 2 * enclaves.length)
      // Each holds one of the latest round's, and its KMS calls sign with them.
      for (const token of await held()) expect(token).toBeGreaterThan(before)
      await refreshing.unlock()
    } finally {
      refreshing.close()
    }
  })

  it('an unlock whose credentials never come fails after the request timeout, and does not hold the next one', async () => {
    let calls = 0
    const hanging = newParent({ requestTimeoutMs: 200, credentials: () => (++calls === 1 ? new Promise(() => {}) : Promise.resolve(kms.credentials)) })
    try {
      await expect(hanging.unlock(), 'the first').rejects.toThrow('no AWS credentials to give the enclave: getting AWS credentials took longer than 200 ms')
      await hanging.unlock()
    } finally {
      hanging.close()
    }
  })

  it('NEEDS_UNLOCK answers while unlocks fail start them with a backoff, not back to back', async () => {
    let credentialCalls = 0
    let roleGone = false
    const failing = newParent({ credentials: () => (credentialCalls++, roleGone ? Promise.reject(new Error('no instance role')) : Promise.resolve(kms.credentials)) })
    await parent.createKey()
    try {
      await failing.start()
      roleGone = true
      const key = await parent.createKey()
      // Both enclaves lose their keys and DEKs: every sign is answered NEEDS_UNLOCK.
      enclaves.forEach((enclave) => {
        enclave.cache.clear()
        enclave.service.clear()
      })
      const before = credentialCalls
      for (let i = 0; i < 10; i++) {
        await expect(failing.sign(key.keyId, Buffer.alloc(32, 1))).rejects.toThrow(NeedsUnlockError)
        await new Promise((resolve) => setTimeout(resolve, 5))
      }
      // The first answer starts one unlock, which fails; the rest fall within its backoff.
      expect(credentialCalls - before).toBe(1)
    } finally {
      failing.close()
      await parent.unlock()
    }
  })

  it('an unlock that succeeds, whoever asked for it, clears the NEEDS_UNLOCK backoff', async () => {
    let failing = false
    let credentialCalls = 0
    const flaky = newParent({ credentials: () => (credentialCalls++, failing ? Promise.reject(new Error('no instance role')) : Promise.resolve(kms.credentials)) })
    const loseKeysAndDeks = () =>
      enclaves.forEach((enclave) => {
        enclave.cache.clear()
        enclave.service.clear()
      })
    try {
      await flaky.start()
      const key = await flaky.createKey()
      failing = true
      loseKeysAndDeks()
      await expect(flaky.sign(key.keyId, Buffer.alloc(32, 1))).rejects.toThrow(NeedsUnlockError)
      await new Promise((resolve) => setTimeout(resolve, 20))
      // That unlock failed: the parent now holds the next back. An operator's unlock succeeds.
      failing = false
      await flaky.unlock()
      loseKeysAndDeks()
      const before = credentialCalls
      await expect(flaky.sign(key.keyId, Buffer.alloc(32, 1))).rejects.toThrow(NeedsUnlockError)
      await new Promise((resolve) => setTimeout(resolve, 20))
      expect(credentialCalls).toBeGreaterThan(before)
    } finally {
      flaky.close()
      await parent.unlock()
    }
  })

  it('an unlock without credentials to give fails, saying so', async () => {
    const without = newParent({ credentials: () => Promise.reject(new Error('no instance role')) })
    try {
      await expect(without.unlock()).rejects.toThrow('no AWS credentials to give the enclave: no instance role')
    } finally {
      without.close()
    }
  })

  it('an enclave asked for KMS before any delivery says why it cannot', async () => {
    await expect(new DeliveredCredentials().provider()).rejects.toThrow('no AWS credentials yet: the parent delivers them before its first UNLOCK')
  })
})

describe('reloads into an enclave that lost its keys', () => {
  it('are shared: concurrent signs of one key read its record once', async () => {
    const key = await parent.createKey()
    let reads = 0
    const counting: BlobStore = Object.assign(Object.create(store) as BlobStore, {
      get: (keyId: string) => {
        if (keyId === key.keyId) reads++
        return store.get(keyId)
      },
    })
    const signer = newParent({ store: counting })
    try {
      await signer.unlock()
      for (const enclave of enclaves) enclave.cache.clear()
      await signer.unlock()
      await Promise.all(Array.from({ length: 20 }, () => signer.sign(key.keyId, Buffer.alloc(32, 7))))
      expect(reads).toBe(1)
    } finally {
      signer.close()
    }
  })
})

describe('an enclave that restarts while its keys load', () => {
  it('is left out of service (not every key logged as not loaded): a lone one, and start refuses', async () => {
    const scripted = await enclaveWantingUnlock()
    const records = ['a', 'b', 'c'].map((keyId) => ({ keyId, version: 1, state: 'active' as const, publicKey: new Uint8Array(65).fill(4), sealed: new Uint8Array(60) }))
    const logged: Array<Record<string, unknown>> = []
    const lone = new OriginParent({
      enclaves: [{ id: 'restarting', address: scripted.address }],
      poolSize: 1,
      store: storeWith({ list: async function* () { yield* records } }),
      requestTimeoutMs: 1_000,
      credentials: async () => kms.credentials,
      log: (fields) => logged.push(fields),
    })
    try {
      await expect(lone.start()).rejects.toThrow('no enclave could be started: restarting: the key needs an unlock; retry shortly')
      expect(logged.filter((line) => line.event === 'key_not_loaded')).toEqual([])
      expect(logged).toContainEqual(expect.objectContaining({ event: 'enclave_not_started', enclave: 'restarting' }))
    } finally {
      lone.close()
      scripted.close()
    }
  })
})

describe('a reload its enclave did not answer', () => {
  it('is made again before the key is next used there, as the LOAD may not have landed', async () => {
    // A scripted enclave: SIGN first finds no key, the LOAD that follows goes unanswered; after that it answers all.
    const seen: string[] = []
    let signs = 0
    let loads = 0
    const scripted = await scriptedEnclave((frame, answer) => {
      if (frame.opcode === opcodes.SIGN) {
        seen.push('SIGN')
        if (++signs === 1) answer(statuses.NOT_FOUND, encodeErrorMessage('no key k'))
        else answer(statuses.OK, encodeSignResponse({ signature: new Uint8Array(64).fill(1), recoveryId: 0, enclaveMicros: 10 }))
      } else if (frame.opcode === opcodes.LOAD) {
        seen.push('LOAD')
        if (++loads > 1) answer(statuses.OK, new Uint8Array())
      }
    })
    const record = { keyId: 'k', version: 1, state: 'active' as const, publicKey: new Uint8Array(65).fill(4), sealed: new Uint8Array(60) }
    const lone = new OriginParent({
      enclaves: [{ id: 'scripted', address: scripted.address }],
      poolSize: 1,
      store: storeWith({ get: async (keyId) => (keyId === 'k' ? record : undefined) }),
      requestTimeoutMs: 1_000,
      credentials: async () => kms.credentials,
    })
    try {
      await expect(lone.sign('k', Buffer.alloc(32, 5))).rejects.toThrow('did not answer within 1000 ms')
      // The pool drops the connection that fell silent, in a turn of its own.
      await new Promise((resolve) => setTimeout(resolve, 20))
      // The only enclave, held back or not, is tried; the key is reloaded before it signs.
      await lone.sign('k', Buffer.alloc(32, 5))
      expect(seen).toEqual(['SIGN', 'LOAD', 'LOAD', 'SIGN'])
    } finally {
      lone.close()
      scripted.close()
    }
  })
})

it('leaves no timer behind when it fails to start: no LOGS poll, no credential delivery, for a parent that never served', async () => {
  const asked: number[] = []
  const enclave = await scriptedEnclave((frame) => void asked.push(frame.opcode))
  const failingStore = { getWrappedDek: () => Promise.reject(new Error('the store is down')) } as unknown as BlobStore
  const failed = new OriginParent({ enclaves: [{ id: 'never', address: enclave.address }], poolSize: 1, store: failingStore, requestTimeoutMs: 200, credentials: async () => kms.credentials, log: () => {}, logPollMs: 10, credentialRefreshMs: 10 })
  try {
    await expect(failed.start()).rejects.toThrow('the store is down')
    await new Promise((resolve) => setTimeout(resolve, 200))
    expect(asked).toEqual([])
  } finally {
    failed.close()
    enclave.close()
  }
})

describe('LOAD and SET_STATE sequences', () => {
  /**
   * An enclave of its own behind a relay that records the parent's frames, and a store of its own; `stop` ends all
   * three. `parentOf` makes a parent of that enclave, through the relay, on that store.
   */
  async function cabledEnclave({ id, storeName }: { id: string; storeName: string }) {
    const own = { id, address: { host: '127.0.0.1', port: await freePort() } }
    const enclave = await startEnclave(own)
    const cable = await relay(own.address)
    const ownStore = await openDiskBlobStore({ directory: path.join(directory, storeName) })
    const parentOf = (options: Partial<ConstructorParameters<typeof OriginParent>[0]> = {}) =>
      new OriginParent({ enclaves: [{ id, address: cable.address }], poolSize: 1, store: ownStore, requestTimeoutMs: 1_000, credentials: async () => kms.credentials, ...options })
    const stop = async () => {
      await cable.close()
      await ownStore.close()
      await enclave.stop()
    }
    return { own, enclave, cable, ownStore, parentOf, stop }
  }

  /**
   * A started parent of an enclave of its own behind a relay (see cabledEnclave), for `test`; all of it stopped
   * after. `options` for the parent, or a function of the cabled enclave that makes them.
   */
  async function withCabledParent(
    id: string,
    options: ParentOptions | ((cabled: CabledEnclave) => ParentOptions),
    test: (context: CabledEnclave & { parent: OriginParent }) => Promise<void>,
  ) {
    const cabled = await cabledEnclave({ id, storeName: `${id}-store` })
    const parent = cabled.parentOf(typeof options === 'function' ? options(cabled) : options)
    try {
      await parent.start()
      await test({ ...cabled, parent })
    } finally {
      parent.close()
      await cabled.stop()
    }
  }
  type CabledEnclave = Awaited<ReturnType<typeof cabledEnclave>>

  /** `frame` sent to the enclave at `address` again, on a connection of its own (as it would land late); its answer. */
  async function deliverAgain(address: StreamAddress, frame: Frame): Promise<Frame> {
    const socket = await connectStream(address)
    try {
      const decoder = new FrameDecoder()
      const answered = new Promise<Frame>((resolve) => socket.on('data', (chunk: Buffer) => decoder.push(chunk).forEach(resolve)))
      socket.write(encodeFrame(frame))
      return await answered
    } finally {
      socket.destroy()
    }
  }

  it('a state change given up on that lands after a newer one changes nothing, from this parent or the one before the next', async () => {
    const { own, enclave, cable, parentOf: cabledParent, stop } = await cabledEnclave({ id: 'sequenced', storeName: 'sequence-store' })
    const logged: Array<Record<string, unknown>> = []
    // Backoffs on a clock that stands still: the hold after a timeout lasts for the rest of the test.
    const parentOf = () => cabledParent({ monotonicNow: () => 0, log: (fields) => logged.push(fields) })
    const first = parentOf()
    let second: OriginParent | undefined
    const lastSetState = () => cable.framesFromParent.filter((frame) => frame.opcode === opcodes.SET_STATE).at(-1)!
    try {
      await first.start()
      const key = await first.createKey()
      await first.setState(key.keyId, 'frozen')
      await first.setState(key.keyId, 'active')
      const unfreeze = lastSetState()
      await first.setState(key.keyId, 'frozen')
      // The unfreeze again, after the freeze: as one the parent had given up on would land.
      const late = await deliverAgain(own.address, unfreeze)
      expect(late.status).toBe(statuses.STALE)
      expect(enclave.cache.get(key.keyId)?.record.state).toBe('frozen')
      await expect(first.sign(key.keyId, Buffer.alloc(32, 3))).rejects.toThrow(`key ${key.keyId} is frozen`)

      // An unfreeze that never got through (a hung link), then a freeze (deferred: the timeout held the enclave back);
      // then the next parent starts, and loads the key frozen.
      cable.stall()
      await first.setState(key.keyId, 'active')
      const lost = lastSetState()
      cable.restore()
      await first.setState(key.keyId, 'frozen')
      expect(logged.filter((line) => line.event === 'state_change_deferred').map((line) => [line.state, line.error])).toEqual([
        ['active', 'the enclave did not answer within 1000 ms'],
        ['frozen', `enclave ${own.id} is held back after failing requests`],
      ])
      first.close()
      second = parentOf()
      await second.start()
      expect(enclave.cache.get(key.keyId)?.record.state).toBe('frozen')
      // The lost one lands now, of an epoch the next parent's unlock closed: its sender would have to unlock first.
      expect((await deliverAgain(own.address, lost)).status).toBe(statuses.NEEDS_UNLOCK)
      expect(enclave.cache.get(key.keyId)?.record.state).toBe('frozen')
      await expect(second.sign(key.keyId, Buffer.alloc(32, 3))).rejects.toThrow(`key ${key.keyId} is frozen`)
      await second.setState(key.keyId, 'active')
      await expectSignsAs(second, key)
    } finally {
      first.close()
      second?.close()
      await stop()
    }
  })

  it('asks an enclave for its log lines at every poll, none while it is held back (each ask would open a connection), and again once a request finds it back', async () => {
    let now = 0
    // This test's enclave keeps no log lines: each LOGS is answered with a refusal, which is an answer all the same.
    const options = { log: () => {}, logPollMs: 10, requestTimeoutMs: 200, monotonicNow: () => now }
    await withCabledParent('logs', options, async ({ parent, cable }) => {
      const logsSent = () => cable.framesFromParent.filter((frame) => frame.opcode === opcodes.LOGS).length
      const pause = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms))
      await pause(100)
      expect(logsSent()).toBeGreaterThan(3)
      const key = await parent.createKey()
      // Out of reach: its connection dropped, new ones refused. The first failure starts a hold, which lasts (the clock stands still).
      cable.cut()
      for (let i = 0; i < 50 && !(await parent.health())[0]!.held; i++) await pause(10)
      const refusedWhenHeld = cable.refused
      await pause(200)
      expect(cable.refused).toBe(refusedWhenHeld)
      // Past the hold: one probe, which fails and starts the next.
      now += 1_000
      await pause(100)
      expect(cable.refused).toBe(refusedWhenHeld + 1)
      // Back: a sign (a lone enclave is tried even while held back) ends the outage, and the polls go on at once.
      cable.restore()
      await parent.sign(key.keyId, Buffer.alloc(32, 9))
      const sentWhenBack = logsSent()
      await pause(100)
      expect(logsSent()).toBeGreaterThan(sentWhenBack + 3)
    })
  })

  it('refuses signs, gets and creates for an enclave with as many requests in flight as it may, before sending them, and still takes a state change and a health check', async () => {
    await withCabledParent('full', { maxInflightPerEnclave: 1 }, async ({ parent, cable }) => {
      const [key, other] = [await parent.createKey(), await parent.createKey()]
      const holding = cable.holdNextAnswer()
      const digest = Buffer.alloc(32, 10)
      const signing = parent.sign(key.keyId, digest)
      const release = await holding
      const sent = cable.framesFromParent.length
      for (const refused of [parent.sign(other.keyId, digest), parent.getKey(other.keyId), parent.createKey()]) {
        const error = await refused.catch((error: unknown) => error)
        expect(error).toBeInstanceOf(OverloadedError)
        expect((error as OverloadedError).retryAfterMs).toBeGreaterThanOrEqual(100)
        expect((error as OverloadedError).retryAfterMs).toBeLessThan(300)
      }
      expect(cable.framesFromParent.length).toBe(sent)
      // An operator's request and a health check are never refused for load.
      await parent.setState(other.keyId, 'frozen')
      expect(await parent.health()).toMatchObject([{ id: 'full', answered: true, inflight: 1 }])
      release()
      const signed = await signing
      expect(await recoverAddress({ hash: `0x${digest.toString('hex')}`, signature: serializeSignature({ r: `0x${signed.signature.slice(2, 66)}`, s: `0x${signed.signature.slice(66)}`, yParity: signed.recoveryId }) })).toBe(key.address)
      // Its place is free again, and after a request that fails too.
      await expectSignsAs(parent, key)
      await expect(parent.sign('no-such-key', digest)).rejects.toMatchObject({ kind: 'not-found' })
      await expectSignsAs(parent, key)
    })
  })

  it('answers a create only once its sealed record is durable in the store, and not at all when the store fails it', async () => {
    let releasePut: (() => void) | undefined
    let failPut = false
    const slowStoreOver = (ownStore: BlobStore) =>
      storeWith(
        {
          put: async (record) => {
            if (failPut) throw new Error('the disk is full')
            await new Promise<void>((resolve) => (releasePut = resolve))
            return ownStore.put(record)
          },
        },
        ownStore,
      )
    await withCabledParent('durable', (cabled) => ({ store: slowStoreOver(cabled.ownStore) }), async ({ parent, ownStore }) => {
      let answered = false
      const creating = parent.createKey().then((key) => {
        answered = true
        return key
      })
      await expect.poll(() => releasePut).toBeDefined()
      await new Promise((resolve) => setTimeout(resolve, 100))
      expect(answered).toBe(false)
      releasePut!()
      const key = await creating
      expect((await ownStore.get(key.keyId))?.publicKey).toEqual(hexToBytes(key.publicKey))
      failPut = true
      await expect(parent.createKey()).rejects.toThrow('the disk is full')
    })
  })

  /** `withCabledParent` over a `hangingStore`, with `storeTimeoutMs`, and what the parent logs. */
  function withHangingStore(id: string, storeTimeoutMs: number, test: (context: CabledEnclave & { parent: OriginParent; control: ReturnType<typeof hangingStore>['control']; logged: Array<Record<string, unknown>> }) => Promise<void>) {
    let control: ReturnType<typeof hangingStore>['control'] | undefined
    const logged: Array<Record<string, unknown>> = []
    const options = (cabled: CabledEnclave) => {
      const hanging = hangingStore(cabled.ownStore)
      control = hanging.control
      return { store: hanging.store, storeTimeoutMs, log: (fields: Record<string, unknown>) => logged.push(fields) }
    }
    return withCabledParent(id, options, (context) => test({ ...context, control: control!, logged }))
  }
  const unconfirmed = (what: string, ms: number) => ({ kind: 'unavailable', message: `${what} was not confirmed durable within ${ms} ms; it may still take effect` })
  // A create's answer names its key, which may yet exist: no route lists keys.
  const createUnconfirmed = (ms: number) => ({ kind: 'unavailable', message: expect.stringMatching(new RegExp(`^the record of new key [0-9a-f-]{36} was not confirmed durable within ${ms} ms; it may still take effect$`)) })
  async function storedRecords(store: BlobStore) {
    const all = []
    for await (const record of store.list()) all.push(record)
    return all
  }

  it('answers a create or state change the store does not confirm in time 503 at once, while the write goes on, lands in order and is logged, and the store reads as not ok meanwhile', async () => {
    await withHangingStore('hung-store', 300, async ({ parent, ownStore, enclave, control, logged }) => {
      const key = await parent.createKey()
      control.hang = true
      const started = performance.now()
      await expect(parent.createKey()).rejects.toMatchObject(createUnconfirmed(300))
      await expect(parent.setState(key.keyId, 'frozen')).rejects.toMatchObject(unconfirmed(`the change of key ${key.keyId} to frozen`, 300))
      // The unfreeze waits for its turn behind the freeze's write, which still holds it.
      await expect(parent.setState(key.keyId, 'active')).rejects.toMatchObject(unconfirmed(`the change of key ${key.keyId} to active`, 300))
      expect(performance.now() - started).toBeLessThan(3_000)
      expect(logged.filter((line) => line.event === 'store_not_confirmed')).toHaveLength(3)
      expect(control.pending).toHaveLength(2)
      expect(parent.storeHealth()).toEqual({ ok: false, error: '3 creates or state changes were not confirmed durable within 300 ms and are still waiting for the store' })
      expect(await storedRecords(ownStore)).toHaveLength(1)
      control.hang = false
      // The new key's write fails after all; the freeze lands, then the unfreeze, in the key's turn.
      const [create, freeze] = control.pending.splice(0)
      create!.fail(new Error('the disk is full'))
      freeze!.release()
      await expect.poll(() => parent.storeHealth()).toEqual({ ok: true })
      expect(await storedRecords(ownStore)).toHaveLength(1)
      expect((await ownStore.get(key.keyId))?.state).toBe('active')
      expect(enclave.cache.get(key.keyId)?.record.state).toBe('active')
      expect(logged.filter((line) => line.event === 'store_write_failed_late' || line.event === 'store_confirmed_late').map(({ event, what, error }) => [event, what, error])).toEqual([
        ['store_write_failed_late', expect.stringMatching(/^the record of new key [0-9a-f-]{36}$/), 'the disk is full'],
        ['store_confirmed_late', `the change of key ${key.keyId} to frozen`, undefined],
        ['store_confirmed_late', `the change of key ${key.keyId} to active`, undefined],
      ])
      await expectSignsAs(parent, key)
    })
  })

  it('refuses a create at once, sending no CREATE, while writes the store did not confirm in time are still out, and creates again once they settle', async () => {
    // A store timeout far above any pause of a busy machine, so "at once" and "after the timeout" cannot be confused.
    await withHangingStore('hung-creates', 1_000, async ({ parent, cable, control }) => {
      control.hang = true
      await expect(parent.createKey()).rejects.toMatchObject(createUnconfirmed(1_000))
      const creates = () => cable.framesFromParent.filter((frame) => frame.opcode === opcodes.CREATE).length
      const sent = creates()
      const started = performance.now()
      await expect(parent.createKey()).rejects.toMatchObject({ kind: 'unavailable', message: 'no key is created while the store has not confirmed earlier writes (1 still waiting after 1000 ms)' })
      expect(performance.now() - started).toBeLessThan(500)
      expect(creates()).toBe(sent)
      control.releaseAll()
      await expect.poll(() => parent.storeHealth()).toEqual({ ok: true })
      await expectSignsAs(parent, await parent.createKey())
    })
  })

  it('counts a create\u2019s store time from its write: an enclave slow to make the key is no store that does not confirm', async () => {
    await withHangingStore('slow-create', 200, async ({ parent, cable, ownStore, logged }) => {
      const holding = cable.holdNextAnswer(opcodes.CREATE)
      const creating = parent.createKey()
      const release = await holding
      await new Promise((resolve) => setTimeout(resolve, 400))
      release()
      const key = await creating
      expect((await ownStore.get(key.keyId))?.state).toBe('active')
      expect(logged.filter((line) => line.event === 'store_not_confirmed')).toEqual([])
      expect(parent.storeHealth()).toEqual({ ok: true })
    })
  })

  it('a rotation waits for the record of a create already answered 503, which lands under the new data key too and signs', async () => {
    await withHangingStore('late-create', 200, async ({ parent, ownStore, control, logged }) => {
      control.hang = true
      await expect(parent.createKey()).rejects.toMatchObject(createUnconfirmed(200))
      control.hang = false
      let rotated = false
      const rotating = parent.rotateDataKey().then((result) => {
        rotated = true
        return result
      })
      await new Promise((resolve) => setTimeout(resolve, 300))
      expect(rotated).toBe(false)
      control.releaseAll()
      expect(await rotating).toEqual({ resealed: 1 })
      const [record] = await storedRecords(ownStore)
      expect(record!.version).toBe(2)
      expect(logged).toContainEqual(expect.objectContaining({ event: 'store_confirmed_late', what: `the record of new key ${record!.keyId}`, keyId: record!.keyId }))
      await expectSignsAs(parent, { keyId: record!.keyId, address: publicKeyToAddress(bytesToHex(record!.publicKey)) })
    })
  })

  it('a rotation waits for a store read slower than the request timeout, within the store timeout, and finishes', async () => {
    let slowReads = false
    const slowStoreOver = (ownStore: BlobStore) =>
      storeWith({ get: async (keyId) => (slowReads ? new Promise((resolve) => setTimeout(resolve, 1_300)).then(() => ownStore.get(keyId)) : ownStore.get(keyId)) }, ownStore)
    await withCabledParent('slow-read', (cabled) => ({ store: slowStoreOver(cabled.ownStore), requestTimeoutMs: 1_000 }), async ({ parent }) => {
      const key = await parent.createKey()
      slowReads = true
      expect(await parent.rotateDataKey()).toEqual({ resealed: 1 })
      slowReads = false
      await expectSignsAs(parent, key)
    })
  })

  it('fails a rotation whose re-seal the enclave answers NOT_FOUND as a rotation that did not finish, not as a 404 of the caller\u2019s, and the next call resumes it', async () => {
    await withCabledParent('lost-reseal', {}, async ({ parent, cable }) => {
      const key = await parent.createKey()
      cable.failNextRequest(opcodes.RESEAL, 0, statuses.NOT_FOUND)
      const failed = await parent.rotateDataKey().catch((error: unknown) => error)
      expect(failed).not.toBeInstanceOf(OriginRequestError)
      expect((failed as Error).message).toBe(`key ${key.keyId} was not re-sealed (the relay failed this request); rotate again to resume`)
      expect(await parent.rotateDataKey()).toEqual({ resealed: 1 })
      await expectSignsAs(parent, key)
    })
  })

  it('refuses a sign for a full enclave before reloading its key there', async () => {
    await withCabledParent('full-reload', { maxInflightPerEnclave: 1 }, async ({ parent, cable }) => {
      const [key, other] = [await parent.createKey(), await parent.createKey()]
      // A freeze the enclave failed, then an unfreeze: active in the store, and reloaded before the key's next use.
      cable.failNextRequest(opcodes.SET_STATE)
      await parent.setState(key.keyId, 'frozen')
      await parent.setState(key.keyId, 'active')
      const holding = cable.holdNextAnswer()
      const signing = parent.sign(other.keyId, Buffer.alloc(32, 16))
      const release = await holding
      const loads = () => cable.framesFromParent.filter((frame) => frame.opcode === opcodes.LOAD).length
      const before = loads()
      await expect(parent.sign(key.keyId, Buffer.alloc(32, 17))).rejects.toBeInstanceOf(OverloadedError)
      expect(loads()).toBe(before)
      release()
      await signing
      // With its place back, the key reloads and signs.
      await expectSignsAs(parent, key)
      expect(loads()).toBe(before + 1)
    })
  })

  it('counts only signs, gets and creates toward the limit: a health check the enclave has not answered takes no place', async () => {
    await withCabledParent('checked', { maxInflightPerEnclave: 1 }, async ({ parent, cable }) => {
      const key = await parent.createKey()
      // The HEALTH goes unanswered for 500 ms: a frame out on the pool all that time.
      cable.failNextRequest(opcodes.HEALTH, 500)
      const checking = parent.health()
      await expect.poll(() => cable.framesFromParent.filter((frame) => frame.opcode === opcodes.HEALTH).length).toBe(1)
      await expectSignsAs(parent, key)
      expect(await checking).toMatchObject([{ id: 'checked', answered: false }])
    })
  })

  it('shares one health check among the callers that ask while it is out', async () => {
    await withCabledParent('probed', {}, async ({ parent, cable }) => {
      const healthChecks = () => cable.framesFromParent.filter((frame) => frame.opcode === opcodes.HEALTH).length
      const before = healthChecks()
      const answers = await Promise.all(Array.from({ length: 20 }, () => parent.health()))
      expect(answers.every((answer) => answer === answers[0])).toBe(true)
      expect(healthChecks()).toBe(before + 1)
      await parent.health()
      expect(healthChecks()).toBe(before + 2)
    })
  })

  it('a state change its enclave answers with a failure is in force all the same: answered, logged, and the key reloaded before its next use, even by a sign made meanwhile', async () => {
    const logged: Array<Record<string, unknown>> = []
    await withCabledParent('failing-set-state', { log: (fields) => logged.push(fields) }, async ({ parent, enclave, cable }) => {
      const setStates = () => cable.framesFromParent.filter((frame) => frame.opcode === opcodes.SET_STATE).length
      const key = await parent.createKey()
      await expectSignsAs(parent, key)
      // The SET_STATE never reaches the enclave, which keeps the key active; its failure comes back 300 ms later.
      cable.failNextRequest(opcodes.SET_STATE, 300)
      const before = setStates()
      const freezing = parent.setState(key.keyId, 'frozen')
      await expect.poll(setStates).toBe(before + 1)
      // A sign while the freeze is out: it must not reach the enclave before the key's new state does.
      const signing = parent.sign(key.keyId, Buffer.alloc(32, 8))
      await freezing
      expect(logged).toContainEqual(expect.objectContaining({ event: 'state_change_deferred', keyId: key.keyId, state: 'frozen', error: 'enclave error: the relay failed this request' }))
      await expect(signing).rejects.toThrow(`key ${key.keyId} is frozen`)
      expect(enclave.cache.get(key.keyId)?.record.state).toBe('frozen')
      await expect(parent.sign(key.keyId, Buffer.alloc(32, 9))).rejects.toThrow(`key ${key.keyId} is frozen`)
    })
  })

  it('after an enclave restart, the parent has the new process open its epoch above the sequences it used: a request numbered before the restart cannot undo a later one', async () => {
    const { own, enclave, cable, ownStore, parentOf, stop } = await cabledEnclave({ id: 'restarting', storeName: 'restart-sequence-store' })
    // The shared data key, so that start unlocks once (a new store's first start makes a data key with an UNLOCK of its own).
    await ownStore.putWrappedDek((await store.getWrappedDek())!, await ownStore.getWrappedDek())
    const numbering = parentOf()
    try {
      await numbering.start()
      const key = await numbering.createKey()
      await numbering.setState(key.keyId, 'frozen')
      await numbering.setState(key.keyId, 'active')
      const unfreeze = cable.framesFromParent.filter((frame) => frame.opcode === opcodes.SET_STATE).at(-1)!
      // The enclave restarts: no keys, no DEK, no epoch. The freeze finds it so and is deferred; the unlock that starts
      // is its first, and would open the floor this parent numbered from before, were it not asked for one above.
      enclave.cache.clear()
      enclave.service.clear()
      await numbering.setState(key.keyId, 'frozen')
      const signError = () => numbering.sign(key.keyId, Buffer.alloc(32, 5)).then(() => 'signed', (error: Error) => error.message)
      await expect.poll(signError, { timeout: 5_000, interval: 50 }).toBe(`key ${key.keyId} is frozen`)
      expect(cable.framesFromParent.filter((frame) => frame.opcode === opcodes.UNLOCK)).toHaveLength(2)
      // The unfreeze, numbered before the restart, reaches the new process only now: below the epoch it opened for this parent.
      expect((await deliverAgain(own.address, unfreeze)).status).toBe(statuses.NEEDS_UNLOCK)
      expect(enclave.cache.get(key.keyId)?.record.state).toBe('frozen')
    } finally {
      numbering.close()
      await stop()
    }
  })

  it('a state change answered NEEDS_UNLOCK by the epoch its own parent\u2019s UNLOCK opened, before that answer is read, goes again in the new epoch and applies', async () => {
    const { enclave, cable, parentOf, stop } = await cabledEnclave({ id: 'racing', storeName: 'race-sequence-store' })
    const logged: Array<Record<string, unknown>> = []
    const racing = parentOf({ poolSize: 2, requestTimeoutMs: 2_000, log: (fields) => logged.push(fields) })
    const setStates = () => cable.framesFromParent.filter((frame) => frame.opcode === opcodes.SET_STATE).map((frame) => decodeSetStateRequest(frame.payload))
    let unlocking: Promise<void> | undefined
    try {
      await racing.start()
      const key = await racing.createKey()
      const unlocks = () => cable.framesFromParent.filter((frame) => frame.opcode === opcodes.UNLOCK).length
      const unlocksBefore = unlocks()
      // The enclave takes an operator's unlock and opens its next epoch; the parent does not hear of it yet.
      const held = cable.holdNextUnlockAnswer()
      unlocking = racing.unlock()
      await held
      await racing.setState(key.keyId, 'frozen')
      await unlocking
      const [first, again] = setStates()
      expect(setStates()).toHaveLength(2)
      // The first, numbered in the epoch before, was answered NEEDS_UNLOCK; the second is in the one the held UNLOCK opened.
      expect(Math.floor(again!.sequence / sequenceEpochSize)).toBe(Math.floor(first!.sequence / sequenceEpochSize) + 1)
      expect(logged.filter((line) => line.event === 'state_change_deferred')).toEqual([])
      expect(enclave.cache.get(key.keyId)?.record.state).toBe('frozen')
      // The operator's UNLOCK was the only one sent.
      expect(unlocks()).toBe(unlocksBefore + 1)
    } finally {
      await unlocking?.catch(() => {})
      racing.close()
      await stop()
    }
  })

  it('a state change numbered in an epoch another UNLOCK closed is deferred, in force though the enclave still holds the key active, and reaches it after an unlock', async () => {
    let failing = false
    const flaky = newParent({ credentials: () => (failing ? Promise.reject(new Error('no instance role')) : Promise.resolve(kms.credentials)) })
    try {
      await flaky.start()
      const key = await flaky.createKey()
      const owner = enclaves.find((enclave) => enclave.cache.get(key.keyId))!
      // Another parent's UNLOCK reaches the enclave: the epoch this parent numbers in is closed. Its own unlock cannot run.
      const other = newParent()
      try {
        await other.unlock()
      } finally {
        other.close()
      }
      failing = true
      await flaky.setState(key.keyId, 'frozen')
      expect(owner.cache.get(key.keyId)?.record.state).toBe('active')
      // The key is reloaded before it signs, which waits for an unlock: it does not sign with the state the enclave holds.
      await expect(flaky.sign(key.keyId, Buffer.alloc(32, 2))).rejects.toThrow(NeedsUnlockError)
      failing = false
      const signError = () => flaky.sign(key.keyId, Buffer.alloc(32, 2)).then(() => 'signed', (error: Error) => error.message)
      await expect.poll(signError, { timeout: 5_000, interval: 100 }).toBe(`key ${key.keyId} is frozen`)
      expect(owner.cache.get(key.keyId)?.record.state).toBe('frozen')
    } finally {
      flaky.close()
      await parent.unlock()
    }
  })
})

/**
 * `base` (the shared store by default) as another parent would use it, with some of its methods replaced
 * (failures, losses, hangs); each call runs on `base` itself, and close leaves it open.
 */
/**
 * A store over `base` whose puts and state changes wait, while `control.hang` is set, until the test settles
 * them (`pending`); `releaseAll` stops the hanging and lets every waiting write through.
 */
function hangingStore(base: BlobStore) {
  const control = {
    hang: false,
    pending: [] as Array<{ release: () => void; fail: (error: Error) => void }>,
    releaseAll: () => {
      control.hang = false
      control.pending.splice(0).forEach(({ release }) => release())
    },
  }
  const held = <T>(write: () => Promise<T>) => (control.hang ? new Promise<void>((release, fail) => control.pending.push({ release, fail })).then(write) : write())
  const store = storeWith({ put: (record) => held(() => base.put(record)), setState: (keyId, state) => held(() => base.setState(keyId, state)) }, base)
  return { store, control }
}

type ParentOptions = Partial<ConstructorParameters<typeof OriginParent>[0]>

function storeWith(overrides: Partial<BlobStore>, base: BlobStore = store): BlobStore {
  return {
    put: (record) => base.put(record),
    get: (keyId) => base.get(keyId),
    list: () => base.list(),
    setState: (keyId, state) => base.setState(keyId, state),
    putWrappedDek: (dek, replacing) => base.putWrappedDek(dek, replacing),
    getWrappedDek: () => base.getWrappedDek(),
    close: async () => {},
    ...overrides,
  }
}

describe('DEK rotation', () => {
  async function storedRecords() {
    const records = []
    for await (const record of store.list()) records.push(record)
    return records
  }
  /** What a restart of both enclaves leaves: no keys, no DEK, no wrapped DEK to unwrap again on their own. */
  const restartEnclaves = () =>
    enclaves.forEach((enclave) => {
      enclave.cache.clear()
      enclave.service.clear()
    })
  /**
   * Starts a parent over `failing` and runs `rotate` with it; expects that nothing it left behind rejected
   * unhandled (which would end a parent), then restarts the enclaves and unlocks them with the shared parent.
   */
  async function rotateLeavingNoUnhandledRejection(failing: BlobStore, rotate: (rotating: OriginParent) => Promise<void>) {
    const rotating = newParent({ store: failing })
    const unhandled: unknown[] = []
    const onUnhandled = (reason: unknown) => unhandled.push(reason)
    process.on('unhandledRejection', onUnhandled)
    try {
      await rotating.start()
      await rotate(rotating)
      await new Promise((resolve) => setTimeout(resolve, 20))
      expect(unhandled).toEqual([])
    } finally {
      process.off('unhandledRejection', onUnhandled)
      rotating.close()
    }
    restartEnclaves()
    await parent.unlock()
  }

  it('re-seals every stored key one version up under a new DEK, which alone opens them after, while keys sign throughout', async () => {
    const keys = await Promise.all(Array.from({ length: 30 }, () => parent.createKey()))
    await parent.setState(keys[0]!.keyId, 'frozen')
    const before = (await store.getWrappedDek())!
    const versions = new Map((await storedRecords()).map((record) => [record.keyId, record.version]))

    const signing = Promise.all(keys.slice(1).map((key) => expectSignsAs(parent, key)))
    expect(await parent.rotateDataKey()).toEqual({ resealed: versions.size })
    await signing

    const after = (await store.getWrappedDek())!
    expect(after.retiring).toBeUndefined()
    expect(Buffer.from(after.ciphertext).equals(Buffer.from(before.ciphertext))).toBe(false)
    const records = await storedRecords()
    expect(records.map((record) => record.version)).toEqual(records.map((record) => versions.get(record.keyId)! + 1))
    expect((await store.get(keys[0]!.keyId))!.state).toBe('frozen')

    // The old DEK opens none of them any more; the new one opens all.
    // As the enclaves unwrap them: under their own KMS key id.
    const kmsKeys = new KmsDataKeys({ client: new KMSClient({ endpoint: kms.url, region: kms.credentials.region, credentials: kms.credentials }), kmsKeyId, attestation: developmentAttestation })
    const [oldDek, newDek] = (await Promise.all([before, after].map(({ ciphertext }) => kmsKeys.unwrap({ keyId: kmsKeyId, ciphertext })))) as [Uint8Array, Uint8Array]
    for (const { sealed, keyId, version } of records) {
      expect(() => unsealPrivateKey({ sealed, dek: oldDek, keyId, version })).toThrow(SealingError)
      expect(unsealPrivateKey({ sealed, dek: newDek, keyId, version })).toHaveLength(32)
    }

    // Both enclaves restart and a new parent starts: with the new DEK only, every key signs.
    restartEnclaves()
    const restarted = newParent()
    try {
      await restarted.start()
      for (const key of keys.slice(1)) await expectSignsAs(restarted, key)
    } finally {
      restarted.close()
    }
  })

  it('creates and state changes during a rotation: every key is re-sealed or made under the new DEK, and a frozen key stays frozen', async () => {
    const keys = await Promise.all(Array.from({ length: 20 }, () => parent.createKey()))
    const rotation = parent.rotateDataKey()
    const [created, , ,] = await Promise.all([
      Promise.all(Array.from({ length: 20 }, () => parent.createKey())),
      parent.setState(keys[0]!.keyId, 'frozen'),
      parent.setState(keys[1]!.keyId, 'frozen').then(() => parent.setState(keys[1]!.keyId, 'active')),
      rotation,
    ])
    expect((await store.getWrappedDek())!.retiring).toBeUndefined()
    expect((await store.get(keys[0]!.keyId))!.state).toBe('frozen')
    await expect(parent.sign(keys[0]!.keyId, Buffer.alloc(32, 1))).rejects.toThrow(/frozen/)

    restartEnclaves()
    const restarted = newParent()
    try {
      await restarted.start()
      for (const key of [...keys.slice(1), ...created]) await expectSignsAs(restarted, key)
      await expect(restarted.sign(keys[0]!.keyId, Buffer.alloc(32, 1))).rejects.toThrow(/frozen/)
    } finally {
      restarted.close()
    }
  })

  it('an enclave that restarts during a rotation is unlocked again and takes its keys: the rotation finishes', async () => {
    let restartAtNextList = false
    const rotating = new OriginParent({
      enclaves: addresses,
      poolSize: 1,
      store: storeWith({
        list: () => {
          // Step 3 lists the keys to re-seal, after step 2 unlocked every enclave: both restart right then.
          if (restartAtNextList) restartEnclaves()
          restartAtNextList = false
          return store.list()
        },
      }),
      requestTimeoutMs: 2_000,
      credentials: async () => kms.credentials,
    })
    try {
      await rotating.start()
      const keys = await Promise.all(Array.from({ length: 4 }, () => rotating.createKey()))
      const versions = await Promise.all(keys.map(async (key) => (await store.get(key.keyId))!.version))
      restartAtNextList = true
      await rotating.rotateDataKey()
      expect(restartAtNextList).toBe(false)
      for (const [index, key] of keys.entries()) {
        expect((await store.get(key.keyId))!.version).toBe(versions[index]! + 1)
        await expectSignsAs(rotating, key)
      }
    } finally {
      rotating.close()
      await parent.unlock()
    }
  })

  it('a rotation whose read of a key\u2019s record does not answer fails after the store timeout, and the next one resumes it', async () => {
    let readsHang = false
    const rotating = new OriginParent({
      enclaves: addresses,
      poolSize: 1,
      store: storeWith({ get: (keyId) => (readsHang ? new Promise(() => {}) : store.get(keyId)) }),
      storeTimeoutMs: 300,
      requestTimeoutMs: 2_000,
      credentials: async () => kms.credentials,
    })
    try {
      await rotating.start()
      const keys = await Promise.all(Array.from({ length: 4 }, () => rotating.createKey()))
      readsHang = true
      await expect(rotating.rotateDataKey()).rejects.toThrow(/^reading key [0-9a-f-]{36}'s stored record took longer than 300 ms$/)
      // Its first step is durable: the new data key, the old one retiring.
      expect((await store.getWrappedDek())!.retiring).toBeDefined()
      readsHang = false
      expect(await rotating.rotateDataKey()).toEqual({ resealed: expect.any(Number) })
      expect((await store.getWrappedDek())!.retiring).toBeUndefined()
      for (const key of keys) await expectSignsAs(rotating, key)
    } finally {
      rotating.close()
      await parent.unlock()
    }
  })

  it('a rotation whose listing of the store fails partway rejects once the reloads it started have ended, failed or not', async () => {
    await Promise.all(Array.from({ length: 4 }, () => parent.createKey()))
    // Counted from the rotation on: its re-seals read the first listing, its reloads (step 3b) the second.
    let listing = 0
    const failedReads: Array<Promise<void>> = []
    const failing = storeWith({
      // As an S3 listing whose next page will not come, while the reads it led to fail a little later.
      list: async function* () {
        const which = listing > 0 ? ++listing - 1 : 0
        let yielded = 0
        for await (const record of store.list()) {
          if (which === 2 && yielded++ === 2) throw new Error('the next page of keys did not come')
          yield record
        }
      },
      get: (keyId) => {
        if (listing < 3) return store.get(keyId)
        const read = new Promise<never>((_, reject) => setTimeout(() => reject(new Error('get timed out')), 50))
        failedReads.push(read.catch(() => {}))
        return read
      },
    })
    await rotateLeavingNoUnhandledRejection(failing, async (rotating) => {
      listing = 1
      await expect(rotating.rotateDataKey()).rejects.toThrow('the next page of keys did not come')
      // The two keys listed before the failure were being reloaded. Unawaited, their failures would come after the
      // rotation's answer, as unhandled rejections, which end a parent.
      await expect.poll(() => failedReads.length, { timeout: 5_000 }).toBe(2)
      await Promise.all(failedReads)
    })
  })

  it('a rotation whose reload fails while its listing waits for the next page fails the rotation, not the process', async () => {
    await Promise.all(Array.from({ length: 4 }, () => parent.createKey()))
    let listing = 0
    const failing = storeWith({
      // Step 3b's listing, as an S3 one: each record after a wait for its page, while the reloads it led to fail at once.
      list: async function* () {
        const which = listing > 0 ? ++listing - 1 : 0
        for await (const record of store.list()) {
          if (which === 2) await new Promise((resolve) => setTimeout(resolve, 30))
          yield record
        }
      },
      get: (keyId) => (listing < 3 ? store.get(keyId) : Promise.reject(new Error('get failed'))),
    })
    await rotateLeavingNoUnhandledRejection(failing, async (rotating) => {
      listing = 1
      await expect(rotating.rotateDataKey()).rejects.toThrow('get failed')
    })
  })

  it('an interrupted rotation loses nothing: every key signs with the store as it was left, and the next call finishes it', async () => {
    const keys = await Promise.all(Array.from({ length: 20 }, () => parent.createKey()))
    let putsLeft = 5
    const failing = storeWith({ put: (record) => (putsLeft-- > 0 ? store.put(record) : Promise.reject(new Error('disk full'))) })
    const crashing = newParent({ store: failing })
    try {
      await crashing.start()
      await expect(crashing.rotateDataKey()).rejects.toThrow('disk full')
    } finally {
      crashing.close()
    }
    const midway = (await store.getWrappedDek())!
    expect(midway.retiring).toBeDefined()

    restartEnclaves()
    const resumed = newParent()
    try {
      await resumed.start()
      // Five keys sealed under the new DEK, the rest still under the old one: all sign.
      for (const key of keys) await expectSignsAs(resumed, key)
      await resumed.rotateDataKey()
      // Finished with the DEK the interrupted call made, not another.
      expect(await store.getWrappedDek()).toEqual({ keyId: midway.keyId, ciphertext: midway.ciphertext })
      restartEnclaves()
      await resumed.unlock()
      for (const key of keys) await expectSignsAs(resumed, key)
    } finally {
      resumed.close()
    }
  })

  it('a stored record the wire cannot carry is logged at start, naming its key, which fails saying so while the others sign', async () => {
    const good = await parent.createKey()
    const cutShort = { keyId: 'cut-short', version: 1, state: 'active' as const, publicKey: new Uint8Array(65), sealed: new Uint8Array(59) }
    const damaged = storeWith({
      list: async function* () {
        yield cutShort
        yield (await store.get(good.keyId))!
      },
      get: async (keyId) => (keyId === cutShort.keyId ? cutShort : store.get(keyId)),
    })
    const logged: Array<Record<string, unknown>> = []
    const starting = newParent({ store: damaged, log: (fields) => logged.push(fields) })
    try {
      await starting.start()
      expect(logged).toContainEqual(expect.objectContaining({ level: 'error', event: 'key_not_loaded', keyId: 'cut-short', error: expect.stringContaining('key cut-short: its stored record cannot be loaded: LOAD sealed') }))
      await expect(starting.sign('cut-short', Buffer.alloc(32, 3))).rejects.toThrow('key cut-short: its stored record cannot be loaded: LOAD sealed')
      await expectSignsAs(starting, good)
    } finally {
      starting.close()
    }
  })

  it('a store that lost its wrapped DEK but holds keys: start refuses, and makes no new DEK that none of them would open', async () => {
    await parent.createKey()
    const deksPut: unknown[] = []
    const lostDek = storeWith({ putWrappedDek: async (dek) => void deksPut.push(dek), getWrappedDek: async () => undefined })
    const starting = newParent({ store: lostDek })
    try {
      await expect(starting.start()).rejects.toThrow(/holds sealed keys but no wrapped data key/)
      expect(deksPut).toEqual([])
    } finally {
      starting.close()
    }
  })
})

describe('a parent whose enclaves are not all up', () => {
  /** Two enclaves of their own, and a store of their own: the shared ones hold another DEK. */
  const spares = [
    { id: 'spare-up', address: { host: '127.0.0.1', port: 0 } },
    { id: 'spare-late', address: { host: '127.0.0.1', port: 0 } },
  ]
  beforeAll(async () => {
    for (const spare of spares) spare.address.port = await freePort()
  })
  const ownedBy = <Key extends { keyId: string }>(id: string, keys: Key[]) => keys.filter((key) => new HashRing(spares.map((spare) => ({ id: spare.id, node: spare.id }))).nodeFor(key.keyId) === id)

  /** Starts `parent` and creates keys until each spare owns one. */
  async function startWithKeyOnEach(parent: OriginParent) {
    await parent.start()
    const keys = await keysUntil(parent, (keys) => ownedBy('spare-up', keys).length >= 1 && ownedBy('spare-late', keys).length >= 1)
    return { onUp: ownedBy('spare-up', keys)[0], onLate: ownedBy('spare-late', keys)[0] }
  }

  /** Both spare enclaves, each behind a relay of its own, and a store of their own; `stop` ends them all, and the parents made here. */
  async function cabledSpares(storeName: string) {
    const up = await startEnclave(spares[0]!)
    const late = await startEnclave(spares[1]!)
    const [upCable, lateCable] = await Promise.all([relay(spares[0]!.address), relay(spares[1]!.address)])
    const ownStore = await openDiskBlobStore({ directory: path.join(directory, storeName) })
    const parents: OriginParent[] = []
    const stop = async () => {
      for (const parent of parents) parent.close()
      await Promise.all([upCable.close(), lateCable.close()])
      await ownStore.close()
      for (const enclave of [up, late]) await enclave.stop()
    }
    const enclaves = [
      { id: 'spare-up', address: upCable.address },
      { id: 'spare-late', address: lateCable.address },
    ]
    /** A parent over both relays whose backoffs run on a clock that stands still until `advance` moves it: holds last until the test ends them. */
    const stillClockParent = (store: BlobStore = ownStore, requestTimeoutMs = 300, storeTimeoutMs?: number) => {
      let now = 0
      const parent = new OriginParent({ enclaves, poolSize: 1, store, requestTimeoutMs, storeTimeoutMs, credentials: async () => kms.credentials, monotonicNow: () => now })
      parents.push(parent)
      const held = async (id: string) => (await parent.health()).find((enclave) => enclave.id === id)?.held
      return { parent, held, advance: (ms: number) => void (now += ms) }
    }
    return { up, late, upCable, lateCable, ownStore, enclaves, stillClockParent, stop }
  }

  it('starts with those it reaches, which sign for the others (and make new keys) until those come back, load, unlock and sign', async () => {
    const up = await startEnclave(spares[0]!)
    let late = await startEnclave(spares[1]!)
    const ownStore = await openDiskBlobStore({ directory: path.join(directory, 'spare-store') })
    const logged: Array<Record<string, unknown>> = []
    const parentOf = () => new OriginParent({ enclaves: spares, poolSize: 1, store: ownStore, requestTimeoutMs: 2_000, credentials: async () => kms.credentials, log: (fields) => logged.push(fields) })
    const first = parentOf()
    let second: OriginParent | undefined
    try {
      await first.start()
      const keys = await Promise.all(Array.from({ length: 20 }, () => first.createKey()))
      first.close()
      await late.stop()

      second = parentOf()
      await second.start()
      expect(logged).toContainEqual({ level: 'warn', event: 'enclave_not_started', enclave: 'spare-late', error: expect.stringContaining('cannot connect to the enclave') })
      for (const key of ownedBy('spare-up', keys)) await expectSignsAs(second, key)
      const [waiting, ...others] = ownedBy('spare-late', keys)
      // Meanwhile the other enclave signs for them, from their stored records; a state change made now holds there too.
      for (const key of [waiting!, ...others]) await expectSignsAs(second, key)
      expect(up.cache.get(waiting!.keyId)).toBeDefined()
      expect(logged).toContainEqual(expect.objectContaining({ level: 'warn', event: 'enclave_failover', enclave: 'spare-late', standby: 'spare-up', error: 'enclave spare-late is out of service until it has unlocked and loaded its keys' }))
      expect(logged).toContainEqual(expect.objectContaining({ level: 'warn', event: 'enclave_sync_failed', enclave: 'spare-late', error: expect.stringContaining('cannot connect to the enclave') }))
      expect(await originMetrics(second).text()).toMatch(new RegExp(`^origin_failovers_total\\{enclave="spare-late",standby="spare-up",outcome="served"\\} ${1 + others.length}$`, 'm'))
      await second.setState(waiting!.keyId, 'frozen')
      await expect(second.sign(waiting!.keyId, Buffer.alloc(32, 1))).rejects.toThrow(`key ${waiting!.keyId} is frozen`)
      // The standby took the sign and refused it: counted apart from what it served.
      expect(await originMetrics(second).text()).toMatch(/^origin_failovers_total\{enclave="spare-late",standby="spare-up",outcome="refused"\} 1$/m)
      expect(await second.getKey(waiting!.keyId)).toMatchObject({ address: waiting!.address, state: 'frozen' })
      await second.setState(waiting!.keyId, 'active')
      await expectSignsAs(second, waiting!)
      // New keys are made in the enclave that is up.
      const made = await Promise.all(Array.from({ length: 8 }, () => second!.createKey()))
      for (const key of made) expect(up.cache.get(key.keyId)).toBeDefined()

      late = await startEnclave(spares[1]!)
      // Back, it is out of service until unlocked and loaded: the next request starts that and is served elsewhere meanwhile.
      const synced = () => logged.some((line) => line.event === 'enclave_synced' && line.enclave === 'spare-late')
      await expect.poll(() => expectSignsAs(second!, waiting!).then(synced), { timeout: 5_000 }).toBe(true)
      for (const key of [waiting!, ...others]) expect(late.cache.get(key.keyId)).toBeDefined()
      const failedOver = (await originMetrics(second).text()).match(/^origin_failovers_total\{enclave="spare-late",standby="spare-up",outcome="served"\} (\d+)$/m)![1]
      for (const key of [waiting!, ...others]) await expectSignsAs(second, key)
      expect((await originMetrics(second).text()).match(/^origin_failovers_total\{enclave="spare-late",standby="spare-up",outcome="served"\} (\d+)$/m)![1]).toBe(failedOver)
      expect(logged.filter((line) => line.event === 'enclave_not_started')).toHaveLength(1)
    } finally {
      first.close()
      second?.close()
      await ownStore.close()
      for (const enclave of [up, late]) await enclave.stop()
    }
  })

  it('reads a store listing without holding the records it has yielded, and ends the store\u2019s listing when left early', async () => {
    setFlagsFromString('--expose-gc')
    const gc = runInNewContext('gc') as () => void
    const yielded: Array<WeakRef<SealedKeyRecord>> = []
    let listingsEnded = 0
    const listing = storeWith({
      list: async function* () {
        try {
          for (let i = 0; ; i++) {
            const record: SealedKeyRecord = { keyId: `key-${i}`, version: 1, state: 'active', publicKey: new Uint8Array(65), sealed: new Uint8Array(1_024) }
            yielded.push(new WeakRef(record))
            yield record
          }
        } finally {
          listingsEnded += 1
        }
      },
    })
    const parent = new OriginParent({ enclaves: [{ id: 'none', address: { host: '127.0.0.1', port: 1 } }], poolSize: 1, store: listing, requestTimeoutMs: 200, credentials: async () => kms.credentials })
    try {
      let read = 0
      for await (const _ of (parent as unknown as { storedRecords(): AsyncIterable<SealedKeyRecord> }).storedRecords()) {
        if (++read < 2_000) continue
        // Mid-listing: the records read so far are the caller's to keep or drop, not the listing's.
        await new Promise((resolve) => setTimeout(resolve, 10))
        gc()
        expect(yielded.slice(0, 1_990).filter((record) => record.deref() !== undefined).length).toBeLessThan(10)
        break
      }
      await expect.poll(() => listingsEnded).toBe(1)
    } finally {
      parent.close()
    }
  })

  /**
   * A key owned by an enclave that was down when a parent (`starting`) started and is back: out of service until it
   * syncs. `options` add to both parents' (the one that made the keys, then `starting`).
   */
  async function withReturningEnclave(storeName: string, options: (ownStore: BlobStore) => ParentOptions, test: (context: { starting: OriginParent; key: KeyInfo; up: StartedEnclave; late: StartedEnclave; logged: Array<Record<string, unknown>> }) => Promise<void>) {
    const up = await startEnclave(spares[0]!)
    let late = await startEnclave(spares[1]!)
    const ownStore = await openDiskBlobStore({ directory: path.join(directory, storeName) })
    const logged: Array<Record<string, unknown>> = []
    const parentOf = () => new OriginParent({ enclaves: spares, poolSize: 1, store: ownStore, requestTimeoutMs: 1_000, credentials: async () => kms.credentials, log: (fields) => logged.push(fields), ...options(ownStore) })
    const first = parentOf()
    const starting = parentOf()
    try {
      await first.start()
      const keys = await keysUntil(first, (keys) => ownedBy('spare-late', keys).length >= 1)
      const [key] = ownedBy('spare-late', keys)
      first.close()
      await late.stop()
      await starting.start()
      late = await startEnclave(spares[1]!)
      await test({ starting, key: key!, up, late, logged })
    } finally {
      first.close()
      starting.close()
      await ownStore.close()
      for (const enclave of [up, late]) await enclave.stop()
    }
  }
  const syncFailuresIn = (logged: Array<Record<string, unknown>>) => logged.filter((line) => line.event === 'enclave_sync_failed')

  it('a sync whose store listing stops answering fails after the store timeout and is tried again, rather than keep the enclave out of service for good', async () => {
    let listingHangs = false
    // Yields one record, then waits for ever while the listing hangs (an S3 page, a custom store, that never comes).
    const hanging = (ownStore: BlobStore) =>
      storeWith(
        {
          list: async function* () {
            for await (const record of ownStore.list()) {
              yield record
              if (listingHangs) await new Promise(() => {})
            }
          },
        },
        ownStore,
      )
    await withReturningEnclave('hung-listing-store', (ownStore) => ({ store: hanging(ownStore), storeTimeoutMs: 300 }), async ({ starting, key, late, logged }) => {
      listingHangs = true
      await expect.poll(() => expectSignsAs(starting, key).then(() => syncFailuresIn(logged).length), { timeout: 3_000 }).toBe(1)
      expect(syncFailuresIn(logged)).toEqual([expect.objectContaining({ enclave: 'spare-late', error: "reading the store's records took longer than 300 ms" })])
      listingHangs = false
      await expect.poll(() => expectSignsAs(starting, key).then(() => logged.some((line) => line.event === 'enclave_synced')), { timeout: 3_000 }).toBe(true)
      expect(late.cache.get(key.keyId)).toBeDefined()
    })
  })

  it('an enclave out of service whose sync fails is tried again after a backoff, not at every request', async () => {
    let credentialsFail = false
    const credentials = async () => {
      if (credentialsFail) throw new Error('the instance role is gone')
      return kms.credentials
    }
    await withReturningEnclave('backoff-store', () => ({ credentials }), async ({ starting, key, up, late, logged }) => {
      credentialsFail = true
      await expect.poll(() => expectSignsAs(starting, key).then(() => syncFailuresIn(logged).length)).toBe(1)
      expect(syncFailuresIn(logged)).toEqual([expect.objectContaining({ level: 'warn', enclave: 'spare-late', retryInMs: expect.any(Number), error: expect.stringContaining('the instance role is gone') })])
      // Within the backoff (at least 375 ms), more requests start no sync.
      await Promise.all(Array.from({ length: 5 }, () => expectSignsAs(starting, key)))
      expect(syncFailuresIn(logged)).toHaveLength(1)
      expect((await starting.health()).find((enclave) => enclave.id === 'spare-late')).toMatchObject({ answered: true, ok: false, error: expect.stringContaining('out of service') })
      // Reachable but out of service (it holds no DEK of this store yet): creates pass it over.
      const made = await Promise.all(Array.from({ length: 8 }, () => starting.createKey()))
      for (const made1 of made) expect(up.cache.get(made1.keyId)).toBeDefined()

      credentialsFail = false
      await expect.poll(() => expectSignsAs(starting, key).then(() => logged.some((line) => line.event === 'enclave_synced')), { timeout: 3_000 }).toBe(true)
      expect(late.cache.get(key.keyId)).toBeDefined()
    })
  })

  it('a hung enclave costs one request timeout per hold, not one per request; its keys sign elsewhere, and it is probed again after the hold', async () => {
    const up = await startEnclave(spares[0]!)
    const late = await startEnclave(spares[1]!)
    const cable = await relay(spares[1]!.address)
    const ownStore = await openDiskBlobStore({ directory: path.join(directory, 'hung-store') })
    const hanging = new OriginParent({ enclaves: [spares[0]!, { id: 'spare-late', address: cable.address }], poolSize: 2, store: ownStore, requestTimeoutMs: 300, credentials: async () => kms.credentials })
    try {
      await hanging.start()
      const keys = await keysUntil(hanging, (keys) => ownedBy('spare-late', keys).length >= 1)
      const [key] = ownedBy('spare-late', keys)
      await expectSignsAs(hanging, key!)
      // Like a preloaded account: held by every enclave, in no store.
      let accountId = randomUUID()
      while (ownedBy('spare-late', [{ keyId: accountId }]).length === 0) accountId = randomUUID()
      const accountKey = generatePrivateKey()
      for (const enclave of [up, late]) {
        const privateKey = Buffer.from(accountKey.slice(2), 'hex')
        enclave.cache.createKey({ keyId: accountId, publicKey: secp256k1.publicKeyCreate(privateKey, false), privateKey })
      }
      const account = { keyId: accountId, address: privateKeyToAddress(accountKey) }
      const ownerOnly = { keyId: randomUUID() }
      while (ownedBy('spare-late', [ownerOnly]).length === 0) ownerOnly.keyId = randomUUID()
      const ownerOnlyKey = Buffer.from(generatePrivateKey().slice(2), 'hex')
      late.cache.createKey({ keyId: ownerOnly.keyId, publicKey: secp256k1.publicKeyCreate(ownerOnlyKey, false), privateKey: ownerOnlyKey })

      cable.stall()
      const reaching = (opcode: number) => cable.framesFromParent.filter((sent) => sent.opcode === opcode).length
      // The first waits out the 300 ms timeout, then signs on the standby.
      await expectSignsAs(hanging, key!)
      const [signs, creates] = [reaching(opcodes.SIGN), reaching(opcodes.CREATE)]
      // During the hold (at least 375 ms) the others go there at once; so do creates, and the preloaded account.
      await Promise.all([
        ...Array.from({ length: 10 }, () => expectSignsAs(hanging, key!)),
        expectSignsAs(hanging, account),
        ...Array.from({ length: 6 }, async () => expect(up.cache.get((await hanging.createKey()).keyId)).toBeDefined()),
      ])
      expect([reaching(opcodes.SIGN) - signs, reaching(opcodes.CREATE) - creates]).toEqual([0, 0])

      // After the hold (at most 625 ms), one request at a time probes it; the others still go to the standby.
      await new Promise((resolve) => setTimeout(resolve, 700))
      const beforeProbe = reaching(opcodes.SIGN)
      await Promise.all(Array.from({ length: 10 }, () => expectSignsAs(hanging, key!)))
      expect(reaching(opcodes.SIGN) - beforeProbe).toBe(1)
      // A preloaded account the standby lacks (it has not loaded the file) is the owner's outage, not an unknown
      // key; it waits for the hold like the rest.
      const beforeOwnerOnly = reaching(opcodes.SIGN)
      await expect(hanging.sign(ownerOnly.keyId, Buffer.alloc(32, 6))).rejects.toThrow(EnclaveUnavailableError)
      expect(reaching(opcodes.SIGN)).toBe(beforeOwnerOnly)

      cable.restore()
      // A probe after the next hold finds it answering: its keys are its own again.
      const failovers = () => hanging.failovers().reduce((sum, series) => sum + (series.enclave === 'spare-late' ? series.count : 0), 0)
      const signedByItsOwn = async () => {
        const before = failovers()
        await expectSignsAs(hanging, key!)
        return failovers() === before
      }
      await expect.poll(signedByItsOwn, { timeout: 5_000 }).toBe(true)
      const settled = failovers()
      await Promise.all(Array.from({ length: 5 }, () => expectSignsAs(hanging, key!)))
      expect(failovers()).toBe(settled)
    } finally {
      hanging.close()
      await cable.close()
      await ownStore.close()
      for (const enclave of [up, late]) await enclave.stop()
    }
  })

  it('a standby that answers NEEDS_UNLOCK for the key is passed over for the next one', async () => {
    const up = await startEnclave(spares[0]!)
    const ownStore = await openDiskBlobStore({ directory: path.join(directory, 'standby-unlock-store') })
    const scripted = await enclaveWantingUnlock()
    const credentials = async () => kms.credentials
    const creator = new OriginParent({ enclaves: [spares[0]!], poolSize: 1, store: ownStore, requestTimeoutMs: 1_000, credentials })
    let three: OriginParent | undefined
    try {
      await creator.start()
      // Enclave ids that put the key's owner (nothing listens there) first on the ring, the scripted one next, spare-up last.
      // A key just before one of spare-up's points on the ring leaves the two other ids almost no room there (the test
      // failed so now and then): another key, then.
      let key: Awaited<ReturnType<OriginParent['createKey']>> | undefined
      let ids: [string, string] | undefined
      for (let keys = 0; !ids && keys < 20; keys++) {
        const candidateKey = await creator.createKey()
        for (let n = 0; !ids && n < 1_000; n++) {
          const candidate: [string, string] = [`gone-${n}`, `restarting-${n}`]
          const order = new HashRing([...candidate, 'spare-up'].map((id) => ({ id, node: id }))).nodesFor(candidateKey.keyId)
          if (order.join() === [...candidate, 'spare-up'].join()) [ids, key] = [candidate, candidateKey]
        }
      }
      creator.close()
      three = new OriginParent({
        enclaves: [{ id: ids![0], address: { host: '127.0.0.1', port: await freePort() } }, { id: ids![1], address: scripted.address }, spares[0]!],
        poolSize: 1,
        store: ownStore,
        requestTimeoutMs: 1_000,
        credentials,
      })
      await three.start()
      await expectSignsAs(three, key!)
      expect(counted(three)).toEqual([{ enclave: ids![0], standby: 'spare-up', outcome: 'served', count: 1 }])
    } finally {
      creator.close()
      three?.close()
      scripted.close()
      await ownStore.close()
      await up.stop()
    }
  })

  it.each(['alone', 'before a standby that loads the key but never answers its sign'] as const)(
    'a sign whose owner is out of reach and whose standby needs an unlock (%s) is answered NEEDS_UNLOCK with its retry-after, not unavailable',
    async (company) => {
      const up = await startEnclave(spares[0]!)
      const ownStore = await openDiskBlobStore({ directory: path.join(directory, `standby-unlock-${company === 'alone' ? 'alone' : 'then-silent'}`) })
      const scripted = await enclaveWantingUnlock()
      // Unlocks and loads, but never answers a SIGN: the request times out there.
      const silent = await scriptedEnclave((frame, answer) => {
        if (frame.opcode === opcodes.UNLOCK) answer(statuses.OK, encodeUnlockResponse({ wrappedDek: new Uint8Array(), sequenceFloor: 2 ** 32 }))
        else if (frame.opcode !== opcodes.SIGN) answer(statuses.OK, new Uint8Array())
      })
      const credentials = async () => kms.credentials
      const creator = new OriginParent({ enclaves: [spares[0]!], poolSize: 1, store: ownStore, requestTimeoutMs: 1_000, credentials })
      let parentOfThem: OriginParent | undefined
      try {
        await creator.start()
        const key = await creator.createKey()
        creator.close()
        // Enclave ids that put the key's owner (nothing listens there) first on the ring, the one wanting an unlock next.
        const names = (n: number) => (company === 'alone' ? [`gone-${n}`, `restarting-${n}`] : [`gone-${n}`, `restarting-${n}`, `silent-${n}`])
        let ids: string[] | undefined
        for (let n = 0; !ids && n < 1_000; n++) {
          const candidate = names(n)
          if (new HashRing(candidate.map((id) => ({ id, node: id }))).nodesFor(key.keyId).join() === candidate.join()) ids = candidate
        }
        const addresses = [{ host: '127.0.0.1', port: await freePort() }, scripted.address, silent.address]
        parentOfThem = new OriginParent({ enclaves: ids!.map((id, i) => ({ id, address: addresses[i]! })), poolSize: 1, store: ownStore, requestTimeoutMs: 1_000, credentials })
        await parentOfThem.start()
        const refused = await parentOfThem.sign(key.keyId, Buffer.from(digest.slice(2), 'hex')).catch((error: unknown) => error)
        expect(refused).toBeInstanceOf(NeedsUnlockError)
        expect((refused as NeedsUnlockError).retryAfterMs).toBe(100)
      } finally {
        creator.close()
        parentOfThem?.close()
        scripted.close()
        silent.close()
        await ownStore.close()
        await up.stop()
      }
    },
  )

  it('a state change for a key whose enclave is out of service is deferred at once, sent nowhere, and there after its sync', async () => {
    const { lateCable, late, ownStore, enclaves: cabled, stop } = await cabledSpares('unsynced-store')
    const logged: Array<Record<string, unknown>> = []
    const parentOf = () => new OriginParent({ enclaves: cabled, poolSize: 1, store: ownStore, requestTimeoutMs: 1_000, credentials: async () => kms.credentials, log: (fields) => logged.push(fields) })
    const first = parentOf()
    let second: OriginParent | undefined
    try {
      const { onLate } = await startWithKeyOnEach(first)
      first.close()
      // The next parent starts while spare-late is cut off: out of service, though it is back before the change.
      lateCable.cut()
      second = parentOf()
      await second.start()
      lateCable.restore()
      const reached = lateCable.framesFromParent.length
      await second.setState(onLate!.keyId, 'frozen')
      expect(lateCable.framesFromParent.length).toBe(reached)
      expect(logged).toContainEqual(expect.objectContaining({ event: 'state_change_deferred', keyId: onLate!.keyId, error: 'enclave spare-late is out of service' }))
      // A request for its keys starts its sync, which loads every key it owns from the store.
      const signError = () => second!.sign(onLate!.keyId, Buffer.alloc(32, 6)).then(() => 'signed', (error: Error) => error.message)
      await expect.poll(async () => (await signError(), logged.some((line) => line.event === 'enclave_synced')), { timeout: 5_000 }).toBe(true)
      expect(late.cache.get(onLate!.keyId)?.record.state).toBe('frozen')
      expect(await signError()).toBe(`key ${onLate!.keyId} is frozen`)
    } finally {
      first.close()
      second?.close()
      await stop()
    }
  })

  it('a state change that times out holds its enclave back like any request: the next is deferred at once', async () => {
    const { lateCable, stillClockParent, stop } = await cabledSpares('tracked-store')
    const { parent: changing } = stillClockParent()
    try {
      await changing.start()
      const [first, second] = ownedBy('spare-late', await keysUntil(changing, (keys) => ownedBy('spare-late', keys).length >= 2))
      lateCable.stall()
      await changing.setState(first!.keyId, 'frozen')
      const reached = lateCable.framesFromParent.length
      await changing.setState(second!.keyId, 'frozen')
      expect(lateCable.framesFromParent.length).toBe(reached)
    } finally {
      await stop()
    }
  })

  it('a state change for a key whose enclave is held back is deferred at once, sent nowhere, and in force where the key signs', async () => {
    const { upCable, lateCable, late, stillClockParent, stop } = await cabledSpares('deferred-store')
    const { parent: held, advance } = stillClockParent()
    try {
      const { onLate } = await startWithKeyOnEach(held)
      lateCable.stall()
      // Its first request waits out the timeout and holds it back; the clock stands still, so the hold lasts.
      await expectSignsAs(held, onLate!)
      const reached = lateCable.framesFromParent.length
      const setStatesToUp = () => upCable.framesFromParent.filter((frame) => frame.opcode === opcodes.SET_STATE).length
      const upBefore = setStatesToUp()
      await held.setState(onLate!.keyId, 'frozen')
      expect([lateCable.framesFromParent.length, setStatesToUp()]).toEqual([reached, upBefore])
      await expect(held.sign(onLate!.keyId, Buffer.alloc(32, 4))).rejects.toThrow(`key ${onLate!.keyId} is frozen`)
      // Back, and past its hold: the enclave, which holds the key active, gets the state before the key's next use there.
      expect(late.cache.get(onLate!.keyId)?.record.state).toBe('active')
      lateCable.restore()
      advance(60_000)
      await expect(held.sign(onLate!.keyId, Buffer.alloc(32, 4))).rejects.toThrow(`key ${onLate!.keyId} is frozen`)
      expect(late.cache.get(onLate!.keyId)?.record.state).toBe('frozen')
    } finally {
      await stop()
    }
  })

  it('a freeze that reaches the owner stops the signature a standby sends back after it', async () => {
    const { upCable, lateCable, stillClockParent, stop } = await cabledSpares('standby-sign-store')
    const { parent: held, advance } = stillClockParent(undefined, 1_000)
    try {
      const { onLate } = await startWithKeyOnEach(held)
      lateCable.stall()
      // Its first request waits out the timeout and holds spare-late back (the key signs on spare-up meanwhile).
      await expectSignsAs(held, onLate!)
      // The next goes to spare-up at once, and its signature is held there.
      const holding = upCable.holdNextAnswer()
      const signing = held.sign(onLate!.keyId, Buffer.alloc(32, 6))
      const release = await holding
      // spare-late is back, past its hold, and answers: the freeze reaches it.
      lateCable.restore()
      advance(60_000)
      expect((await held.health()).find((enclave) => enclave.id === 'spare-late')).toMatchObject({ answered: true, held: false })
      const setStates = lateCable.framesFromParent.filter((frame) => frame.opcode === opcodes.SET_STATE).length
      await held.setState(onLate!.keyId, 'frozen')
      expect(lateCable.framesFromParent.filter((frame) => frame.opcode === opcodes.SET_STATE).length).toBe(setStates + 1)
      release()
      await expect(signing).rejects.toThrow(`key ${onLate!.keyId} was frozen or archived while this signature was made`)
    } finally {
      await stop()
    }
  })

  it('a request out before its enclave\u2019s outage was counted does not lengthen the hold when it times out after it', async () => {
    const { lateCable, stillClockParent, stop } = await cabledSpares('hold-length-store')
    const { parent: held, advance } = stillClockParent(undefined, 1_000)
    const signsSent = () => lateCable.framesFromParent.filter((frame) => frame.opcode === opcodes.SIGN).length
    try {
      const { onLate } = await startWithKeyOnEach(held)
      const before = signsSent()
      // Slow to sign but alive: each signature comes after its request's timeout (1 s).
      lateCable.delaySignAnswers(1_500)
      const first = expectSignsAs(held, onLate!)
      await new Promise((resolve) => setTimeout(resolve, 300))
      // Also sent to spare-late: the first has not timed out yet, so nothing holds it back.
      const second = expectSignsAs(held, onLate!)
      // An answer on the connection in between, so that the first's timeout does not take the connection for a dead one.
      await new Promise((resolve) => setTimeout(resolve, 100))
      await held.health()
      // Both out there before the first times out: else this test would show nothing.
      expect(signsSent()).toBe(before + 2)
      // The first timed out, held spare-late back, and signed on spare-up.
      await first
      advance(60_000)
      // Past that hold, the second times out too: the same outage, not a second failure.
      await second
      const sent = signsSent()
      // Not held back: the next request is spare-late's probe.
      await expectSignsAs(held, onLate!)
      expect(signsSent()).toBe(sent + 1)
    } finally {
      await stop()
    }
  })

  it.each([
    { changes: ['frozen'] as const, storeName: 'deferred-sign-store' },
    // Active again by the time the signature comes back: it was made while the key was frozen all the same.
    { changes: ['frozen', 'active'] as const, storeName: 'refrozen-sign-store' },
  ])('a freeze deferred while a SIGN is out stops the signature that comes back after it (changes: $changes)', async ({ changes, storeName }) => {
    const { lateCable, stillClockParent, stop } = await cabledSpares(storeName)
    const { parent: held, advance } = stillClockParent(undefined, 1_000)
    try {
      const { onLate } = await startWithKeyOnEach(held)
      lateCable.stall()
      // Its first request waits out the timeout and holds spare-late back (the key signs on spare-up meanwhile).
      await expectSignsAs(held, onLate!)
      lateCable.restore()
      advance(60_000)
      // The hold is over: the next request is spare-late's probe, and while it is out the enclave counts as held back.
      const holding = lateCable.holdNextAnswer()
      const signing = held.sign(onLate!.keyId, Buffer.alloc(32, 5))
      const release = await holding
      const failovers = JSON.stringify(held.failovers())
      for (const state of changes) await held.setState(onLate!.keyId, state)
      release()
      await expect(signing).rejects.toThrow(`key ${onLate!.keyId} was frozen or archived while this signature was made`)
      // Refused by the parent's check of the signature that came back, not by a standby after a timeout.
      expect(JSON.stringify(held.failovers())).toBe(failovers)
    } finally {
      await stop()
    }
  })

  type Spares = Awaited<ReturnType<typeof cabledSpares>>
  type StartedSpares = Spares & { cabled: OriginParent; onUp: KeyInfo; onLate: KeyInfo; control: ReturnType<typeof hangingStore>['control'] }

  /**
   * `test` with a parent over both spares, started with a key on each: one connection per enclave, the spares'
   * store behind a `hangingStore` (its `control` in the context), and a long request timeout, so that nothing held
   * times out (and fails over) on a slow machine before the test is done; `options` (or what it makes of the
   * spares) over those.
   */
  async function withStartedSpares(storeName: string, options: ParentOptions | ((spares: Spares) => ParentOptions), test: (context: StartedSpares) => Promise<void>) {
    const spares = await cabledSpares(storeName)
    const hanging = hangingStore(spares.ownStore)
    const cabled = new OriginParent({
      enclaves: spares.enclaves,
      poolSize: 1,
      store: hanging.store,
      requestTimeoutMs: 10_000,
      credentials: async () => kms.credentials,
      ...(typeof options === 'function' ? options(spares) : options),
    })
    try {
      const { onUp, onLate } = await startWithKeyOnEach(cabled)
      await test({ ...spares, cabled, onUp: onUp!, onLate: onLate!, control: hanging.control })
    } finally {
      hanging.control.releaseAll()
      cabled.close()
      await spares.stop()
    }
  }

  /**
   * A parent over both spares that lets each serve one sign, get or create at a time, with `full`'s one place
   * taken by a sign its relay holds until `test` has run. Nothing may fail over meanwhile: a shed request is no outage.
   */
  function withSpareFull(storeName: string, full: 'spare-up' | 'spare-late', test: (context: StartedSpares) => Promise<void>) {
    return withStartedSpares(storeName, { maxInflightPerEnclave: 1 }, async (context) => {
      const holding = (full === 'spare-up' ? context.upCable : context.lateCable).holdNextAnswer()
      const signing = context.cabled.sign((full === 'spare-up' ? context.onUp : context.onLate).keyId, Buffer.alloc(32, 12))
      const release = await holding
      await test(context)
      expect(counted(context.cabled)).toEqual([])
      release()
      await signing
    })
  }

  it('a full enclave is passed over for creates, and sheds its own keys\u2019 signs while the other\u2019s sign on', () =>
    withSpareFull('full-spare-store', 'spare-late', async ({ cabled, onUp, onLate }) => {
      // One at a time, as spare-up too takes one request at a time here.
      const made: KeyInfo[] = []
      for (let i = 0; i < 10; i++) made.push(await cabled.createKey())
      expect(ownedBy('spare-up', made)).toHaveLength(10)
      await expect(cabled.sign(onLate.keyId, Buffer.alloc(32, 13))).rejects.toBeInstanceOf(OverloadedError)
      await expectSignsAs(cabled, onUp)
    }))

  it('a full standby is passed over before the key is loaded there, and a create with every enclave full or down is refused as overloaded', () =>
    withSpareFull('full-standby-store', 'spare-up', async ({ cabled, upCable, lateCable, onLate }) => {
      // spare-late drops out: its key's one standby, spare-up, is full.
      lateCable.cut()
      const loads = () => upCable.framesFromParent.filter((frame) => frame.opcode === opcodes.LOAD).length
      const before = loads()
      await expect(cabled.sign(onLate.keyId, Buffer.alloc(32, 15))).rejects.toBeInstanceOf(OverloadedError)
      expect(loads()).toBe(before)
      await expect(cabled.createKey()).rejects.toBeInstanceOf(OverloadedError)
    }))

  it('a failover\u2019s load takes one of the standby\u2019s places while it runs: the standby\u2019s own keys are shed meanwhile, not sent past its limit', () =>
    withStartedSpares('loading-standby-store', { maxInflightPerEnclave: 1 }, async ({ cabled, upCable, lateCable, onUp, onLate }) => {
      // spare-late drops out; its key loads on spare-up, whose answer to the LOAD is held.
      lateCable.cut()
      const holding = upCable.holdNextAnswer(opcodes.LOAD)
      const failingOver = cabled.sign(onLate.keyId, Buffer.alloc(32, 18))
      const release = await holding
      const signs = () => upCable.framesFromParent.filter((frame) => frame.opcode === opcodes.SIGN).length
      const before = signs()
      await expect(cabled.sign(onUp.keyId, Buffer.alloc(32, 19))).rejects.toBeInstanceOf(OverloadedError)
      expect(signs()).toBe(before)
      release()
      // The place passes on to the sign the load was for, which spare-up serves.
      await expect(failingOver).resolves.toMatchObject({ recoveryId: expect.any(Number) })
      expect(counted(cabled)).toEqual([{ enclave: 'spare-late', standby: 'spare-up', outcome: 'served', count: 1 }])
      await expectSignsAs(cabled, onUp)
    }))

  it('a failover sign that finds its key gone from the standby reloads it there in the place it holds: at the standby\u2019s last place, it signs', () =>
    withStartedSpares('reloading-standby-store', { maxInflightPerEnclave: 1 }, async ({ cabled, upCable, lateCable, onLate }) => {
      lateCable.cut()
      // Loaded on spare-up for this sign, the key is gone by the time its SIGN arrives (as after a restart there).
      upCable.failNextRequest(opcodes.SIGN, 0, statuses.NOT_FOUND)
      const loads = () => upCable.framesFromParent.filter((frame) => frame.opcode === opcodes.LOAD).length
      const before = loads()
      await expectSignsAs(cabled, onLate)
      expect(loads()).toBe(before + 2)
      expect(counted(cabled)).toEqual([{ enclave: 'spare-late', standby: 'spare-up', outcome: 'served', count: 1 }])
    }))

  it('counts a failover the standby fails (an internal error there, in its load of the key or its sign; UNAVAILABLE) as failed, apart from those it served', () =>
    withStartedSpares('failing-standby-store', {}, async ({ cabled, upCable, lateCable, onLate }) => {
      lateCable.cut()
      upCable.failNextRequest(opcodes.LOAD)
      await expect(cabled.sign(onLate.keyId, Buffer.alloc(32, 20))).rejects.toThrow()
      upCable.failNextRequest(opcodes.SIGN)
      await expect(cabled.sign(onLate.keyId, Buffer.alloc(32, 21))).rejects.toThrow()
      // UNAVAILABLE for a key the store holds is the standby unable to serve it, not a refusal of the key.
      upCable.failNextRequest(opcodes.SIGN, 0, statuses.UNAVAILABLE)
      await expect(cabled.sign(onLate.keyId, Buffer.alloc(32, 22))).rejects.toThrow()
      await expectSignsAs(cabled, onLate)
      expect(counted(cabled)).toEqual([
        { enclave: 'spare-late', standby: 'spare-up', outcome: 'served', count: 1 },
        { enclave: 'spare-late', standby: 'spare-up', outcome: 'failed', count: 3 },
      ])
    }))

  it('does not count a failover that fails on the parent\u2019s own part (its read of the key\u2019s record), which says nothing of the standby', () => {
    let readsFail = false
    const failingReads = (spares: Spares): ParentOptions => ({
      store: storeWith({ get: (keyId) => (readsFail ? Promise.reject(new Error('the store did not answer')) : spares.ownStore.get(keyId)) }, spares.ownStore),
    })
    return withStartedSpares('own-failure-store', failingReads, async ({ cabled, lateCable, onLate }) => {
      lateCable.cut()
      readsFail = true
      await expect(cabled.sign(onLate.keyId, Buffer.alloc(32, 23))).rejects.toThrow('the store did not answer')
      expect(counted(cabled)).toEqual([])
      readsFail = false
      await expectSignsAs(cabled, onLate)
      expect(counted(cabled)).toEqual([{ enclave: 'spare-late', standby: 'spare-up', outcome: 'served', count: 1 }])
    })
  })

  it('lists every pair\u2019s failover series at 0 from the start, in its own figures and on /metrics', async () => {
    const parent = new OriginParent({ enclaves: [...spares, { id: 'third', address: { host: '127.0.0.1', port: 1 } }], poolSize: 1, store, requestTimeoutMs: 200, credentials: async () => kms.credentials })
    try {
      expect(parent.failovers()).toHaveLength(3 * 2 * 3)
      expect(counted(parent)).toEqual([])
      const text = await originMetrics(parent).text()
      for (const [enclave, standby] of [['spare-up', 'third'], ['third', 'spare-late'], ['spare-late', 'spare-up']]) {
        for (const outcome of ['served', 'refused', 'failed']) {
          expect(text).toMatch(new RegExp(`^origin_failovers_total\\{enclave="${enclave}",standby="${standby}",outcome="${outcome}"\\} 0$`, 'm'))
        }
      }
      expect(text).not.toMatch(/^origin_failovers_total\{enclave="(\S+)",standby="\1"/m)
    } finally {
      parent.close()
    }
  })

  it('a sign that finds its key gone from the standby does not share the reload of a failover queued before it, whose LOAD the full standby refuses', () =>
    withStartedSpares('unshared-reload-store', { storeTimeoutMs: 200, maxInflightPerEnclave: 2 }, async ({ cabled, upCable, lateCable, onUp, onLate, control }) => {
      lateCable.cut()
      const signs = () => upCable.framesFromParent.filter((frame) => frame.opcode === opcodes.SIGN).length
      // A: loaded on spare-up, its SIGN there is answered NOT_FOUND 400 ms later (as after a restart), holding one of two places.
      upCable.failNextRequest(opcodes.SIGN, 400, statuses.NOT_FOUND)
      const before = signs()
      const a = cabled.sign(onLate.keyId, Buffer.alloc(32, 23))
      await expect.poll(signs).toBe(before + 1)
      // The key's turn is held by a change whose write hangs; B, a failover of the same key, queues its reload behind it.
      control.hang = true
      await expect(cabled.setState(onLate.keyId, 'active')).rejects.toMatchObject({ kind: 'unavailable' })
      const b = cabled.sign(onLate.keyId, Buffer.alloc(32, 24)).catch((error: unknown) => error)
      // C, a sign of spare-up's own key, takes the other place and is held there.
      const holding = upCable.holdNextAnswer()
      const c = cabled.sign(onUp.keyId, Buffer.alloc(32, 25))
      const releaseC = await holding
      // A's NOT_FOUND has come and its reload queued; the write lands, and B's reload (first in turn) finds spare-up full.
      await new Promise((resolve) => setTimeout(resolve, 500))
      control.releaseAll()
      expect(await b).toBeInstanceOf(OverloadedError)
      // A's reload is its own, in the place A holds: it signs.
      await expect(a).resolves.toMatchObject({ recoveryId: expect.any(Number) })
      releaseC()
      await c
    }))

  it('a failover sign waits for its key\u2019s turn, held by a state change whose write hangs, no longer than the request timeout, and holds no place on the standby meanwhile', () =>
    withStartedSpares('turn-store', { requestTimeoutMs: 500, storeTimeoutMs: 200, maxInflightPerEnclave: 1 }, async ({ cabled, lateCable, ownStore, onUp, onLate, control }) => {
      control.hang = true
      await expect(cabled.setState(onLate.keyId, 'frozen')).rejects.toMatchObject({ kind: 'unavailable' })
      lateCable.cut()
      const started = performance.now()
      const failingOver = cabled.sign(onLate.keyId, Buffer.alloc(32, 20)).catch((error: unknown) => error)
      // Once it is on spare-up (spare-late fails it at once), waiting for the key's turn, spare-up's one place is
      // free for its own keys.
      await new Promise((resolve) => setTimeout(resolve, 150))
      await expectSignsAs(cabled, onUp)
      const refusal = await failingOver
      expect(refusal).toBeInstanceOf(KeyTurnTimeoutError)
      expect((refusal as Error).message).toBe(`waiting for key ${onLate.keyId}'s turn (a change of its state is still under way) took longer than 500 ms`)
      expect(performance.now() - started).toBeLessThan(2_000)
      // Once the freeze's write lands, the key loads on spare-up as the store has it: frozen.
      control.releaseAll()
      await expect.poll(async () => (await ownStore.get(onLate.keyId))?.state).toBe('frozen')
      await expect(cabled.sign(onLate.keyId, Buffer.alloc(32, 21))).rejects.toThrow(`key ${onLate.keyId} is frozen`)
    }))

  it('a failover sign whose key\u2019s record the store does not give within the request timeout fails then (not the longer store timeout), and holds no turn of the key', () => {
    let readsHang = false
    const hangingReads = ({ ownStore }: Spares) => ({
      store: storeWith({ get: (keyId) => (readsHang ? new Promise<never>(() => {}) : ownStore.get(keyId)) }, ownStore),
      requestTimeoutMs: 300,
      storeTimeoutMs: 10_000,
    })
    return withStartedSpares('hung-read-store', hangingReads, async ({ cabled, lateCable, onLate }) => {
      lateCable.cut()
      readsHang = true
      await expect(cabled.sign(onLate.keyId, Buffer.alloc(32, 22))).rejects.toThrow(`reading key ${onLate.keyId}'s stored record took longer than 300 ms`)
      // The key's turn is free again: with the store answering, the next sign loads it on spare-up.
      readsHang = false
      await expectSignsAs(cabled, onLate)
    })
  })

  it('a standby held back after failures of its own is still tried, last, before a request fails', () =>
    withStartedSpares('held-standby-store', { requestTimeoutMs: 1_000 }, async ({ cabled, upCable, lateCable, onUp, onLate }) => {
      // spare-up drops out: its key signs on spare-late, and spare-up is held back for at least 375 ms.
      upCable.cut()
      await expectSignsAs(cabled, onUp)
      // Back within its hold, while spare-late drops out: spare-late's key has only spare-up left.
      upCable.restore()
      expect((await cabled.health()).find((enclave) => enclave.id === 'spare-up')).toMatchObject({ answered: true, ok: false, held: true })
      lateCable.cut()
      await expectSignsAs(cabled, onLate)
      expect(counted(cabled)).toEqual(expect.arrayContaining([expect.objectContaining({ enclave: 'spare-late', standby: 'spare-up', count: 1 })]))
    }))

  /**
   * spare-up's outage went on (no answer of its own ended it): its next failure, made here by cutting it off,
   * doubles the hold to 750–1,250 ms, where a fresh outage would hold it for 375–625 ms. 700 ms on, a sign of
   * its key still goes to the standby without trying it.
   */
  async function expectHoldDoubled({ cabled, upCable, advance, onUp }: { cabled: OriginParent; upCable: Awaited<ReturnType<typeof relay>>; advance: (ms: number) => void; onUp: KeyInfo }) {
    upCable.cut()
    await new Promise((resolve) => setTimeout(resolve, 100))
    await expectSignsAs(cabled, onUp)
    advance(700)
    await new Promise((resolve) => setTimeout(resolve, 100))
    const probedUp = upCable.refused
    await expectSignsAs(cabled, onUp)
    expect(upCable.refused).toBe(probedUp)
  }

  it('an owner held back hands its keys to no standby held back too, and only an answer of its own ends its outage', async () => {
    const { upCable, lateCable, ownStore, stillClockParent, stop } = await cabledSpares('still-clock-store')
    let storeReadsFail = false
    const flakyStore: BlobStore = Object.assign(Object.create(ownStore) as BlobStore, {
      get: (keyId: string) => (storeReadsFail ? Promise.reject(new Error('the store read failed')) : ownStore.get(keyId)),
    })
    const { parent: cabled, held, advance } = stillClockParent(flakyStore)
    try {
      await cabled.start()
      const keys = await keysUntil(cabled, (keys) => ownedBy('spare-up', keys).length >= 2 && ownedBy('spare-late', keys).length >= 1)
      const [onUp, marked] = ownedBy('spare-up', keys)
      const [onLate] = ownedBy('spare-late', keys)

      // spare-up drops out: held back. A state change for one of its keys cannot reach it, and marks the key.
      upCable.cut()
      await expectSignsAs(cabled, onUp!)
      await cabled.setState(marked!.keyId, 'active')
      upCable.restore()
      advance(1_000)
      // The hold is over: the next request probes spare-up, but fails on the parent's own store read, not for want
      // of spare-up. That is no answer from it: its outage goes on.
      storeReadsFail = true
      await expect(cabled.sign(marked!.keyId, Buffer.alloc(32, 7))).rejects.toThrow('the store read failed')
      storeReadsFail = false
      await expectHoldDoubled({ cabled, upCable, advance, onUp: onUp! })
      upCable.restore()
      advance(2_000)

      // Both held back: spare-late hangs on a request of its own, then drops out; spare-up drops out once more.
      lateCable.stall()
      upCable.cut()
      await new Promise((resolve) => setTimeout(resolve, 100))
      await expect(cabled.sign(onLate!.keyId, Buffer.alloc(32, 7))).rejects.toThrow(EnclaveUnavailableError)
      await expect(cabled.sign(onUp!.keyId, Buffer.alloc(32, 7))).rejects.toThrow(EnclaveUnavailableError)
      lateCable.cut()
      upCable.restore()
      // Time for the parent to see spare-late's connections close (the holds stand still meanwhile): a request
      // that went to spare-late now would have to open one, which the relay counts.
      await new Promise((resolve) => setTimeout(resolve, 100))
      // spare-up's key goes to spare-up itself, held back or not, rather than to spare-late, held back as well.
      const triedLate = lateCable.refused
      await expectSignsAs(cabled, onUp!)
      expect(lateCable.refused).toBe(triedLate)
      expect(await held('spare-up')).toBe(false)
    } finally {
      await stop()
    }
  }, 20_000)

  it('a probe that times out waiting for its key\u2019s turn is no answer from the enclave: its outage goes on', async () => {
    const { upCable, ownStore, stillClockParent, stop } = await cabledSpares('turn-probe-store')
    const { store: hanging, control } = hangingStore(ownStore)
    const { parent: cabled, advance } = stillClockParent(hanging, 300, 200)
    try {
      await cabled.start()
      const keys = await keysUntil(cabled, (keys) => ownedBy('spare-up', keys).length >= 2)
      const [onUp, marked] = ownedBy('spare-up', keys)
      // spare-up drops out: held back. A state change for one of its keys cannot reach it, and marks the key.
      upCable.cut()
      await expectSignsAs(cabled, onUp!)
      await cabled.setState(marked!.keyId, 'active')
      // Another, whose write hangs, holds the key's turn.
      control.hang = true
      await expect(cabled.setState(marked!.keyId, 'active')).rejects.toMatchObject({ kind: 'unavailable' })
      upCable.restore()
      advance(1_000)
      // The hold is over: the next request of the marked key probes spare-up, and gives up waiting for the turn.
      await expect(cabled.sign(marked!.keyId, Buffer.alloc(32, 23))).rejects.toBeInstanceOf(KeyTurnTimeoutError)
      control.releaseAll()
      // That is no answer from spare-up: its outage goes on.
      await expectHoldDoubled({ cabled, upCable, advance, onUp: onUp! })
    } finally {
      control.releaseAll()
      await stop()
    }
  })

  /**
   * Three enclaves, each behind a relay, a store of their own and a started parent over the relays with a clock
   * that stands still until `advance`; `keys`: six keys of trio-a whose standbys are trio-b, then trio-c, in that order.
   */
  async function withTrio(storeName: string, test: (trio: { cables: Array<Awaited<ReturnType<typeof relay>>>; parent: OriginParent; advance: (ms: number) => void; keys: KeyInfo[] }) => Promise<void>) {
    const trio = await Promise.all(['trio-a', 'trio-b', 'trio-c'].map(async (id) => ({ id, address: { host: '127.0.0.1', port: await freePort() } })))
    const enclaves = await Promise.all(trio.map((enclave) => startEnclave(enclave)))
    const cables = await Promise.all(trio.map((enclave) => relay(enclave.address)))
    const ownStore = await openDiskBlobStore({ directory: path.join(directory, storeName) })
    let now = 0
    const parent = new OriginParent({ enclaves: trio.map(({ id }, i) => ({ id, address: cables[i]!.address })), poolSize: 1, store: ownStore, requestTimeoutMs: 300, credentials: async () => kms.credentials, monotonicNow: () => now })
    try {
      await parent.start()
      const ring = new HashRing(trio.map(({ id }) => ({ id, node: id })))
      const inOrder = (keys: KeyInfo[]) => keys.filter((key) => ring.nodesFor(key.keyId).join() === 'trio-a,trio-b,trio-c')
      const keys = inOrder(await keysUntil(parent, (made) => inOrder(made).length >= 6))
      await test({ cables, parent, advance: (ms) => void (now += ms), keys })
    } finally {
      parent.close()
      await Promise.all(cables.map((cable) => cable.close()))
      await ownStore.close()
      for (const enclave of enclaves) await enclave.stop()
    }
  }

  it('probes a hung standby with one request at a time once its hold is over: the others go to the next standby at once', async () => {
    await withTrio('trio-probe-store', async ({ cables: [a, b, c], parent, advance, keys }) => {
      a!.cut()
      b!.stall()
      // The first fails over: its load into trio-b times out, which holds trio-b back, and trio-c signs.
      await expectSignsAs(parent, keys[0]!)
      advance(1_000)
      const sent = (cable: typeof b, opcode: number) => cable!.framesFromParent.filter((frame) => frame.opcode === opcode).length
      const [loadsToB, signsToC] = [sent(b, opcodes.LOAD), sent(c, opcodes.SIGN)]
      await Promise.all(keys.slice(1).map((key) => expectSignsAs(parent, key)))
      // One of them probed trio-b (and waited out its timeout); the other four went straight to trio-c. All five signed there.
      expect([sent(b, opcodes.LOAD) - loadsToB, sent(c, opcodes.SIGN) - signsToC]).toEqual([1, 5])
    })
  }, 30_000)

  it('passes a request a standby took but did not answer on to the next standby, whether or not its own enclave is held back', async () => {
    await withTrio('trio-next-store', async ({ cables: [a, b, c], parent, advance, keys }) => {
      const signsTo = (cable: typeof c) => cable!.framesFromParent.filter((frame) => frame.opcode === opcodes.SIGN).length
      a!.cut()
      // trio-b takes the load, but its signature comes after the request timeout: trio-a's first failure sends the key to trio-b, then trio-c.
      b!.delaySignAnswers(1_000)
      await expectSignsAs(parent, keys[0]!)
      expect([signsTo(b), signsTo(c)]).toEqual([1, 1])
      // Past every hold: the next key's request is trio-a's probe, which fails (a longer hold now), and trio-b, its probe too, signs.
      b!.delaySignAnswers(0)
      advance(60_000)
      await expectSignsAs(parent, keys[1]!)
      expect([signsTo(b), signsTo(c)]).toEqual([2, 1])
      // trio-a is held back: the next key goes to trio-b without asking it, and on to trio-c when trio-b does not answer.
      b!.delaySignAnswers(1_000)
      await expectSignsAs(parent, keys[2]!)
      expect([signsTo(b), signsTo(c)]).toEqual([3, 2])
    })
  }, 30_000)

  it('failover traffic holds back a hung standby, and a /healthz answer ends an outage once its hold is over', async () => {
    const { upCable, lateCable, stillClockParent, stop } = await cabledSpares('held-paths-store')
    const { parent: cabled, held, advance } = stillClockParent()
    try {
      const { onUp, onLate } = await startWithKeyOnEach(cabled)

      // spare-up drops out and spare-late hangs: spare-up's key fails, after its load into spare-late timed out.
      upCable.cut()
      lateCable.stall()
      await expect(cabled.sign(onUp!.keyId, Buffer.alloc(32, 8))).rejects.toThrow(EnclaveUnavailableError)
      // spare-up is back, and its next request ends its outage.
      upCable.restore()
      await new Promise((resolve) => setTimeout(resolve, 100))
      await expectSignsAs(cabled, onUp!)
      // That timed-out load held spare-late back: its own key goes to spare-up without a request to spare-late.
      const reachedLate = lateCable.framesFromParent.length
      await expectSignsAs(cabled, onLate!)
      expect(lateCable.framesFromParent.length).toBe(reachedLate)

      // A /healthz answer during a hold leaves it; once the hold is over, it ends the outage.
      upCable.cut()
      await new Promise((resolve) => setTimeout(resolve, 100))
      await expect(cabled.sign(onUp!.keyId, Buffer.alloc(32, 8))).rejects.toThrow(EnclaveUnavailableError)
      upCable.restore()
      expect(await held('spare-up')).toBe(true)
      advance(5_000)
      expect(await held('spare-up')).toBe(false)
    } finally {
      await stop()
    }
  }, 20_000)

  it("a state change its enclave missed reaches it before the key's next use, from this parent or the next", async () => {
    const up = await startEnclave(spares[0]!)
    const late = await startEnclave(spares[1]!)
    const cable = await relay(spares[1]!.address)
    const ownStore = await openDiskBlobStore({ directory: path.join(directory, 'relay-store') })
    const logged: Array<Record<string, unknown>> = []
    const parentOf = () =>
      new OriginParent({ enclaves: [spares[0]!, { id: 'spare-late', address: cable.address }], poolSize: 1, store: ownStore, requestTimeoutMs: 1_000, credentials: async () => kms.credentials, log: (fields) => logged.push(fields) })
    const first = parentOf()
    let second: OriginParent | undefined
    try {
      await first.start()
      const keys = await keysUntil(first, (keys) => ownedBy('spare-late', keys).length >= 3)
      const [missed, stale, unchanged] = ownedBy('spare-late', keys)
      await expectSignsAs(first, missed!)

      // The enclave is alive, but out of the parent's reach while the key is frozen: the change is durable, and in force.
      cable.cut()
      await first.setState(missed!.keyId, 'frozen')
      expect(logged).toContainEqual(expect.objectContaining({ event: 'state_change_deferred', keyId: missed!.keyId, state: 'frozen', enclave: 'spare-late' }))
      expect(late.cache.get(missed!.keyId)?.record.state).toBe('active')
      await expect(first.sign(missed!.keyId, Buffer.alloc(32, 2))).rejects.toThrow(`key ${missed!.keyId} is frozen`)
      cable.restore()
      // Once its hold is over, the next use reaches the enclave again, which gets the state before it signs.
      const frozenThere = async () => {
        await expect(first.sign(missed!.keyId, Buffer.alloc(32, 2))).rejects.toThrow(`key ${missed!.keyId} is frozen`)
        return late.cache.get(missed!.keyId)?.record.state
      }
      await expect.poll(frozenThere, { timeout: 5_000 }).toBe('frozen')

      // Again, and this time the parent restarts while the enclave is still out of reach.
      cable.cut()
      await first.setState(stale!.keyId, 'archived')
      first.close()
      second = parentOf()
      await second.start()
      cable.restore()
      await expect(second.sign(stale!.keyId, Buffer.alloc(32, 2))).rejects.toThrow(`key ${stale!.keyId} is archived`)
      await expect.poll(() => expectSignsAs(second!, unchanged!).then(() => logged.some((line) => line.event === 'enclave_synced')), { timeout: 5_000 }).toBe(true)
      for (const key of keys) expect(late.cache.get(key.keyId)?.record.state ?? up.cache.get(key.keyId)?.record.state).toBe((await ownStore.get(key.keyId))!.state)
    } finally {
      first.close()
      second?.close()
      await cable.close()
      await ownStore.close()
      for (const enclave of [up, late]) await enclave.stop()
    }
  })

  it('refuses to start when it reaches none, naming each and why', async () => {
    const unreachable = await Promise.all(spares.map(async ({ id }) => ({ id, address: { host: '127.0.0.1', port: await freePort() } })))
    const emptyStore = storeWith({ getWrappedDek: async () => undefined, list: async function* () {} })
    const fresh = new OriginParent({ enclaves: unreachable, poolSize: 1, store: emptyStore, requestTimeoutMs: 2_000, credentials: async () => kms.credentials })
    const known = new OriginParent({ enclaves: unreachable, poolSize: 1, store, requestTimeoutMs: 2_000, credentials: async () => kms.credentials })
    try {
      await expect(fresh.start()).rejects.toThrow(/^no enclave could make the first data key: spare-up: cannot connect to the enclave: .*; spare-late: cannot connect to the enclave/)
      await expect(known.start()).rejects.toThrow(/^no enclave could be started: spare-up: cannot connect to the enclave: .*; spare-late: cannot connect to the enclave/)
    } finally {
      fresh.close()
      known.close()
    }
  })
})

describe('HashRing', () => {
  const ids = Array.from({ length: 3_000 }, (_, i) => `key-${i}`)

  it('spreads keys evenly and moves only about a third of them to a third node', () => {
    const two = new HashRing([
      { id: 'a', node: 'a' },
      { id: 'b', node: 'b' },
    ])
    const three = new HashRing([
      { id: 'a', node: 'a' },
      { id: 'b', node: 'b' },
      { id: 'c', node: 'c' },
    ])
    const onA = ids.filter((id) => two.nodeFor(id) === 'a').length
    expect(onA / ids.length).toBeGreaterThan(0.4)
    expect(onA / ids.length).toBeLessThan(0.6)
    const moved = ids.filter((id) => two.nodeFor(id) !== three.nodeFor(id))
    // Every key that moved went to the new node; none moved between the old two.
    expect(moved.every((id) => three.nodeFor(id) === 'c')).toBe(true)
    expect(moved.length / ids.length).toBeGreaterThan(0.25)
    expect(moved.length / ids.length).toBeLessThan(0.42)
  })

  it("lists every node for a key, its owner first, then where the key would go were the ones before gone", () => {
    const three = new HashRing(['a', 'b', 'c'].map((id) => ({ id, node: id })))
    const withoutA = new HashRing(['b', 'c'].map((id) => ({ id, node: id })))
    for (const id of ids.slice(0, 500)) {
      const order = three.nodesFor(id)
      expect(order[0]).toBe(three.nodeFor(id))
      expect([...order].sort()).toEqual(['a', 'b', 'c'])
      if (order[0] === 'a') expect(order[1]).toBe(withoutA.nodeFor(id))
    }
    // The keys of a failed node spread over the others, not all onto one.
    const standbys = ids.filter((id) => three.nodeFor(id) === 'a').map((id) => three.nodesFor(id)[1])
    expect(standbys.filter((node) => node === 'b').length / standbys.length).toBeGreaterThan(0.3)
    expect(standbys.filter((node) => node === 'b').length / standbys.length).toBeLessThan(0.7)
  })

  it('refuses an empty ring', () => {
    expect(() => new HashRing([])).toThrow('at least one node')
  })
})
