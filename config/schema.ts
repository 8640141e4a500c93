import { z } from 'zod'
import { addressSchema } from '../worker/sponsor/hexSchemas.js'

/**
 * The whole configuration as one schema. A Worker's vars select a profile
 * (PROFILE) and may override any part of it (PAYMASTER_CONFIG, JSON); secrets
 * never appear here, only the names of the secrets and bindings to read.
 */

export const profileNames = ['development', 'testing', 'staging', 'production', 'enterprise', 'high-security'] as const
export type ProfileName = (typeof profileNames)[number]

export const entryPointVersions = ['0.6', '0.7', '0.8'] as const
export type EntryPointVersion = (typeof entryPointVersions)[number]

export const paymasterContracts = ['pimlico-singleton', 'eth-infinitism-verifying'] as const
export type PaymasterContract = (typeof paymasterContracts)[number]

/** Gas and wei amounts: JSON has no bigint, so decimal strings or safe integers. */
const amountSchema = z
  .union([z.number().int().nonnegative().max(Number.MAX_SAFE_INTEGER), z.string().regex(/^\d{1,78}$/, 'expected a decimal integer string')])
  .transform((value) => BigInt(value))

const secretNameSchema = z.string().regex(/^[A-Za-z_][A-Za-z0-9_]*$/, 'expected a Worker secret or binding name')

const localSignerSchema = z.object({
  kind: z.literal('local'),
  /** The Worker secret holding the hex private key. */
  secret: secretNameSchema.default('PAYMASTER_PRIVATE_KEY'),
  /** Development only: with the secret unset, sign with an ephemeral key. */
  allowEphemeral: z.boolean().default(false),
})

const secretsStoreSignerSchema = z.object({
  kind: z.literal('secrets-store'),
  /** The `[[secrets_store_secrets]]` binding name. */
  binding: secretNameSchema,
})

export const signerConfigSchema = z.discriminatedUnion('kind', [localSignerSchema, secretsStoreSignerSchema])
export type SignerConfig = z.infer<typeof signerConfigSchema>

const paymasterSchema = z
  .object({
    entryPointVersion: z.enum(entryPointVersions),
    contract: z.enum(paymasterContracts),
    address: addressSchema,
    /** Gas the paymaster's validation may use; signed into v0.7+ paymasterAndData. */
    verificationGasLimit: amountSchema.optional(),
    postOpGasLimit: amountSchema.optional(),
  })
  .refine((p) => p.contract !== 'eth-infinitism-verifying' || p.entryPointVersion === '0.7', {
    message: 'eth-infinitism-verifying is supported for EntryPoint 0.7 only',
    path: ['entryPointVersion'],
  })

const chainSchema = z
  .object({
    chainId: z.number().int().positive().max(Number.MAX_SAFE_INTEGER),
    name: z.string().optional(),
    /** Entry points beyond the canonical ones (forks, test deployments). */
    entryPoints: z.array(z.object({ address: addressSchema, version: z.enum(entryPointVersions) })).default([]),
    paymasters: z.array(paymasterSchema).min(1, 'each chain needs at least one paymaster'),
    /** Which entry of `signers` signs for this chain. */
    signer: z.string().default('primary'),
  })
  .refine((c) => new Set(c.paymasters.map((p) => p.entryPointVersion)).size === c.paymasters.length, {
    message: 'at most one paymaster per entry point version',
    path: ['paymasters'],
  })

const policySchema = z.object({
  validity: z
    .object({
      /** How long a signature stays valid on chain (validUntil = now + this). */
      validForSeconds: z.number().int().min(30).max(86_400).default(600),
      /** validAfter = now − this, so a chain whose clock lags ours still accepts. */
      validAfterSkewSeconds: z.number().int().min(0).max(3_600).default(60),
    })
    .prefault({}),
  apiKeys: z
    .object({
      required: z.boolean().default(true),
      /** Worker secret with the accepted keys, comma separated. */
      secret: secretNameSchema.default('API_KEYS'),
    })
    .prefault({}),
  senders: z
    .object({
      /** When set, only these senders are sponsored. */
      allow: z.array(addressSchema).optional(),
      deny: z.array(addressSchema).default([]),
    })
    .prefault({}),
  gas: z
    .object({
      maxCallGasLimit: amountSchema.optional(),
      maxVerificationGasLimit: amountSchema.optional(),
      maxPreVerificationGas: amountSchema.optional(),
      maxPaymasterVerificationGasLimit: amountSchema.optional(),
      maxPaymasterPostOpGasLimit: amountSchema.optional(),
      maxFeePerGas: amountSchema.optional(),
      maxPriorityFeePerGas: amountSchema.optional(),
      /** Cap on the EntryPoint's required prefund (gas limits × maxFeePerGas), in wei. */
      maxTotalCostWei: amountSchema.optional(),
    })
    .prefault({}),
})

export const configSchema = z
  .object({
    profile: z.enum(profileNames),
    chains: z.array(chainSchema).min(1, 'configure at least one chain'),
    /** The chain served at `/` and `/rpc` when a request names none. */
    defaultChainId: z.number().int().positive().optional(),
    signers: z.record(z.string(), signerConfigSchema),
    policy: policySchema.prefault({}),
    /** Shown to wallets as ERC-7677 `sponsor`. */
    sponsor: z.object({ name: z.string().min(1), icon: z.string().optional() }).default({ name: 'Edge Paymaster' }),
    limits: z
      .object({
        maxBodyBytes: z.number().int().min(1_024).max(4_194_304).default(262_144),
        maxBatchSize: z.number().int().min(1).max(1_000).default(32),
      })
      .prefault({}),
  })
  .superRefine((config, ctx) => {
    const seen = new Set<number>()
    config.chains.forEach((chain, index) => {
      if (seen.has(chain.chainId)) {
        ctx.addIssue({ code: 'custom', path: ['chains', index, 'chainId'], message: `chain ${chain.chainId} is configured twice` })
      }
      seen.add(chain.chainId)
      if (!config.signers[chain.signer]) {
        ctx.addIssue({ code: 'custom', path: ['chains', index, 'signer'], message: `no signer named "${chain.signer}" in signers` })
      }
    })
    if (config.defaultChainId !== undefined && !seen.has(config.defaultChainId)) {
      ctx.addIssue({ code: 'custom', path: ['defaultChainId'], message: `chain ${config.defaultChainId} is not configured` })
    }
    for (const [name, signer] of Object.entries(config.signers)) {
      if (signer.kind === 'local' && signer.allowEphemeral && config.profile !== 'development') {
        ctx.addIssue({ code: 'custom', path: ['signers', name, 'allowEphemeral'], message: 'ephemeral keys are for the development profile only' })
      }
      if (signer.kind === 'local' && config.profile === 'high-security') {
        ctx.addIssue({ code: 'custom', path: ['signers', name, 'kind'], message: 'the high-security profile does not allow a local key' })
      }
    }
  })

export type ConfigInput = z.input<typeof configSchema>
export type Config = z.infer<typeof configSchema>
export type ChainConfig = Config['chains'][number]
export type PaymasterConfig = ChainConfig['paymasters'][number]
export type PolicyConfig = Config['policy']
