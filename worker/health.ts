import {
  BaseError,
  createPublicClient,
  decodeFunctionResult,
  encodeFunctionData,
  ExecutionRevertedError,
  http,
  RpcRequestError,
  type Address,
  type Hex,
  type PublicClient,
  type Transport,
} from 'viem'
import { ConfigError } from '../config/load.js'
import { keepsSignerSet, type ChainConfig, type EntryPointVersion, type PaymasterContract } from '../config/schema.js'
import { SharedLoad } from '../backends/sharedLoad.js'
import { SignerError, type SignerHealth } from '../backends/signer.js'
import { stubSignature, type PaymasterAdapter } from './sponsor/adapters/paymasterAdapter.js'
import { adapterFor, otherAdapters } from './sponsor/adapters/registry.js'
import { supportedEntryPoints } from './sponsor/entryPoints.js'
import { operationModels } from './sponsor/operationModels.js'
import type { UserOperationV06, UserOperationV07 } from './sponsor/userOperation.js'
import { servicesFor, type Env } from './services.js'

/**
 * What `/health` reports, never a secret:
 * - `ok`: every chain's signer can sign and every backend is healthy;
 * - `degraded`: every chain can still be served, but a backend (say a fallback's backup) is down, a
 *   Pimlico paymaster does not list one of our addresses as a signer, or a paymaster's on-chain `getHash` is not the
 *   hash we sign (or could not be read);
 * - `unavailable`: some chain's signer cannot sign, or a quota object cannot be reached (then nothing is signed);
 *   `misconfigured`: the configuration is invalid.
 */
export async function healthReport(env: Env) {
  let services
  try {
    services = servicesFor(env)
  } catch (error) {
    if (error instanceof ConfigError) return { status: 'misconfigured' as const, error: error.message }
    throw error
  }
  // Fallback members are reported inside their fallback, which probes them once, unless a chain uses one directly.
  const chainSigners = new Set(services.config.chains.map((chain) => chain.signer))
  const members = new Set(Object.values(services.config.signers).flatMap((signer) => (signer.kind === 'fallback' ? signer.members : [])))
  const [signers, quotas] = await Promise.all([
    Promise.all(
      [...services.signers]
        .filter(([name]) => chainSigners.has(name) || !members.has(name))
        .map(async ([, signer]) => ({ ...signer.describe(), ...(await signer.health()) })),
    ),
    services.sponsor.quotas?.health(),
  ])
  const healthOf = (name: string) => signers.find((s) => s.name === name)!
  // One report's RPC requests, every chain's, take turns: a Worker holds six connections open at a time, and a
  // request queued behind them would spend its timeout waiting (no batching: some RPCs refuse batches).
  const rpcTurns = turns(4)
  const chains = await Promise.all(
    services.config.chains.map(async (chain) => ({
      chainId: chain.chainId,
      signer: chain.signer,
      entryPoints: supportedEntryPoints(chain),
      paymasters: chain.paymasters.map((p) => ({ entryPointVersion: p.entryPointVersion, contract: p.contract, address: p.address })),
      ...(chain.rpcUrl ? await chainChecks(chain, healthOf(chain.signer), rpcTurns) : {}),
    })),
  )
  const canSign = services.config.chains.every((chain) => healthOf(chain.signer).ok) && quotas?.ok !== false
  const everythingOk =
    signers.every((s) => s.ok && (s.members ?? []).every((m) => m.ok && m.state === 'closed')) &&
    chains.every((c) => (c.signerAuthorisation ?? []).every((a) => a.authorised === true) && (c.paymasterHashes ?? []).every((h) => h.agrees === true))
  return {
    status: !canSign ? ('unavailable' as const) : everythingOk ? ('ok' as const) : ('degraded' as const),
    profile: services.config.profile,
    signers,
    // Absent (undefined, so left out of the JSON) where no quota is configured.
    quotas,
    chains,
  }
}

type HealthReport = Awaited<ReturnType<typeof healthReport>>
const recentReports = new WeakMap<object, SharedLoad<HealthReport>>()

/**
 * The status of one report per env at most every 5 s (the answer of `/health` to all but operators), shared while
 * it is made. A report still under way after 2 minutes (past the slowest backend the config allows, a Vault read of
 * three 30 s requests, and the chain check; in workerd it may belong to a request that has gone) is not waited
 * for: the status is then `unavailable`, and the next call makes another.
 */
export async function recentHealthStatus(env: Env): Promise<HealthReport['status'] | 'unavailable'> {
  let reports = recentReports.get(env)
  if (!reports) {
    reports = new SharedLoad({ load: () => healthReport(env), abandonAfterMs: 120_000, keepMs: 5_000, what: 'health report' })
    recentReports.set(env, reports)
  }
  return reports.get().then(
    (report) => report.status,
    (error: unknown) => {
      if (error instanceof SignerError) return 'unavailable' as const
      throw error
    },
  )
}

const signersAbi = [
  { type: 'function', name: 'signers', stateMutability: 'view', inputs: [{ name: 'account', type: 'address' }], outputs: [{ type: 'bool' }] },
] as const

/** What /health reads over a chain's RPC (only /health pays for it, never a sponsorship). */
async function chainChecks(chain: ChainConfig, health: SignerHealth, rpcTurns: Turns) {
  // No CCIP-Read: a contract at a configured address must not send /health to URLs of its choosing.
  const client = createPublicClient({ transport: takingTurns(http(chain.rpcUrl, { timeout: 3_000, retryCount: 0 }), rpcTurns), ccipRead: false })
  const [signerAuthorisation, paymasterHashes] = await Promise.all([signersAuthorised(chain, health, client), hashAgreement(chain, client)])
  return { signerAuthorisation, paymasterHashes }
}

/** Runs tasks at most `limit` at once, for whoever shares it. */
type Turns = <T>(task: () => Promise<T>) => Promise<T>

function turns(limit: number): Turns {
  let active = 0
  const waiting: Array<() => void> = []
  return async (task) => {
    while (active >= limit) await new Promise<void>((turn) => waiting.push(turn))
    active += 1
    try {
      return await task()
    } finally {
      active -= 1
      waiting.shift()?.()
    }
  }
}

/** `transport`, each request in its turn (its own timeout starts only then). */
function takingTurns(transport: Transport, inTurn: Turns): Transport {
  return (options) => {
    const inner = transport(options)
    const request: typeof inner.request = (args, requestOptions) => inTurn(() => inner.request(args, requestOptions))
    return { ...inner, request }
  }
}

/**
 * A Pimlico SingletonPaymaster keeps a set of signers: each backend's address
 * must be in it, or the backend's signatures fail on chain (AA34).
 */
async function signersAuthorised(chain: ChainConfig, health: SignerHealth, client: PublicClient) {
  const members: Array<{ name: string; address?: Address }> = health.members ?? [{ name: chain.signer, address: health.ok ? health.address : undefined }]
  const singletons = chain.paymasters.filter((p) => keepsSignerSet(p.contract))
  return Promise.all(
    singletons.flatMap((paymaster) =>
      members.map(async (member) => {
        const base = { paymaster: paymaster.address, backend: member.name, address: member.address ?? null }
        if (!member.address) return { ...base, authorised: null, error: 'backend address unknown' }
        try {
          const authorised = await client.readContract({ address: paymaster.address, abi: signersAbi, functionName: 'signers', args: [member.address] })
          return { ...base, authorised }
        } catch {
          return { ...base, authorised: null, error: 'could not read signers() over the chain RPC' }
        }
      }),
    ),
  )
}

/** The window and operation /health asks each paymaster to hash: any will do, as long as both sides hash the same. */
const probe = {
  window: { validUntil: 1_900_000_000, validAfter: 1_700_000_000 },
  operation: {
    sender: '0x8ba1f109551bD432803012645Ac136ddd64DBA72',
    nonce: 7n,
    callData: '0xb61d27f6',
    callGasLimit: 250_000n,
    verificationGasLimit: 1_000_000n,
    preVerificationGas: 90_000n,
    maxFeePerGas: 30_000_000_000n,
    maxPriorityFeePerGas: 2_000_000_000n,
    signature: '0x',
  },
} as const

/**
 * Each paymaster's own `getHash`, on chain, against the hash we would sign for the same operation: they differ when
 * the deployed contract is not the one the config names (the other build of Pimlico's V8, say: the error then hints
 * at the family that hashes as it does), or the chain is not the config's (its id is in the hash). Every signature would
 * then fail (AA34).
 * A call that reverts, or finds no code, says the contract there is not of the config's kind, or not there at all.
 */
async function hashAgreement(chain: ChainConfig, client: PublicClient) {
  return Promise.all(
    chain.paymasters.map(async ({ entryPointVersion, contract, address: paymaster }) => {
      const base = { paymaster, entryPointVersion, contract }
      try {
        const { ours, call } = probeFor({ adapter: adapterFor(contract, entryPointVersion), chainId: chain.chainId, paymaster })
        const theirs = await onChainHash(client, paymaster, call)
        if ('failure' in theirs) {
          const notHere = `no ${contract} paymaster for v${entryPointVersion} at this address on the RPC's chain`
          const error = {
            unreachable: 'could not call getHash over the chain RPC',
            reverted: `getHash reverted: ${notHere}`,
            nothing: `getHash returned nothing (no code there, or a contract without it): ${notHere}`,
            'not a hash': `getHash answered something that is not a hash: ${notHere}`,
          }[theirs.failure]
          return { ...base, agrees: null, error }
        }
        if (theirs.hash === ours()) return { ...base, agrees: true }
        const lookalike = familyHashingAs({ theirs: theirs.hash, call, contract, entryPointVersion, chainId: chain.chainId, paymaster })
        // A hint, not a verdict: a contract for another EntryPoint version may hash alike (the mock V8 hashes as V7).
        const hint = lookalike ? `; it hashes as ${lookalike} does at v${entryPointVersion}: if that is the contract there, configure it so` : ''
        return { ...base, agrees: false, error: `its getHash is not the hash signed for ${contract} on chain ${chain.chainId}: signatures would fail (AA34)${hint}` }
      } catch {
        return { ...base, agrees: null, error: 'could not work out the hash to compare' }
      }
    }),
  )
}

/**
 * The probe operation as `adapter` would sign it for `paymaster`: the call of the contract's own getHash, and the hash
 * we would sign (worked out when asked).
 */
function probeFor({ adapter, chainId, paymaster }: { adapter: PaymasterAdapter<never>; chainId: number; paymaster: Address }) {
  const { entryPointVersion } = adapter
  const fields = {
    paymaster,
    paymasterData: adapter.paymasterData({ window: probe.window, signature: stubSignature }),
    paymasterVerificationGasLimit: adapter.defaultGas.verificationGasLimit,
    paymasterPostOpGasLimit: adapter.defaultGas.postOpGasLimit,
  }
  const bare = entryPointVersion === '0.6' ? ({ ...probe.operation, initCode: '0x', paymasterAndData: '0x' } satisfies UserOperationV06) : (probe.operation satisfies UserOperationV07)
  const op = operationModels[entryPointVersion].withPaymaster(bare as never, fields) as never
  return { call: adapter.getHashCall({ op, window: probe.window }), ours: () => adapter.hash({ op, chainId, paymaster, window: probe.window }) }
}

/**
 * Another family at the version whose hash, for the very call the contract answered, is the contract's: what the
 * contract there may be instead. Only families that make the same call are compared, so no RPC is made; one that
 * cannot be worked out is passed over.
 */
function familyHashingAs(args: {
  theirs: Hex
  call: ReturnType<PaymasterAdapter<never>['getHashCall']>
  contract: PaymasterContract
  entryPointVersion: EntryPointVersion
  chainId: number
  paymaster: Address
}): PaymasterContract | undefined {
  const calldata = encodeFunctionData(args.call as never)
  return otherAdapters(args.contract, args.entryPointVersion).find((other) => {
    try {
      const candidate = probeFor({ adapter: other, chainId: args.chainId, paymaster: args.paymaster })
      return encodeFunctionData(candidate.call as never) === calldata && candidate.ours() === args.theirs
    } catch {
      return false
    }
  })?.contract
}

/**
 * Whether a failed call is the node saying the EVM reverted, in any client's words: code 3 or "execution reverted"
 * (geth, anvil, newer Nethermind; viem makes these an ExecutionRevertedError), -32015 "VM execution error." (older
 * Nethermind, for any failure in the EVM), or
 * "revert" in the message or data (Hardhat's "VM Exception while processing transaction: reverted with …"). Only in a
 * JSON-RPC error: an HTTP error page that says the same words is the RPC's own failure.
 */
function isRevertAnswer(error: unknown): boolean {
  if (!(error instanceof BaseError)) return false
  const answer = error.walk((cause) => cause instanceof RpcRequestError) as RpcRequestError | null
  if (!answer) return false
  if (error.walk((cause) => cause instanceof ExecutionRevertedError)) return true
  return answer.code === -32015 || /revert/i.test(`${answer.details} ${typeof answer.data === 'string' ? answer.data : ''}`)
}

/** The contract's answer to `call`, or why there is none: the RPC failed, the call reverted, returned nothing, or no hash. */
async function onChainHash(
  client: PublicClient,
  to: Address,
  call: ReturnType<PaymasterAdapter<never>['getHashCall']>,
): Promise<{ hash: Hex } | { failure: 'unreachable' | 'reverted' | 'nothing' | 'not a hash' }> {
  let data: Hex | undefined
  try {
    ;({ data } = await client.call({ to, data: encodeFunctionData(call as never) }))
  } catch (error) {
    return { failure: isRevertAnswer(error) ? 'reverted' : 'unreachable' }
  }
  if (!data || data === '0x') return { failure: 'nothing' }
  try {
    return { hash: decodeFunctionResult({ ...call, data } as never) as Hex }
  } catch {
    return { failure: 'not a hash' }
  }
}
