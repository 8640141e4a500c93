import { afterEach, describe, expect, it } from 'vitest'
import path from 'node:path'
import { choiceSetting, enclavesSetting, hmacKeysSetting, integerSetting, listenAddress, optionalSetting, parentTlsSetting, redactSecrets, signOnlyKeyIdsSetting } from '../../enclave-origin/config.js'
import { developmentAttestation, type AttestationProvider } from '../../enclave-origin/enclave/dataKey.js'
import { checkStartup } from '../../enclave-origin/enclave/startupChecks.js'
import { startTestCa } from '../support/testCertificates.js'

/** What the origin's processes refuse or accept before they serve: start-up checks, settings, and what their logs may say. */

const nitro: AttestationProvider = { kind: 'nitro', attestationDocument: async () => new Uint8Array([1]) }
const keyArn = 'arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab'

describe('enclave start-up checks', () => {
  it('production refuses unless the current hardware RNG is the Nitro one', async () => {
    for (const rng of ['tpm-rng-0', 'virtio_rng.0', '']) {
      await expect(checkStartup({ profile: 'production', kmsKeyId: keyArn, attestation: nitro, warn: () => {}, readRng: async () => `${rng}\n` })).rejects.toThrow(
        `refusing to start: the current hardware RNG is "${rng}", not the Nitro "nsm-hwrng"`,
      )
    }
    await expect(checkStartup({ profile: 'production', kmsKeyId: keyArn, attestation: nitro, warn: () => {}, readRng: () => Promise.reject(new Error('ENOENT')) })).rejects.toThrow(
      '"unreadable"',
    )
  })

  it('production refuses without a Nitro attestation provider, even on the Nitro RNG', async () => {
    await expect(checkStartup({ profile: 'production', kmsKeyId: keyArn, attestation: developmentAttestation, warn: () => {}, readRng: async () => 'nsm-hwrng\n' })).rejects.toThrow(
      'refusing to start: the production profile needs a Nitro attestation provider',
    )
    await expect(checkStartup({ profile: 'production', kmsKeyId: keyArn, attestation: nitro, warn: () => {}, readRng: async () => 'nsm-hwrng\n', env: {} })).resolves.toBeUndefined()
  })

  it('production refuses a KMS key named by an alias or a bare id: the parent\u2019s credentials would choose the account', async () => {
    for (const kmsKeyId of ['alias/enclave', '1234abcd-12ab-34cd-56ef-1234567890ab', 'arn:aws:kms:us-east-1:111122223333:alias/enclave']) {
      await expect(checkStartup({ profile: 'production', kmsKeyId, attestation: nitro, warn: () => {}, readRng: async () => 'nsm-hwrng\n' })).rejects.toThrow(
        'refusing to start: the production profile needs KMS_KEY_ID as a key ARN (arn:aws:kms:REGION:ACCOUNT:key/ID)',
      )
    }
  })

  it('production refuses to reach KMS without verified TLS: a plain endpoint, or certificate checks turned off', async () => {
    const production = { profile: 'production' as const, kmsKeyId: keyArn, attestation: nitro, warn: () => {}, readRng: async () => 'nsm-hwrng\n', env: {} }
    for (const kmsEndpoint of ['http://kms.us-east-1.amazonaws.com', 'kms.us-east-1.amazonaws.com']) {
      await expect(checkStartup({ ...production, kmsEndpoint })).rejects.toThrow('refusing to start: the production profile reaches KMS over TLS only (KMS_ENDPOINT must be an https:// URL)')
    }
    await expect(checkStartup({ ...production, env: { NODE_TLS_REJECT_UNAUTHORIZED: '0' } })).rejects.toThrow(
      "refusing to start: NODE_TLS_REJECT_UNAUTHORIZED=0 turns off the check of KMS's TLS certificate",
    )
    await expect(checkStartup({ ...production, kmsEndpoint: 'https://kms.us-east-1.amazonaws.com', env: { NODE_TLS_REJECT_UNAUTHORIZED: '1' } })).resolves.toBeUndefined()
    // TLS to a host of someone else's with a public certificate.
    const refusal = (example: string, endpoint: string) =>
      `refusing to start: KMS_ENDPOINT must name KMS in the key's partition and region (${example}, its kms-fips, dual-stack or VPC endpoint names), got ${endpoint}`
    for (const kmsEndpoint of ['https://kms.example.com', 'https://kms.eu-west-1.amazonaws.com', 'https://kms.us-east-1.amazonaws.com.example.com', 'https://kms.us-east-1.amazonaws.com.cn', 'https://[::1]']) {
      await expect(checkStartup({ ...production, kmsEndpoint })).rejects.toThrow(refusal('kms.us-east-1.amazonaws.com', kmsEndpoint))
    }
    const accepted: Array<[string, string]> = [
      [keyArn, 'https://kms-fips.us-east-1.amazonaws.com'],
      [keyArn, 'https://vpce-0a1b2c3d4e5f-abcdefgh.kms.us-east-1.vpce.amazonaws.com'],
      [keyArn, 'https://vpce-0a1b2c3d4e5f-abcdefgh.kms-fips.us-east-1.vpce.amazonaws.com'],
      [keyArn, 'https://KMS.us-east-1.amazonaws.com.:443/'],
      [keyArn, 'https://kms.us-east-1.api.aws'],
      ['arn:aws-cn:kms:cn-north-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab', 'https://kms.cn-north-1.amazonaws.com.cn'],
      ['arn:aws-cn:kms:cn-north-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab', 'https://vpce-0a1b-xyz.kms.cn-north-1.vpce.amazonaws.com.cn'],
      ['arn:aws-us-gov:kms:us-gov-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab', 'https://kms-fips.us-gov-west-1.amazonaws.com'],
      ['arn:aws-cn:kms:cn-north-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab', 'https://kms.cn-north-1.api.amazonwebservices.com.cn'],
    ]
    for (const [kmsKeyId, kmsEndpoint] of accepted) await expect(checkStartup({ ...production, kmsKeyId, kmsEndpoint }), kmsEndpoint).resolves.toBeUndefined()
    // The ISO partitions' endpoints carry certificates Node's bundled roots do not vouch for: no KMS there, so no start.
    await expect(checkStartup({ ...production, kmsKeyId: 'arn:aws-iso:kms:us-iso-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab' })).rejects.toThrow(
      "refusing to start: the production profile reaches KMS in the aws, aws-us-gov, aws-cn, aws-eusc partitions, whose certificates Node's bundled roots vouch for, and the key is in aws-iso",
    )
    const china = 'arn:aws-cn:kms:cn-north-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab'
    await expect(checkStartup({ ...production, kmsKeyId: china, kmsEndpoint: 'https://kms.cn-north-1.amazonaws.com' })).rejects.toThrow(
      refusal('kms.cn-north-1.amazonaws.com.cn', 'https://kms.cn-north-1.amazonaws.com'),
    )
    // Development allows both (the local KMS server of the tests speaks plain HTTP).
    await expect(checkStartup({ ...production, profile: 'development', kmsEndpoint: 'http://127.0.0.1:4599', env: { NODE_TLS_REJECT_UNAUTHORIZED: '0' } })).resolves.toBeUndefined()
  })

  it('development by default (ORIGIN_PROFILE unset) refuses to start inside a Nitro Enclave; development set so, or elsewhere, starts', async () => {
    const development = { profile: 'development' as const, kmsKeyId: 'alias/dev', attestation: developmentAttestation, warn: () => {} }
    await expect(checkStartup({ ...development, profileByDefault: true, readRng: async () => 'nsm-hwrng\n' })).rejects.toThrow(
      'refusing to start: this is a Nitro Enclave (its hardware RNG is nsm-hwrng) and ORIGIN_PROFILE is unset, so development by default: set ORIGIN_PROFILE=production (or development, to mean it)',
    )
    await expect(checkStartup({ ...development, profileByDefault: false, readRng: async () => 'nsm-hwrng\n' })).resolves.toBeUndefined()
    for (const readRng of [async () => 'virtio_rng.0\n', () => Promise.reject(new Error('ENOENT'))]) {
      await expect(checkStartup({ ...development, profileByDefault: true, readRng })).resolves.toBeUndefined()
    }
  })

  it('development skips both checks, and says so', async () => {
    const warnings: string[] = []
    let rngRead = false
    await checkStartup({
      profile: 'development',
      kmsKeyId: 'alias/dev',
      attestation: developmentAttestation,
      warn: (line) => warnings.push(line),
      readRng: async () => {
        rngRead = true
        return 'virtio_rng.0'
      },
    })
    expect(rngRead).toBe(false)
    expect(warnings).toEqual([expect.stringMatching(/RNG self-check skipped and no attestation/)])
    await checkStartup({ profile: 'development', kmsKeyId: 'alias/dev', attestation: nitro, warn: (line) => warnings.push(line) })
    expect(warnings[1]).toMatch(/RNG self-check skipped and data keys bound to Nitro attestation/)
  })
})

/** Sets `name` to each value in turn and expects `read` to refuse it with its message; returns the messages. */
function expectRefusals(name: string, read: () => unknown, refusals: Array<[value: string, message: string]>): string[] {
  return refusals.map(([value, message]) => {
    process.env[name] = value
    expect(read).toThrow(message)
    try {
      read()
    } catch (error) {
      return (error as Error).message
    }
    return ''
  })
}

describe('origin settings', () => {
  const saved = { ...process.env }
  afterEach(() => {
    process.env = { ...saved }
  })

  it('takes one of its choices, the fallback when unset, and names the setting and its choices otherwise', () => {
    const profiles = ['development', 'production'] as const
    delete process.env.ORIGIN_PROFILE
    expect(choiceSetting('ORIGIN_PROFILE', { choices: profiles, fallback: 'development' })).toBe('development')
    process.env.ORIGIN_PROFILE = 'production'
    expect(choiceSetting('ORIGIN_PROFILE', { choices: profiles, fallback: 'development' })).toBe('production')
    for (const bad of ['prod', 'Production', ' production']) {
      process.env.ORIGIN_PROFILE = bad
      expect(() => choiceSetting('ORIGIN_PROFILE', { choices: profiles, fallback: 'development' })).toThrow(`ORIGIN_PROFILE must be one of development, production, got ${bad}`)
    }
    process.env.ORIGIN_PROFILE = ''
    expect(() => choiceSetting('ORIGIN_PROFILE', { choices: profiles, fallback: 'development' })).toThrow('ORIGIN_PROFILE is set but empty: set it to one of development, production, or unset it for development')
  })

  it('takes whole numbers in range, the fallback when unset, and names the setting otherwise', () => {
    const range = { min: 1, max: 256, fallback: 16 }
    delete process.env.POOL_SIZE
    expect(integerSetting('POOL_SIZE', range)).toBe(16)
    process.env.POOL_SIZE = '32'
    expect(integerSetting('POOL_SIZE', range)).toBe(32)
    for (const bad of ['0', '257', '2.5', 'many', '0x10', '1e2', ' 8 ', '-1']) {
      process.env.POOL_SIZE = bad
      expect(() => integerSetting('POOL_SIZE', range)).toThrow(`POOL_SIZE must be a whole number from 1 to 256, got ${bad}`)
    }
    delete process.env.ENGINE_THREADS
    expect(() => integerSetting('ENGINE_THREADS', { min: 1, max: 8 })).toThrow('ENGINE_THREADS is not set')
  })

  it('reads vsock, host:port and Unix socket addresses, and refuses a port out of range or a host without one', () => {
    expect(listenAddress('vsock:16:7000')).toEqual({ vsock: { cid: 16, port: 7000 } })
    expect(listenAddress('127.0.0.1:7000')).toEqual({ host: '127.0.0.1', port: 7000 })
    expect(listenAddress('/run/enclave.sock')).toEqual({ path: '/run/enclave.sock' })
    expect(listenAddress('./enclave.sock')).toEqual({ path: './enclave.sock' })
    expect(() => listenAddress('127.0.0.1:99999')).toThrow('127.0.0.1:99999: the port must be from 1 to 65535')
    expect(() => listenAddress('127.0.0.1:0')).toThrow('the port must be from 1 to 65535')
    expect(() => listenAddress('127.0.0.1')).toThrow('127.0.0.1 is neither host:port nor a Unix socket path (one with a /)')
    expect(listenAddress('[::1]:7000')).toEqual({ host: '::1', port: 7000 })
    expect(listenAddress('localhost:7000')).toEqual({ host: 'localhost', port: 7000 })
    for (const value of ['::1', '::1:7000', 'fe80::1:8443']) expect(() => listenAddress(value)).toThrow(`${value}: an IPv6 address goes in brackets, with its port: [::1]:7000`)
    for (const value of ['vsock:4294967296:8000', 'vsock:16:99999999999', 'vsock:16', 'vsock:x:8000']) {
      expect(() => listenAddress(value)).toThrow(`${value}: a vsock address is vsock:CID:PORT, each a number from 0 to 4294967295`)
    }
  })

  it('takes ENCLAVES as distinct id=address entries', () => {
    process.env.ENCLAVES = 'e1=127.0.0.1:7000, e2=/run/e2.sock'
    expect(enclavesSetting()).toEqual([
      { id: 'e1', address: { host: '127.0.0.1', port: 7000 } },
      { id: 'e2', address: { path: '/run/e2.sock' } },
    ])
    const refusals: Array<[string, string]> = [
      ['e1=127.0.0.1:7000,e1=127.0.0.1:7001', 'ENCLAVES names enclave e1 twice'],
      ['e1=127.0.0.1:7000,', 'ENCLAVES entry "" is not id=address'],
      ['=127.0.0.1:7000', 'ENCLAVES entry "=127.0.0.1:7000" is not id=address'],
      ['e1=a=b', 'ENCLAVES entry "e1=a=b" is not id=address'],
    ]
    expectRefusals('ENCLAVES', enclavesSetting, refusals)
  })

  it('takes HMAC keys as keyId:secret pairs, and refuses a missing separator, an empty id, a repeated id or a short secret, naming the entry by position only', () => {
    process.env.ORIGIN_HMAC_KEYS = 'worker:a-secret-of-enough-bytes,ops:another:with-colons-inside'
    expect(hmacKeysSetting()).toEqual({ worker: 'a-secret-of-enough-bytes', ops: 'another:with-colons-inside' })
    const refusals: Array<[string, string]> = [
      ['worker:a-secret-of-enough-bytes,no-separator-here-at-all', 'ORIGIN_HMAC_KEYS entry 2 is not keyId:secret'],
      [':a-secret-of-enough-bytes', 'ORIGIN_HMAC_KEYS entry 1 is not keyId:secret'],
      ['worker:a-secret-of-enough-bytes,worker:a-second-secret-long-enough', 'ORIGIN_HMAC_KEYS entry 2 names a key id an earlier entry names'],
      ['ops:', 'ORIGIN_HMAC_KEYS entry 1: its secret is shorter than 16 bytes'],
      ['ops:short-secret', 'ORIGIN_HMAC_KEYS entry 1: its secret is shorter than 16 bytes'],
      ['ops:a-secret-of-enough-bytes ', 'ORIGIN_HMAC_KEYS entry 1: its secret begins or ends with white space, which every client would have to sign with too'],
      ['ops:a-secret-of-enough-bytes\n', 'ORIGIN_HMAC_KEYS entry 1: its secret begins or ends with white space, which every client would have to sign with too'],
      // A secret holding "," and then ":" splits; the piece read as the next entry's key id is never printed.
      ['ops:a-secret-of-enough-bytes,hidden-piece-of-it:x', 'ORIGIN_HMAC_KEYS entry 2: its secret is shorter than 16 bytes'],
      ['edge eu:a-secret-of-enough-bytes', 'ORIGIN_HMAC_KEYS entry 1: a key id is visible ASCII characters only'],
      ['wörker:a-secret-of-enough-bytes', 'ORIGIN_HMAC_KEYS entry 1: a key id is visible ASCII characters only'],
    ]
    for (const message of expectRefusals('ORIGIN_HMAC_KEYS', hmacKeysSetting, refusals)) expect(message).not.toMatch(/a-second-secret|short-secret|no-separator|hidden-piece|worker|ops/)
  })

  it('takes sign-only HMAC key ids among ORIGIN_HMAC_KEYS, and refuses one it does not have rather than leave that key every right', () => {
    const secrets = { worker: 'a-secret-of-enough-bytes', ops: 'another-secret-of-enough-bytes' }
    delete process.env.ORIGIN_SIGN_ONLY_KEY_IDS
    expect(signOnlyKeyIdsSetting(secrets)).toEqual(new Set())
    process.env.ORIGIN_SIGN_ONLY_KEY_IDS = ' worker ,'
    expect(signOnlyKeyIdsSetting(secrets)).toEqual(new Set(['worker']))
    process.env.ORIGIN_SIGN_ONLY_KEY_IDS = 'worker,wroker'
    expect(() => signOnlyKeyIdsSetting(secrets)).toThrow('ORIGIN_SIGN_ONLY_KEY_IDS names key id wroker, which ORIGIN_HMAC_KEYS does not have')
    process.env.ORIGIN_SIGN_ONLY_KEY_IDS = 'worker,ops'
    expect(() => signOnlyKeyIdsSetting(secrets)).toThrow('ORIGIN_SIGN_ONLY_KEY_IDS names every key of ORIGIN_HMAC_KEYS: keep at least one for operators')
  })

  it('takes TLS from its files, and refuses client certificates without a CA of their own or without TLS at all', () => {
    const ca = startTestCa()
    try {
      const parent = ca.issue('parent')
      const files: Record<string, string> = { '/tls/cert.pem': parent.cert, '/tls/key.pem': parent.key, '/tls/ca.pem': ca.caPem }
      const read = (file: string) => files[file]!
      for (const name of ['TLS_CERT_FILE', 'TLS_KEY_FILE', 'TLS_CA_FILE', 'TLS_REQUIRE_CLIENT_CERT']) delete process.env[name]
      expect(parentTlsSetting(read)).toBeUndefined()
      process.env.TLS_REQUIRE_CLIENT_CERT = '1'
      expect(() => parentTlsSetting(read)).toThrow('TLS_REQUIRE_CLIENT_CERT=1 needs TLS_CERT_FILE and TLS_KEY_FILE')
      process.env.TLS_CERT_FILE = '/tls/cert.pem'
      process.env.TLS_KEY_FILE = '/tls/key.pem'
      expect(() => parentTlsSetting(read)).toThrow('TLS_REQUIRE_CLIENT_CERT=1 needs TLS_CA_FILE')
      process.env.TLS_CA_FILE = '/tls/ca.pem'
      expect(parentTlsSetting(read)).toEqual({ cert: parent.cert, key: parent.key, ca: ca.caPem, requireClientCertificate: true })
      process.env.TLS_REQUIRE_CLIENT_CERT = 'yes'
      expect(() => parentTlsSetting(read)).toThrow('TLS_REQUIRE_CLIENT_CERT must be one of 0, 1, got yes')
      delete process.env.TLS_REQUIRE_CLIENT_CERT
      delete process.env.TLS_CA_FILE
      expect(parentTlsSetting(read)).toEqual({ cert: parent.cert, key: parent.key, ca: undefined, requireClientCertificate: false })
    } finally {
      ca.close()
    }
  })

  it('names the TLS setting whose file cannot be read, holds no certificate or key, or does not match', () => {
    const ca = startTestCa()
    try {
      const [parent, other] = [ca.issue('parent'), ca.issue('other')]
      const files: Record<string, string> = { '/tls/cert.pem': parent.cert, '/tls/key.pem': parent.key, '/tls/other.key': other.key, '/tls/ca.pem': ca.caPem, '/tls/junk': 'not PEM' }
      const read = (file: string) => {
        if (!(file in files)) throw Object.assign(new Error(`ENOENT: no such file or directory, open '${file}'`), { code: 'ENOENT' })
        return files[file]!
      }
      const tlsWith = (settings: Record<string, string>) => {
        Object.assign(process.env, { TLS_CERT_FILE: '/tls/cert.pem', TLS_KEY_FILE: '/tls/key.pem', TLS_CA_FILE: '/tls/ca.pem', ...settings })
        return () => parentTlsSetting(read)
      }
      delete process.env.TLS_REQUIRE_CLIENT_CERT
      expect(tlsWith({ TLS_CERT_FILE: '/tls/gone.pem' })).toThrow('TLS_CERT_FILE: cannot read /tls/gone.pem: ENOENT')
      expect(tlsWith({ TLS_KEY_FILE: '/tls/gone.key' })).toThrow('TLS_KEY_FILE: cannot read /tls/gone.key: ENOENT')
      expect(tlsWith({ TLS_CA_FILE: 'gone-ca.pem' })).toThrow(`TLS_CA_FILE: cannot read ${path.resolve('gone-ca.pem')}: ENOENT`)
      expect(tlsWith({ TLS_CERT_FILE: '/tls/junk' })).toThrow('TLS_CERT_FILE: /tls/junk holds no PEM certificate')
      expect(tlsWith({ TLS_CERT_FILE: '/tls/key.pem' })).toThrow('TLS_CERT_FILE: /tls/key.pem holds no PEM certificate')
      expect(tlsWith({ TLS_KEY_FILE: '/tls/junk' })).toThrow('TLS_KEY_FILE: /tls/junk holds no unencrypted PEM private key')
      expect(tlsWith({ TLS_KEY_FILE: '/tls/other.key' })).toThrow('TLS_KEY_FILE is not the key of the certificate in TLS_CERT_FILE')
      expect(tlsWith({ TLS_CA_FILE: '/tls/junk' })).toThrow('TLS_CA_FILE: /tls/junk holds no PEM certificate')
      expect(tlsWith({})()).toMatchObject({ cert: parent.cert, ca: ca.caPem })
    } finally {
      for (const name of ['TLS_CERT_FILE', 'TLS_KEY_FILE', 'TLS_CA_FILE']) delete process.env[name]
      ca.close()
    }
  })

  it('takes an optional setting unset or set, and refuses one set but empty, naming it', () => {
    delete process.env.PRELOAD_FILE
    expect(optionalSetting('PRELOAD_FILE')).toBeUndefined()
    process.env.PRELOAD_FILE = '/shares.age'
    expect(optionalSetting('PRELOAD_FILE')).toBe('/shares.age')
    process.env.PRELOAD_FILE = ''
    expect(() => optionalSetting('PRELOAD_FILE')).toThrow('PRELOAD_FILE is set but empty: set it, or unset it')
    delete process.env.PRELOAD_FILE
    // An empty certificate setting is no way to plain HTTP either.
    for (const name of ['TLS_CERT_FILE', 'TLS_KEY_FILE', 'TLS_CA_FILE', 'TLS_REQUIRE_CLIENT_CERT']) delete process.env[name]
    process.env.TLS_CERT_FILE = ''
    expect(() => parentTlsSetting((file) => file)).toThrow('TLS_CERT_FILE is set but empty')
    delete process.env.TLS_CERT_FILE
  })

  it('refuses half a TLS setting rather than serve plain HTTP', () => {
    const read = (file: string) => file
    for (const name of ['TLS_CERT_FILE', 'TLS_KEY_FILE', 'TLS_CA_FILE', 'TLS_REQUIRE_CLIENT_CERT']) delete process.env[name]
    const halves: Array<Record<string, string>> = [
      { TLS_KEY_FILE: '/tls/key.pem' },
      { TLS_CERT_FILE: '/tls/cert.pem' },
      { TLS_KEY_FILE: '/tls/key.pem', TLS_CA_FILE: '/tls/ca.pem' },
      { TLS_CA_FILE: '/tls/ca.pem' },
    ]
    for (const half of halves) {
      for (const name of ['TLS_CERT_FILE', 'TLS_KEY_FILE', 'TLS_CA_FILE']) delete process.env[name]
      Object.assign(process.env, half)
      expect(() => parentTlsSetting(read)).toThrow('TLS needs both TLS_CERT_FILE and TLS_KEY_FILE (TLS_CA_FILE only with them); set neither for plain HTTP')
    }
  })
})

describe('log redaction', () => {
  it('redacts secret-named fields at any depth and secret-looking values under any name', () => {
    const line = redactSecrets({
      event: 'unlock',
      hmacSecret: 'shh',
      nested: { sessionToken: 't', list: [{ password: 'p' }, 'AGE-SECRET-KEY-1QQQQ'], keyId: 'k-1' },
      note: 'got -----BEGIN EC PRIVATE KEY----- in a message',
      dek: new Uint8Array(32),
      preloadIdentity: 'x',
      hmacKey: 'k',
      bytes: new Uint8Array(4),
      deep: { a: { b: { c: { d: { e: { f: { g: { h: { password: 'p' } } } } } } } } },
    })
    expect(line).toEqual({
      event: 'unlock',
      hmacSecret: '[redacted]',
      nested: { sessionToken: '[redacted]', list: [{ password: '[redacted]' }, '[redacted]'], keyId: 'k-1' },
      note: '[redacted]',
      dek: '[redacted]',
      preloadIdentity: '[redacted]',
      hmacKey: '[redacted]',
      bytes: '[4 bytes]',
      deep: { a: { b: { c: { d: { e: { f: { g: { h: '[truncated]' } } } } } } } },
    })
  })
})
