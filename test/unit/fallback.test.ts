import { describe, expect, it } from 'vitest'
import { keccak256, recoverAddress, toHex, type Address, type Hex } from 'viem'
import { generatePrivateKey, privateKeyToAddress } from 'viem/accounts'
import { FallbackSigner } from '../../backends/fallback.js'
import { LocalSigner } from '../../backends/local.js'
import { SignerMetrics } from '../../backends/signerMetrics.js'
import { SignerError, type SignedDigest, type Signer, type SignOptions } from '../../backends/signer.js'

/** A real local signer whose availability the test scripts: the member, not the fallback under test. */
class ScriptedMember implements Signer {
  mode: 'up' | 'down' | 'hang' | 'denied' = 'up'
  calls = 0
  /** The signal of each call: a hanging member stops when it aborts, as a backend calling a service does. */
  readonly signals: Array<AbortSignal | undefined> = []
  readonly inner: LocalSigner
  constructor(
    readonly name: string,
    key: Hex,
  ) {
    this.inner = new LocalSigner({ name, privateKey: key, secretName: name, allowEphemeral: false })
  }
  address() {
    return this.inner.address()
  }
  async signDigest(digest: Hex, options?: SignOptions): Promise<SignedDigest> {
    this.calls++
    this.signals.push(options?.signal)
    if (this.mode === 'down') throw new SignerError(`${this.name} is down`, { retryable: true })
    if (this.mode === 'denied') throw new SignerError(`${this.name} denied access`)
    if (this.mode === 'hang') {
      await new Promise((resolve) => options?.signal?.addEventListener('abort', resolve))
      throw new SignerError(`${this.name} stopped`, { retryable: true })
    }
    return this.inner.signDigest(digest)
  }
  health() {
    return this.mode === 'up' ? this.inner.health() : Promise.resolve({ ok: false as const, error: `${this.name} is ${this.mode}` })
  }
  describe() {
    return { ...this.inner.describe(), name: this.name }
  }
}

const digest = keccak256(toHex('fallback'))
const sharedKey = generatePrivateKey()

function chain(
  options: { timeoutMs?: number; hedgeAfterMs?: number; requireSameAddress?: boolean; declaredAddress?: Address; keys?: [Hex, Hex]; clock?: { now: number } } = {},
) {
  const [primaryKey, backupKey] = options.keys ?? [sharedKey, sharedKey]
  const primary = new ScriptedMember('kms', primaryKey)
  const backup = new ScriptedMember('edge', backupKey)
  const metrics = new SignerMetrics()
  const clock = options.clock ?? { now: 0 }
  const signer = new FallbackSigner({
    name: 'primary',
    members: [primary, backup],
    timeoutMs: options.timeoutMs ?? 50,
    failureThreshold: 2,
    coolDownMs: 1_000,
    hedgeAfterMs: options.hedgeAfterMs,
    requireSameAddress: options.requireSameAddress ?? true,
    declaredAddress: options.declaredAddress,
    metrics,
    now: () => clock.now,
  })
  return { signer, primary, backup, metrics, clock }
}

describe('fallback signer', () => {
  it('signs with the primary while it is up', async () => {
    const { signer, backup } = chain()
    const signed = await signer.signDigest(digest)
    expect(signed.signedBy).toBe('kms')
    expect(await recoverAddress({ hash: digest, signature: signed.signature })).toBe(privateKeyToAddress(sharedKey))
    expect(backup.calls).toBe(0)
  })

  it('a dead primary: the backup signs, the breaker opens, and later requests skip the primary at no cost', async () => {
    const { signer, primary, metrics } = chain()
    primary.mode = 'down'
    for (let i = 0; i < 5; i++) expect((await signer.signDigest(digest)).signedBy).toBe('edge')
    expect(primary.calls).toBe(2)
    expect(metrics.count('kms', 'skipped')).toBe(3)
    expect(metrics.count('edge', 'success')).toBe(5)
    expect(await signer.health()).toMatchObject({ ok: true, members: [{ name: 'kms', state: 'open', ok: false, lastError: 'kms is down' }, { name: 'edge', state: 'closed', ok: true }] })
  })

  it('a hanging primary costs its timeout only until the breaker opens', async () => {
    // A timeout far above any pause of a busy machine, so "waited for it" and "did not" cannot be confused.
    const { signer, primary } = chain({ timeoutMs: 1_000 })
    primary.mode = 'hang'
    const durations: number[] = []
    for (let i = 0; i < 4; i++) {
      const started = Date.now()
      expect((await signer.signDigest(digest)).signedBy).toBe('edge')
      durations.push(Date.now() - started)
    }
    expect(primary.calls).toBe(2)
    expect(durations[0]).toBeGreaterThanOrEqual(990)
    expect(durations[3]).toBeLessThan(990)
  })

  it('after the cool-down one probe goes to the primary, and its success closes the breaker', async () => {
    const { signer, primary, clock } = chain()
    primary.mode = 'down'
    await signer.signDigest(digest)
    await signer.signDigest(digest)
    primary.mode = 'up'
    expect((await signer.signDigest(digest)).signedBy).toBe('edge')
    clock.now = 1_000
    expect((await signer.signDigest(digest)).signedBy).toBe('kms')
    expect((await signer.health()).members).toMatchObject([{ name: 'kms', state: 'closed' }, { state: 'closed' }])
  })

  it('a backup whose breaker is half-open is not held by a request the primary answers', async () => {
    const { signer, primary, backup, clock } = chain()
    primary.mode = 'down'
    backup.mode = 'down'
    for (let i = 0; i < 2; i++) await signer.signDigest(digest).catch(() => {})
    clock.now = 1_000
    primary.mode = 'up'
    backup.mode = 'up'
    expect((await signer.signDigest(digest)).signedBy).toBe('kms')
    // The backup's probe slot was never taken, so it is there when the primary fails again.
    primary.mode = 'down'
    expect((await signer.signDigest(digest)).signedBy).toBe('edge')
    expect((await signer.health()).members).toMatchObject([{ name: 'kms' }, { name: 'edge', state: 'closed' }])
  })

  it('hedging asks the backup when the primary is slower than the budget, and the first answer wins', async () => {
    const { signer, primary } = chain({ timeoutMs: 5_000, hedgeAfterMs: 5 })
    primary.mode = 'hang'
    const started = Date.now()
    expect((await signer.signDigest(digest)).signedBy).toBe('edge')
    // Well before the primary's timeout, after which the backup would be asked without hedging.
    expect(Date.now() - started).toBeLessThan(4_000)
  })

  it('tells a member whose attempt timed out to stop, and counts the timeout', async () => {
    const { signer, primary, metrics } = chain()
    primary.mode = 'hang'
    expect((await signer.signDigest(digest)).signedBy).toBe('edge')
    expect(primary.signals[0]?.aborted).toBe(true)
    expect(metrics.count('kms', 'timeout')).toBe(1)
  })

  it('lets a member a hedge beat run on to its own timeout, which stops it and counts against its breaker', async () => {
    const { signer, primary, metrics } = chain({ hedgeAfterMs: 5 })
    primary.mode = 'hang'
    // Two hedged signatures (the failure threshold): the hung primary's breaker opens, and the third skips it.
    for (let i = 0; i < 2; i++) {
      expect((await signer.signDigest(digest)).signedBy).toBe('edge')
      await expect.poll(() => primary.signals[i]?.aborted, { timeout: 2_000 }).toBe(true)
    }
    expect(metrics.count('kms', 'timeout')).toBe(2)
    expect((await signer.signDigest(digest)).signedBy).toBe('edge')
    expect(primary.calls).toBe(2)
  })

  it('counts a timed-out member as timed out even when it fails at once on being told to stop', async () => {
    const backup = new ScriptedMember('edge', sharedKey)
    // A member whose own promise rejects inside its abort listener, with no step in between.
    const failsOnAbort: Signer = {
      address: () => backup.address(),
      signDigest: (_digest, options) => new Promise((_, reject) => options?.signal?.addEventListener('abort', () => reject(new SignerError('raw stopped')))),
      health: () => backup.health(),
      describe: () => ({ kind: 'http', name: 'raw', securityLevel: 'software' }),
    }
    const metrics = new SignerMetrics()
    const signer = new FallbackSigner({ name: 'primary', members: [failsOnAbort, backup], timeoutMs: 50, failureThreshold: 2, coolDownMs: 1_000, requireSameAddress: true, metrics })
    expect((await signer.signDigest(digest)).signedBy).toBe('edge')
    expect([metrics.count('raw', 'timeout'), metrics.count('raw', 'failure')]).toEqual([1, 0])
  })

  it('stops its members when its own caller gives up', async () => {
    const { signer, primary, metrics } = chain()
    primary.mode = 'hang'
    const caller = new AbortController()
    const signing = signer.signDigest(digest, { signal: caller.signal })
    caller.abort()
    await expect(signing).rejects.toThrow('every signer backend failed: kms stopped')
    expect(primary.signals[0]?.aborted).toBe(true)
    // No verdict on a member stopped for the caller: its breaker stays closed.
    expect([metrics.count('kms', 'cancelled'), metrics.count('kms', 'failure'), metrics.count('kms', 'timeout')]).toEqual([1, 0, 0])
  })

  it('says a failure of every backend is worth retrying only if one of theirs was', async () => {
    const retryable = async (modes: [ScriptedMember['mode'], ScriptedMember['mode']]) => {
      const { signer, primary, backup } = chain()
      ;[primary.mode, backup.mode] = modes
      const error = await signer.signDigest(digest).catch((thrown: unknown) => thrown)
      expect(error).toBeInstanceOf(SignerError)
      return (error as SignerError).options.retryable
    }
    expect(await retryable(['denied', 'denied'])).toBe(false)
    expect(await retryable(['denied', 'down'])).toBe(true)
    expect(await retryable(['hang', 'denied'])).toBe(true)
    // A member its open breaker skipped will be tried again: worth retrying, though the one asked refused, unless the
    // skipped one's own last failure was for good.
    for (const [primaryFailure, expected] of [['down', true], ['denied', false]] as const) {
      const { signer, primary, backup } = chain()
      primary.mode = primaryFailure
      for (let i = 0; i < 2; i++) await signer.signDigest(digest)
      backup.mode = 'denied'
      const error = (await signer.signDigest(digest).catch((thrown: unknown) => thrown)) as SignerError
      expect(error.message).toBe('primary: every signer backend failed: edge denied access')
      expect(error.options.retryable).toBe(expected)
    }
    // Both skipped: worth retrying only if one's last failure was.
    for (const [secondFailure, expected] of [['down', true], ['denied', false]] as const) {
      const { signer, primary, backup } = chain()
      primary.mode = 'denied'
      backup.mode = secondFailure
      for (let i = 0; i < 2; i++) await signer.signDigest(digest).catch(() => {})
      const error = (await signer.signDigest(digest).catch((thrown: unknown) => thrown)) as SignerError
      expect(error.message).toMatch(/circuits open/)
      expect(error.options.retryable).toBe(expected)
    }
  })

  it('when every backend fails the caller gets a clear error promptly, not a hang', async () => {
    const { signer, primary, backup } = chain()
    primary.mode = 'hang'
    backup.mode = 'down'
    await expect(signer.signDigest(digest)).rejects.toThrow(/every signer backend failed: kms: no signature within 50 ms; edge is down/)
    await signer.signDigest(digest).catch(() => {})
    await expect(signer.signDigest(digest)).rejects.toThrow('circuits open')
  })

  it('for a single-signer paymaster, members with different addresses are refused', async () => {
    const { signer } = chain({ keys: [generatePrivateKey(), generatePrivateKey()] })
    await expect(signer.address()).rejects.toThrow('backends resolve to different addresses')
    expect((await signer.health()).ok).toBe(false)
  })

  it('for a single-signer paymaster, a backup with another key cannot make its address the chain\'s declared one by answering first', async () => {
    const otherKey = generatePrivateKey()
    const { signer, primary, backup } = chain({ keys: [sharedKey, otherKey], declaredAddress: privateKeyToAddress(sharedKey) })
    primary.mode = 'down'
    await expect(signer.signDigest(digest)).rejects.toThrow(`edge signs as ${privateKeyToAddress(otherKey)}, but this chain's paymaster accepts only ${privateKeyToAddress(sharedKey)}`)
    expect(backup.calls).toBe(1)
    expect(await signer.health()).toMatchObject({
      ok: false,
      error: `primary: backends resolve to kms=unavailable, edge=${privateKeyToAddress(otherKey)}, but this chain's paymaster accepts only ${privateKeyToAddress(sharedKey)}`,
    })
  })

  it('for a multi-signer paymaster, members may differ and the signer says which signed', async () => {
    const keys: [Hex, Hex] = [generatePrivateKey(), generatePrivateKey()]
    const { signer, primary } = chain({ keys, requireSameAddress: false })
    primary.mode = 'down'
    expect(await signer.signDigest(digest)).toMatchObject({ signedBy: 'edge', address: privateKeyToAddress(keys[1]) })
  })
})
