import { createServer } from 'node:http'
import type { AddressInfo } from 'node:net'
import { describe, expect, it } from 'vitest'
import { hexToBigInt, keccak256, recoverAddress, sha256, slice, toBytes, toHex } from 'viem'
import { generatePrivateKey, privateKeyToAddress } from 'viem/accounts'
import { HttpSigner } from '../../backends/httpSigner.js'
import { LocalSigner } from '../../backends/local.js'
import { SecretsStoreSigner } from '../../backends/secretsStore.js'
import { ApiKeys } from '../../worker/apiKeys.js'
import { UnauthorizedError } from '../../worker/errors.js'

const halfOrder = 0x7fffffffffffffffffffffffffffffff5d576e7357a4501ddfe92f46681b20a0n
const digest = keccak256(toHex('digest'))

describe('local signer', () => {
  it('signs a digest with a canonical 65-byte low-s signature that recovers to its address', async () => {
    const key = generatePrivateKey()
    const signer = new LocalSigner({ name: 'primary', privateKey: key, secretName: 'PAYMASTER_PRIVATE_KEY', allowEphemeral: false })
    for (let i = 0; i < 20; i++) {
      const message = keccak256(toHex(`digest ${i}`))
      const { signature, signedBy, address } = await signer.signDigest(message)
      expect({ signedBy, address }).toEqual({ signedBy: 'primary', address: privateKeyToAddress(key) })
      expect(signature).toMatch(/^0x[0-9a-f]{130}$/)
      expect(hexToBigInt(slice(signature, 32, 64))).toBeLessThanOrEqual(halfOrder)
      expect([27, 28]).toContain(Number(hexToBigInt(slice(signature, 64))))
      expect(await recoverAddress({ hash: message, signature })).toBe(privateKeyToAddress(key))
    }
    expect(signer.describe()).toEqual({ kind: 'local', name: 'primary', securityLevel: 'software' })
  })

  it('uses an ephemeral key only where allowed, and says so loudly', async () => {
    const lines: string[] = []
    const signer = new LocalSigner({ name: 'dev', privateKey: undefined, secretName: 'PAYMASTER_PRIVATE_KEY', allowEphemeral: true, log: (l) => lines.push(l) })
    expect(lines[0]).toContain('DEVELOPMENT ONLY')
    expect(lines[0]).toContain(await signer.address())
    expect(signer.describe().securityLevel).toBe('ephemeral')

    const strict = new LocalSigner({ name: 'prod', privateKey: undefined, secretName: 'PAYMASTER_PRIVATE_KEY', allowEphemeral: false })
    await expect(strict.signDigest(digest)).rejects.toThrow('secret PAYMASTER_PRIVATE_KEY is not set')
    expect(await strict.health()).toEqual({ ok: false, error: 'secret PAYMASTER_PRIVATE_KEY is not set' })
  })

  it('rejects malformed keys without echoing them', async () => {
    for (const bad of ['0x1234', 'zz'.repeat(32), `0x${'00'.repeat(32)}`, `0x${'ff'.repeat(32)}`]) {
      const signer = new LocalSigner({ name: 'p', privateKey: bad, secretName: 'KEY', allowEphemeral: false })
      const health = await signer.health()
      expect(health.ok).toBe(false)
      expect(JSON.stringify(health)).not.toContain(bad.slice(2, 12))
    }
  })
})

describe('Secrets Store signer', () => {
  it('reads the secret once, however many signatures follow', async () => {
    const key = generatePrivateKey()
    let reads = 0
    const signer = new SecretsStoreSigner({ name: 'p', bindingName: 'KEY', binding: { get: async () => (reads++, `  ${key}\n`) } })
    await Promise.all([signer.signDigest(digest), signer.signDigest(digest), signer.address()])
    expect(await signer.address()).toBe(privateKeyToAddress(key))
    expect(reads).toBe(1)
  })

  it('remembers a failed read briefly, then reads again so a fixed secret needs no redeploy', async () => {
    let now = 0
    let value: string | undefined
    let reads = 0
    const signer = new SecretsStoreSigner({
      name: 'p',
      bindingName: 'KEY',
      retryAfterMs: 30_000,
      now: () => now,
      binding: {
        get: async () => {
          reads++
          if (!value) throw new Error('Secret "k" not found')
          return value
        },
      },
    })
    await expect(signer.address()).rejects.toThrow('could not be read')
    value = generatePrivateKey()
    now = 10_000
    await expect(signer.address()).rejects.toThrow('could not be read')
    expect(reads).toBe(1)
    now = 40_000
    expect(await signer.address()).toBe(privateKeyToAddress(value as `0x${string}`))
    expect(reads).toBe(2)
  })

  it('says so when the binding is missing', async () => {
    const signer = new SecretsStoreSigner({ name: 'p', bindingName: 'PAYMASTER_KEY', binding: undefined })
    expect(await signer.health()).toEqual({ ok: false, error: 'Secrets Store binding PAYMASTER_KEY is not bound to this Worker' })
  })
})

describe('HTTP signer', () => {
  // Key servers on 127.0.0.1 that answer every sign with one bad signature, and the reason each is refused.
  it.each([
    ['a compact signature with r = 0', `0x${'00'.repeat(32)}${'11'.repeat(32)}`, 'malformed signature (compact signature values are out of range)'],
    [
      'base64 DER whose r is padded with a 0x00 DER does not allow',
      Buffer.from(`3027020300${'11'.repeat(2)}0220${'22'.repeat(32)}`, 'hex').toString('base64'),
      'signature is neither 64/65-byte hex nor base64 DER (malformed DER integer: not in its shortest form)',
    ],
    ['a signature that is neither hex nor base64', 'not*base64!', 'signature is neither 64/65-byte hex nor base64 DER (not base64)'],
  ])('refuses %s, naming itself and why', async (_, signature, why) => {
    const server = createServer((request, response) => {
      request.resume()
      response.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ signature }))
    })
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
    try {
      const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`
      const signer = new HttpSigner({ name: 'team', url, keyId: 'k', token: 'test-token', address: privateKeyToAddress(generatePrivateKey()), timeoutMs: 2_000 })
      await expect(signer.signDigest(digest)).rejects.toThrow(`HTTP signer team: ${why}`)
    } finally {
      server.close()
    }
  })
})

describe('API keys', () => {
  it('accepts any configured key and rejects others, missing and prefixes alike', async () => {
    const keys = new ApiKeys(ApiKeys.parse(' alpha , beta,,'))
    // Each answers its id: the first 8 bytes of its SHA-256.
    await expect(keys.verify('alpha')).resolves.toBe(sha256(toBytes('alpha')).slice(2, 18))
    await expect(keys.verify('beta')).resolves.toBe(sha256(toBytes('beta')).slice(2, 18))
    for (const wrong of ['alph', 'alphaa', 'gamma', ''] as const) {
      await expect(keys.verify(wrong)).rejects.toBeInstanceOf(UnauthorizedError)
    }
    await expect(keys.verify(undefined)).rejects.toThrow('an API key is required')
  })
})
