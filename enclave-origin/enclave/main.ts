import { constants } from 'node:fs'
import { access, stat } from 'node:fs/promises'
import { resolve } from 'node:path'
import { addressSetting, cannotReadError, choiceSetting, formatLogLine, integerSetting, optionalSetting, setting } from '../config.js'
import { keepRequestObjectsYoung } from '../heapTuning.js'
import { developmentAttestation, KmsDataKeys } from './dataKey.js'
import { DeliveredCredentials } from './deliveredCredentials.js'
import { SignEngine } from './engine.js'
import { KeyCache, steadyWallClock } from './keyCache.js'
import { auditLogger, LogRing } from './logRing.js'
import { enclaveKmsClient, kmsTlsFor } from './kmsClient.js'
import { memoryWatch } from './memory.js'
import { openNitroAttestation } from './nitroAttestation.js'
import { EnclaveService, serveEnclave } from './server.js'
import { checkStartup } from './startupChecks.js'

/**
 * The enclave process. Settings: ORIGIN_PROFILE (development|production),
 * ENCLAVE_ATTESTATION (nitro|none; production's default is nitro, development's none),
 * ENCLAVE_LISTEN (vsock:CID:PORT in an enclave, host:port, or a socket path), KMS_KEY_ID, KMS_REGION,
 * KMS_ENDPOINT (optional), KMS_TUNNEL (optional: vsock:CID:PORT, host:port or a socket path that
 * carries each KMS connection to the parent, where a forwarder such as vsock-proxy reaches KMS;
 * TLS stays end to end with KMS), KMS_TIMEOUT_MS (3000, per KMS request, two attempts). AWS
 * credentials come from the parent (CREDENTIALS), not settings.
 * ENGINE_THREADS, ENGINE_BATCHING (1|0), ENGINE_MAX_BATCH (32), ENGINE_MAX_WAIT_MS (1),
 * ENGINE_INLINE_PER_TURN, GRACE_SIGNATURES, ENCLAVE_MAX_CONNECTIONS (256: more are closed as they
 * arrive), ENCLAVE_LOG_BUFFER_BYTES (4 MiB of log lines kept for the parent to collect), and PRELOAD_FILE for
 * preload mode (an age-encrypted [{account_id, share}] file whose identity an
 * unlock delivers).
 */
export async function runEnclave(): Promise<() => Promise<void>> {
  keepRequestObjectsYoung()
  // Every line goes to stdout (a console, where there is one) and to the lines the parent collects and logs.
  const logs = new LogRing({ maxBytes: integerSetting('ENCLAVE_LOG_BUFFER_BYTES', { min: 65_536, max: 1_073_741_824, fallback: 4 * 1_048_576 }) })
  const logLine = (fields: Record<string, unknown>, options?: { mustDeliver?: boolean }) => {
    const line = formatLogLine(fields)
    // Kept first: an audit line the ring refuses throws before stdout shows what was then not done.
    logs.write(line, options)
    console.log(line)
  }
  const profile = choiceSetting('ORIGIN_PROFILE', { choices: ['development', 'production'], fallback: 'development' })
  const nitro = choiceSetting('ENCLAVE_ATTESTATION', { choices: ['nitro', 'none'], fallback: profile === 'production' ? 'nitro' : 'none' }) === 'nitro' ? openNitroAttestation() : undefined
  const attestation = nitro ?? developmentAttestation
  const kmsKeyId = setting('KMS_KEY_ID')
  const kmsEndpoint = optionalSetting('KMS_ENDPOINT')
  await checkStartup({ profile, profileByDefault: process.env.ORIGIN_PROFILE === undefined, attestation, kmsKeyId, kmsEndpoint, warn: (message) => logLine({ level: 'warn', event: 'startup', message }) })
  if (nitro) logLine({ event: 'nitro_attestation', module: nitro.module })
  // Checked before anything starts: a bad one must not wait for the signing threads.
  const address = addressSetting('ENCLAVE_LISTEN', setting('ENCLAVE_LISTEN', '127.0.0.1:7000'))
  const maxConnections = integerSetting('ENCLAVE_MAX_CONNECTIONS', { min: 1, max: 65_536, fallback: 256 })
  const preloadFile = optionalSetting('PRELOAD_FILE')
  // Read only once an unlock brings its identity; a path that names no readable file is said now, not then.
  if (preloadFile !== undefined) {
    // Looked at, not opened: opening a FIFO would wait for a writer. Named in full: a relative one is the cwd's.
    const cannotRead = (error: unknown) => {
      throw cannotReadError('PRELOAD_FILE', preloadFile, error)
    }
    if (!(await stat(preloadFile).catch(cannotRead)).isFile()) throw new Error(`PRELOAD_FILE: ${resolve(preloadFile)} is not a file`)
    await access(preloadFile, constants.R_OK).catch(cannotRead)
  }
  const kmsTunnel = optionalSetting('KMS_TUNNEL')
  const credentials = new DeliveredCredentials()
  const kmsTimeoutMs = integerSetting('KMS_TIMEOUT_MS', { min: 100, max: 60_000, fallback: 3_000 })
  const client = enclaveKmsClient({
    region: setting('KMS_REGION', 'us-east-1'),
    endpoint: kmsEndpoint,
    credentials,
    timeoutMs: kmsTimeoutMs,
    tunnel: kmsTunnel === undefined ? undefined : addressSetting('KMS_TUNNEL', kmsTunnel),
    tls: kmsTlsFor(profile),
  })
  // Two attempts, each connecting and waiting for the answer's head within KMS_TIMEOUT_MS: four of them in all.
  const dataKeys = new KmsDataKeys({ client, kmsKeyId, attestation, callTimeoutMs: 4 * kmsTimeoutMs })
  const engine = new SignEngine({
    // Unset: the engine's own default, one thread per core.
    threads: process.env.ENGINE_THREADS ? integerSetting('ENGINE_THREADS', { min: 1, max: 256 }) : undefined,
    batching: choiceSetting('ENGINE_BATCHING', { choices: ['0', '1'], fallback: '1' }) === '1',
    maxBatch: integerSetting('ENGINE_MAX_BATCH', { min: 1, max: 256, fallback: 32 }),
    // Whole milliseconds: a Node timer waits at least 1 ms, whatever it is asked.
    maxWaitMs: integerSetting('ENGINE_MAX_WAIT_MS', { min: 1, max: 100, fallback: 1 }),
    inlinePerTurn: optionalSetting('ENGINE_INLINE_PER_TURN') === undefined ? undefined : integerSetting('ENGINE_INLINE_PER_TURN', { min: 0, max: 64 }),
    log: logLine,
  })
  await engine.start()
  let service: EnclaveService | undefined
  const cache = new KeyCache({
    now: steadyWallClock,
    unlock: () => service!.unwrapLastDataKeys(),
    graceSignatures: integerSetting('GRACE_SIGNATURES', { min: 0, max: 1_000_000, fallback: 0 }),
    audit: auditLogger(logLine),
  })
  service = new EnclaveService({ cache, engine, dataKeys, kmsKeyId, credentials, attestation, preloadFile, log: logLine, logs })
  const memory = memoryWatch({ log: logLine })
  // A sweep step over at most 5,000 keys (about half a millisecond) and 128 refreshes: 50,000 keys every 2.5 s.
  const sweep = setInterval(() => cache.sweepKeys({ maxKeys: 5_000, maxRefreshes: 128 }), 250)
  // The DEK and memory every 5 s, so a failing KMS is asked no more often than that.
  const renew = setInterval(() => {
    cache.renewDataKeyIfDue()
    memory.check()
  }, 5_000)
  sweep.unref()
  renew.unref()
  const { close } = await serveEnclave({ service, address, log: logLine, maxConnections })
  logLine({ event: 'enclave_listening', address, profile, engine: engine.stats(), ...(preloadFile !== undefined && { preloadFile, preload: 'waiting for an unlock with its age identity' }) })
  return async () => {
    clearInterval(sweep)
    clearInterval(renew)
    await close()
    await engine.stop()
    cache.clear()
    service.clear()
    nitro?.close()
  }
}
