import { readFileSync } from 'node:fs'
import { createServer, type ListenOptions, type Server } from 'node:net'
import { resolve } from 'node:path'
import { addressSetting, choiceSetting, enclavesSetting, hmacKeysSetting, integerSetting, logLine, optionalSetting, parentTlsSetting, setting, signOnlyKeyIdsSetting } from '../config.js'
import { messageOf } from '../errors.js'
import { keepRequestObjectsYoung } from '../heapTuning.js'
import { nodeHashing } from '../protocol/nodeHashing.js'
import { RequestVerifier } from '../protocol/requestSigning.js'
import { defaultProvider } from '@aws-sdk/credential-provider-node'
import { openDiskBlobStore } from './diskBlobStore.js'
import { openS3BlobStore, parentS3Client } from './s3BlobStore.js'
import { createParentServers } from './httpApi.js'
import { OriginParent } from './origin.js'

/**
 * The parent process. Settings: PARENT_LISTEN (host:port or a Unix socket path), ENCLAVES
 * ("id=host:port,id2=/path/to.sock"), STORE (disk|s3) with STORE_DIR, or
 * S3_BUCKET, S3_PREFIX, S3_REGION, S3_ENDPOINT, S3_TIMEOUT_MS (5000, per attempt) and AWS_* credentials, ORIGIN_HMAC_KEYS
 * ("keyId:secret,…"), ORIGIN_SIGN_ONLY_KEY_IDS (those of its key ids that may only sign and read keys), POOL_SIZE (16), REQUEST_TIMEOUT_MS (2000), KMS_REQUEST_TIMEOUT_MS (15000,
 * for the enclave requests that wait on KMS: unlock, new data key), CREDENTIAL_REFRESH_MS (300000: how
 * often the enclaves get the AWS credentials for their KMS calls, from this process's default
 * chain, again; also before every unlock), MAX_INFLIGHT_PER_ENCLAVE (1024: signs, gets and creates
 * served on one enclave at once, beyond which more are answered 503), MAX_CONNECTIONS (10000 client
 * connections), OPERATOR_LISTEN (a second address, for operators, whose OPERATOR_MAX_CONNECTIONS, 64, client
 * connections cannot take), STORE_TIMEOUT_MS (10000: how long a create or state change waits for the store before it
 * is answered 503, and each read of the store outside a sign, get or unlock waits before it fails), ENCLAVE_LOG_POLL_MS (1000: how often each
 * enclave's log lines are collected into this process's log), and for TLS TLS_CERT_FILE, TLS_KEY_FILE, TLS_CA_FILE,
 * TLS_REQUIRE_CLIENT_CERT=1.
 */
export async function runParent(): Promise<() => Promise<void>> {
  keepRequestObjectsYoung()
  const enclaves = enclavesSetting()
  // Settings first: a wrong one should stop the process before it touches the store or an enclave.
  const secrets = hmacKeysSetting()
  const signOnlyKeyIds = signOnlyKeyIdsSetting(secrets)
  // Made first: the process before this one may have accepted requests timestamped up to 5 s past its end, which
  // this one refuses; it listens once that time has passed (starting the enclaves mostly takes it anyway).
  const verifier = new RequestVerifier({ secrets, hashing: nodeHashing })
  const tls = parentTlsSetting((file) => readFileSync(file, 'utf8'))
  const maxInflightPerEnclave = integerSetting('MAX_INFLIGHT_PER_ENCLAVE', { min: 1, max: 1_000_000, fallback: 1_024 })
  const maxConnections = integerSetting('MAX_CONNECTIONS', { min: 1, max: 1_000_000, fallback: 10_000 })
  const address = parentListenAddress('PARENT_LISTEN', setting('PARENT_LISTEN', '127.0.0.1:8443'))
  const operatorListen = optionalSetting('OPERATOR_LISTEN')
  const operatorAddress = operatorListen === undefined ? undefined : parentListenAddress('OPERATOR_LISTEN', operatorListen)
  const operatorMaxConnections = integerSetting('OPERATOR_MAX_CONNECTIONS', { min: 1, max: 1_000_000, fallback: 64 })
  const parentSettings = {
    poolSize: integerSetting('POOL_SIZE', { min: 1, max: 256, fallback: 16 }),
    requestTimeoutMs: integerSetting('REQUEST_TIMEOUT_MS', { min: 10, max: 60_000, fallback: 2_000 }),
    kmsRequestTimeoutMs: integerSetting('KMS_REQUEST_TIMEOUT_MS', { min: 100, max: 300_000, fallback: 15_000 }),
    credentialRefreshMs: integerSetting('CREDENTIAL_REFRESH_MS', { min: 1_000, max: 3_600_000, fallback: 300_000 }),
    storeTimeoutMs: integerSetting('STORE_TIMEOUT_MS', { min: 100, max: 300_000, fallback: 10_000 }),
    logPollMs: integerSetting('ENCLAVE_LOG_POLL_MS', { min: 100, max: 60_000, fallback: 1_000 }),
  }
  const storeSettings =
    choiceSetting('STORE', { choices: ['disk', 's3'], fallback: 'disk' }) === 's3'
      ? {
          kind: 's3' as const,
          client: {
            region: setting('S3_REGION', 'us-east-1'),
            endpoint: optionalSetting('S3_ENDPOINT'),
            timeoutMs: integerSetting('S3_TIMEOUT_MS', { min: 100, max: 60_000, fallback: 5_000 }),
          },
          bucket: setting('S3_BUCKET'),
          prefix: process.env.S3_PREFIX ?? '',
        }
      : { kind: 'disk' as const, directory: setting('STORE_DIR') }
  // Before the store is opened (a first start makes it, and asks KMS for its data key): a port in use stops the start here.
  // Only a try: the listeners are made once the parent has started, and say so again should the port be taken meanwhile.
  await tryListening([['OPERATOR_LISTEN', operatorAddress], ['PARENT_LISTEN', address]])
  // Only now, every setting read: the store is opened (a disk store replayed and locked) once they all check out.
  const store =
    storeSettings.kind === 's3'
      ? await openS3BlobStore({ client: parentS3Client(storeSettings.client), bucket: storeSettings.bucket, prefix: storeSettings.prefix })
      : await openDiskBlobStore({
          directory: storeSettings.directory,
          onCompaction: ({ outcome, ...details }) =>
            logLine(outcome === 'compacted' ? { event: 'blob_store_compacted', ...details } : { level: 'error', event: 'blob_store_compaction_failed', ...details }),
          onDamage: (damage) => logLine({ level: 'error', event: 'blob_store_damaged', ...damage }),
          onDataKeyFromCopies: (restored) => logLine({ level: 'error', event: 'blob_store_data_key_from_copies', ...restored }),
        })
  const parent = new OriginParent({
    enclaves,
    store,
    ...parentSettings,
    // The SDK's own chain (AWS_* variables, profiles, the instance's role through IMDS), refreshed before expiry.
    credentials: defaultProvider(),
    maxInflightPerEnclave,
    log: logLine,
  })
  await parent.start()
  const servers = createParentServers({ parent, verifier, log: logLine, tls, maxConnections, signOnlyKeyIds, operatorMaxConnections })
  const servingIn = verifier.msUntilServing()
  if (servingIn > 0) await new Promise((resolve) => setTimeout(resolve, servingIn))
  // Operators' first: one that cannot listen stops the process before clients could reach it, and says which.
  if (operatorAddress) await servers.operators.listen(operatorAddress).catch(cannotListen('OPERATOR_LISTEN'))
  await servers.clients.listen(address).catch(cannotListen('PARENT_LISTEN'))
  // Where the keys are, in full: a relative STORE_DIR read from another directory would be a new, empty store.
  const storeAt = storeSettings.kind === 's3' ? { bucket: storeSettings.bucket, prefix: storeSettings.prefix } : { directory: resolve(storeSettings.directory) }
  // The sign-only key ids too: left unset, every key may freeze, unlock and rotate, which an operator should see.
  logLine({
    event: 'parent_listening',
    address,
    ...(operatorAddress && { operatorAddress }),
    enclaves: enclaves.map((e) => e.id),
    tls: Boolean(tls),
    store: { kind: storeSettings.kind, ...storeAt },
    signOnlyKeyIds: [...signOnlyKeyIds],
  })
  return async () => {
    // Requests in flight (a create whose record is durable, a signature) are answered, not cut off.
    await Promise.all([servers.clients, servers.operators].filter((server) => server.listening).map((server) => server.close({ drainMs: 5_000 })))
    parent.close()
    await store.close()
  }
}

/** Why the address of setting `name` cannot be listened on (in use, say), as the error a listen's failure becomes. */
function cannotListen(name: string): (error: unknown) => never {
  return (error) => {
    throw new Error(`${name}: cannot listen there: ${messageOf(error)}`)
  }
}

/**
 * Listens on each setting's address (those set), all at once as the parent will, and stops: it fails as the parent's
 * own listeners would, two settings on one address included.
 */
async function tryListening(settings: Array<[name: string, address: ListenOptions | undefined]>): Promise<void> {
  const servers: Server[] = []
  try {
    for (const [name, address] of settings) {
      if (address === undefined) continue
      const server = createServer()
      await new Promise<void>((listening, failed) => {
        server.once('error', failed)
        server.listen(address, listening)
      }).catch(cannotListen(name))
      servers.push(server)
    }
  } finally {
    await Promise.all(servers.map((server) => new Promise((closed) => server.close(closed))))
  }
}

/** The address setting `name` gives, which must be one the parent can listen on. */
function parentListenAddress(name: string, value: string) {
  const address = addressSetting(name, value)
  if ('vsock' in address) throw new Error(`${name} must be host:port or a Unix socket path: the parent does not listen on vsock`)
  return address
}
