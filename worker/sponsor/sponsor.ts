import { hashMessage, type Address, type Hex } from 'viem'
import type { ChainConfig, Config } from '../../config/schema.js'
import { SignerError, signerErrorMessage, type SignedDigest, type Signer } from '../../backends/signer.js'
import { InvalidParamsError, outcomeOf, SignerUnavailableError, toServiceError, UnsupportedError } from '../errors.js'
import { describeZodError } from '../validation.js'
import { adapterFor } from './adapters/registry.js'
import { stubSignature, type PaymasterAdapter } from './adapters/paymasterAdapter.js'
import { resolveEntryPoint, type EntryPoint } from './entryPoints.js'
import { operationModels, type OperationModel, type PaymasterFields } from './operationModels.js'
import { checkGas, checkSender, maxCostWei, validityWindow, type ValidityWindow } from './policy.js'
import type { UserOperationV06, UserOperationV07 } from './userOperation.js'

/**
 * The sponsorship flow, the same for every transport: find the chain and
 * entry point, parse the UserOperation for that version, apply policy, then
 * hash off-chain, have the chain's signer sign the EIP-191 digest, and encode.
 */

type Operation = UserOperationV06 | UserOperationV07

export type SponsorDeps = {
  config: Config
  signerFor(chain: ChainConfig): Signer
  /** Unix seconds. */
  now(): number
  /** One structured line per signed sponsorship. */
  log(fields: Record<string, unknown>): void
  /** Spend over time; none when no quota is configured. */
  quotas?: Quotas
  /** Told how each stub, dry run and signing request ended (metrics), with the cost of each signed sponsorship. */
  observe?(observation: SponsorshipObservation): void
}

export type SponsorshipObservation = {
  request: 'stub' | 'dry_run' | 'sign'
  /** As the caller named it: possibly a chain not served. */
  chainId: number
} & ({ outcome: 'sponsored'; /** For a signature: what it puts at stake. */ maxCostWei: bigint | undefined } | { outcome: 'declined' | 'error'; reason: string })

/** One sponsorship as quotas count it. `costWei` is undefined before gas estimation (stub data): any cost at all must fit. */
export type QuotaUse = { chainId: number; sender: Address; apiKeyId: string | undefined; costWei: bigint | undefined }

export type Quotas = {
  /** Counts it against every quota, or throws QuotaExceededError having counted nothing; the answer takes it back. */
  take(use: QuotaUse): Promise<() => Promise<void>>
  /** Throws as `take` would, counting nothing (the dry run). */
  check(use: QuotaUse): Promise<void>
  /**
   * Throws QuotaExceededError as `check` would (stub data), but only logs when the counts are slow or cannot be
   * reached: the advice is not worth an outage, as signing asks again.
   */
  advise(use: QuotaUse): Promise<void>
  /** Whether a quota object can be reached now (for /health): while none can, nothing is signed. */
  health(): Promise<{ ok: true; ms: number } | { ok: false; error: string }>
}

export type SponsorRequest = {
  chainId: number
  entryPoint: Address
  /** Raw, as the caller sent it: it is parsed here, once the version is known. */
  userOperation: unknown
  /** The caller's API key, as `ApiKeys.verify` names it; undefined where none is required. */
  apiKeyId?: string
}

export type Stub = {
  entryPoint: EntryPoint
  fields: PaymasterFields
  window: ValidityWindow
}

export type Sponsorship = Stub & {
  /** The UserOperation with its paymaster fields filled in, ready for the account to sign. */
  userOperation: Operation
  userOpHash: Hex
  /** The address the paymaster signature recovers to. */
  signer: Address
  maxCostWei: bigint
}

export type Evaluation = Stub & {
  userOperation: Operation
  userOpHash: Hex
  /** The contract hash the signer would sign (before EIP-191). */
  paymasterHash: Hex
  maxCostWei: bigint
}

type Prepared = {
  chain: ChainConfig
  entryPoint: EntryPoint
  adapter: PaymasterAdapter<Operation>
  model: OperationModel<Operation>
  op: Operation
  paymaster: Address
  gasLimits: Pick<PaymasterFields, 'paymasterVerificationGasLimit' | 'paymasterPostOpGasLimit'>
  window: ValidityWindow
  /** Whose API key asked (quotas per API key count by it). */
  apiKeyId: string | undefined
}

export function findChain(config: Config, chainId: number): ChainConfig {
  const chain = config.chains.find((c) => c.chainId === chainId)
  if (!chain) {
    throw new UnsupportedError(
      `chain ${chainId} is not supported; supported chains: ${config.chains.map((c) => c.chainId).join(', ')}`,
      { reason: 'unsupported_chain', supported: config.chains.map((c) => c.chainId) },
    )
  }
  return chain
}

/**
 * Everything that does not need the signer. `forSigning` insists on the gas
 * fields the signature covers, applies the gas caps and the version's signing
 * refusals (v0.8's 7702 rule); stub requests come before gas estimation, so
 * for them only the sender is checked.
 */
function prepare({ deps, request, forSigning }: { deps: SponsorDeps; request: SponsorRequest; forSigning: boolean }): Prepared {
  const chain = findChain(deps.config, request.chainId)
  const entryPoint = resolveEntryPoint(chain, request.entryPoint)
  const paymasterConfig = chain.paymasters.find((p) => p.entryPointVersion === entryPoint.version)!
  const adapter = adapterFor(paymasterConfig.contract, entryPoint.version) as PaymasterAdapter<Operation>
  const model = operationModels[entryPoint.version] as OperationModel<Operation>

  const parsed = model.schema.safeParse(request.userOperation)
  if (!parsed.success) {
    throw new InvalidParamsError(`invalid userOperation for EntryPoint v${entryPoint.version}: ${describeZodError(parsed.error, { prefix: 'userOperation' })}`)
  }
  if (forSigning) {
    const missing = model.missingField(parsed.data as never)
    if (missing) {
      throw new InvalidParamsError(`userOperation.${missing} is required: the paymaster signature covers it`)
    }
    const refusal = model.signingRefusal?.(parsed.data as never)
    if (refusal) throw new InvalidParamsError(`invalid userOperation for EntryPoint v${entryPoint.version}: ${refusal}`)
  }
  const op = model.fromInput(parsed.data as never)
  checkSender(deps.config.policy, op.sender)

  const requested = model.requestedPaymasterGas(op)
  // The postOp limit is the paymaster's to set, not the wallet's: v0.7 charges the paymaster 10% of what goes unused
  // of it, and verifying mode never calls postOp. A wallet sends the stub's value or less; more only up to an explicit
  // maxPaymasterPostOpGasLimit. The stub answers at most that, so that what it answers is signed.
  const { policy } = deps.config
  const ownPostOpGasLimit = paymasterConfig.postOpGasLimit ?? adapter.defaultGas.postOpGasLimit
  const maxPaymasterPostOpGasLimit = policy.gas.maxPaymasterPostOpGasLimit ?? ownPostOpGasLimit
  const postOpGasLimit = requested.postOpGasLimit ?? ownPostOpGasLimit
  const gasLimits = {
    paymasterVerificationGasLimit:
      requested.verificationGasLimit ?? paymasterConfig.verificationGasLimit ?? adapter.defaultGas.verificationGasLimit,
    paymasterPostOpGasLimit: forSigning || postOpGasLimit <= maxPaymasterPostOpGasLimit ? postOpGasLimit : maxPaymasterPostOpGasLimit,
  }
  if (forSigning) checkGas({ ...policy, gas: { ...policy.gas, maxPaymasterPostOpGasLimit } }, entryPoint.version, model.gas(op, gasLimits))

  return {
    chain,
    entryPoint,
    adapter,
    model,
    op,
    paymaster: paymasterConfig.address,
    gasLimits,
    window: validityWindow(deps.config.policy, deps.now()),
    apiKeyId: request.apiKeyId,
  }
}

function fieldsOf(prepared: Prepared, signature: Hex): PaymasterFields {
  return {
    paymaster: prepared.paymaster,
    paymasterData: prepared.adapter.paymasterData({ window: prepared.window, signature }),
    ...prepared.gasLimits,
  }
}

function paymasterHash(prepared: Prepared): Hex {
  const { adapter, model, op, window, paymaster, chain } = prepared
  // The hash covers the paymaster address and gas limits as they will be sent.
  const withPaymaster = model.withPaymaster(op, fieldsOf(prepared, '0x'))
  return adapter.hash({ op: withPaymaster, chainId: chain.chainId, paymaster, window })
}

/** The UserOperation with its paymaster fields, and the EntryPoint's hash of it. */
function finalize(prepared: Prepared, fields: PaymasterFields) {
  const userOperation = prepared.model.withPaymaster(prepared.op, fields)
  const userOpHash = prepared.model.userOpHash({ op: userOperation, chainId: prepared.chain.chainId, entryPoint: prepared.entryPoint.address })
  return { entryPoint: prepared.entryPoint, window: prepared.window, fields, userOperation, userOpHash }
}

/**
 * ERC-7677 stub data: the final layout with a stand-in signature, for gas estimation. A sender or API key whose quota
 * is used up is declined here already, so that a wallet does not estimate gas for an operation that will not be
 * sponsored; nothing is counted. That check is advice only (signing checks again, and signs nothing uncounted), so
 * counts that cannot be reached do not hold up stub data.
 */
export function stubFor(deps: SponsorDeps, request: SponsorRequest): Promise<Stub> {
  return observed({ deps, request, kind: 'stub', run: stub })
}

async function stub(deps: SponsorDeps, request: SponsorRequest): Promise<Stub> {
  const prepared = prepare({ deps, request, forSigning: false })
  await deps.quotas?.advise(quotaUseOf(prepared, undefined))
  return { entryPoint: prepared.entryPoint, fields: fieldsOf(prepared, stubSignature), window: prepared.window }
}

/** Runs one request and tells `deps.observe` how it ended. */
async function observed<T>(options: {
  deps: SponsorDeps
  request: SponsorRequest
  kind: SponsorshipObservation['request']
  run: (deps: SponsorDeps, request: SponsorRequest) => Promise<T>
  /** What a signed sponsorship put at stake. */
  costWeiOf?: (result: T) => bigint
}): Promise<T> {
  const { deps, request, kind, run, costWeiOf } = options
  let result: T
  try {
    result = await run(deps, request)
  } catch (error) {
    const failure = toServiceError(error)
    deps.observe?.({ request: kind, chainId: request.chainId, outcome: outcomeOf(failure), reason: failure.data?.reason ?? failure.kind })
    throw error
  }
  deps.observe?.({ request: kind, chainId: request.chainId, outcome: 'sponsored', maxCostWei: costWeiOf?.(result) })
  return result
}

function quotaUseOf(prepared: Prepared, costWei: bigint | undefined): QuotaUse {
  return { chainId: prepared.chain.chainId, sender: prepared.op.sender, apiKeyId: prepared.apiKeyId, costWei }
}

function costOf(prepared: Prepared): bigint {
  return maxCostWei(prepared.entryPoint.version, prepared.model.gas(prepared.op, prepared.gasLimits))
}

/** Policy, quotas, hashes and the would-be paymaster data, without signing or counting (the REST `process` dry run). */
export function evaluate(deps: SponsorDeps, request: SponsorRequest): Promise<Evaluation> {
  return observed({ deps, request, kind: 'dry_run', run: dryRun })
}

async function dryRun(deps: SponsorDeps, request: SponsorRequest): Promise<Evaluation> {
  const prepared = prepare({ deps, request, forSigning: true })
  const costWei = costOf(prepared)
  await deps.quotas?.check(quotaUseOf(prepared, costWei))
  return {
    ...finalize(prepared, fieldsOf(prepared, stubSignature)),
    paymasterHash: paymasterHash(prepared),
    maxCostWei: costWei,
  }
}

/** Signs a sponsorship the paymaster contract accepts. A declined request never reaches the signer. */
export function sponsor(deps: SponsorDeps, request: SponsorRequest): Promise<Sponsorship> {
  return observed({ deps, request, kind: 'sign', run: sign, costWeiOf: (sponsorship) => sponsorship.maxCostWei })
}

async function sign(deps: SponsorDeps, request: SponsorRequest): Promise<Sponsorship> {
  const prepared = prepare({ deps, request, forSigning: true })
  const digest = hashMessage({ raw: paymasterHash(prepared) })
  const signer = deps.signerFor(prepared.chain)
  const maxCostWei = costOf(prepared)
  const release = await deps.quotas?.take(quotaUseOf(prepared, maxCostWei))
  const started = Date.now()
  let signed: SignedDigest
  try {
    signed = await signer.signDigest(digest)
  } catch (error) {
    await release?.()
    const retryable = error instanceof SignerError && error.options.retryable
    throw new SignerUnavailableError(
      `signer unavailable: signer ${signer.describe().name} could not sign${retryable ? '; try again shortly' : ''}`,
      { reason: 'signer_unavailable', signer: signer.describe().name, retryable },
      signerErrorMessage(error),
    )
  }
  const sponsorship = { ...finalize(prepared, fieldsOf(prepared, signed.signature)), signer: signed.address, maxCostWei }
  deps.log({
    event: 'sponsorship',
    chainId: prepared.chain.chainId,
    entryPointVersion: prepared.entryPoint.version,
    sender: prepared.op.sender,
    userOpHash: sponsorship.userOpHash,
    signedBy: signed.signedBy,
    signMs: Date.now() - started,
    maxCostWei: maxCostWei.toString(),
    ...(prepared.apiKeyId ? { apiKeyId: prepared.apiKeyId } : {}),
  })
  return sponsorship
}
