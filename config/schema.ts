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

/**
 * `pimlico-singleton-7702`: Pimlico's SingletonPaymasterV8 as its current sources build it, whose getHash wraps the
 * V7 hash with the EIP-7702 initCode override; `pimlico-singleton` at v0.8 is the V8 @pimlico/mock-paymaster ships.
 */
export const paymasterContracts = ['pimlico-singleton', 'pimlico-singleton-7702', 'eth-infinitism-verifying'] as const
export type PaymasterContract = (typeof paymasterContracts)[number]
/** The EntryPoint versions each contract family is built for. */
const contractVersions: Record<PaymasterContract, readonly EntryPointVersion[]> = {
  'pimlico-singleton': entryPointVersions,
  'pimlico-singleton-7702': ['0.8'],
  'eth-infinitism-verifying': ['0.7'],
}
/** Contracts that accept one signer address (the others keep a set of signers). */
const singleSignerContracts: readonly PaymasterContract[] = ['eth-infinitism-verifying']

/** Whether the contract keeps a set of signers (Pimlico's `signers(address)`), rather than one. */
export function keepsSignerSet(contract: PaymasterContract): boolean {
  return !singleSignerContracts.includes(contract)
}

/** Whether one of the chain's paymasters accepts a single signer, so every backend of its signer must share one address. */
export function acceptsSingleSigner(chain: { paymasters: ReadonlyArray<{ contract: PaymasterContract }> }): boolean {
  return chain.paymasters.some((p) => singleSignerContracts.includes(p.contract))
}

/** Gas and wei amounts: JSON has no bigint, so decimal strings or safe integers. */
const amountSchema = z
  .union([z.number().int().nonnegative().max(Number.MAX_SAFE_INTEGER), z.string().regex(/^\d{1,78}$/, 'expected a decimal integer string')])
  .transform((value) => BigInt(value))

/** A paymaster gas limit: v0.7+ packs each into 16 bytes of paymasterAndData. */
const paymasterGasLimitSchema = amountSchema.refine((value) => value < 2n ** 128n, 'expected at most 2^128 − 1 (a uint128, as paymasterAndData packs it)')

/**
 * `data:image/<type>[;params],<data>` as browsers read it: base64 when the last parameter says so, its data
 * percent-decoded first; and no raw `#`, where a browser would cut the data off as a fragment.
 */
function isImageDataUri(uri: string): boolean {
  const parts = /^data:image\/[a-z0-9.+-]+((?:;[^,;]*)*),([^#]+)$/is.exec(uri)
  if (!parts) return false
  if (parts[1]!.split(';').at(-1)!.trim().toLowerCase() !== 'base64') return true
  try {
    return atob(decodeURIComponent(parts[2]!).replace(/\s/g, '')).length > 0
  } catch {
    return false
  }
}

const secretNameSchema = z.string().regex(/^[A-Za-z_][A-Za-z0-9_]*$/, 'expected a Worker secret or binding name')

/**
 * Every key backend may declare the address its key has. It is optional, and
 * lets the config check a single-signer paymaster's fallback chain before
 * deployment; at run time the signer refuses to act as any other address.
 */
const expectedAddress = { address: addressSchema.optional() }
const milliseconds = (min: number, max: number, fallback: number) => z.number().int().min(min).max(max).default(fallback)

const localSignerSchema = z.object({
  kind: z.literal('local'),
  ...expectedAddress,
  /** The Worker secret holding the hex private key. */
  secret: secretNameSchema.default('PAYMASTER_PRIVATE_KEY'),
  /** Development only: with the secret unset, sign with an ephemeral key. */
  allowEphemeral: z.boolean().default(false),
})

const secretsStoreSignerSchema = z.object({
  kind: z.literal('secrets-store'),
  ...expectedAddress,
  /** The `[[secrets_store_secrets]]` binding name. */
  binding: secretNameSchema,
})

const awsKmsSignerSchema = z.object({
  kind: z.literal('aws-kms'),
  ...expectedAddress,
  keyId: z.string().min(1, 'the KMS key id, ARN or alias'),
  region: z.string().regex(/^[a-z]{2}(-[a-z]+)+-\d$/, 'expected an AWS region such as us-east-1'),
  /** A VPC endpoint, or a local server in tests. */
  endpoint: z.url().optional(),
  accessKeyIdSecret: secretNameSchema.default('AWS_ACCESS_KEY_ID'),
  secretAccessKeySecret: secretNameSchema.default('AWS_SECRET_ACCESS_KEY'),
  sessionTokenSecret: secretNameSchema.optional(),
  deadlineMs: milliseconds(100, 30_000, 3_000),
  maxAttempts: z.number().int().min(1).max(10).default(3),
})

/** A service's base URL, to which the signer appends its own paths: a query or fragment would end up in front of them. */
const baseUrlSchema = z.url().refine((url) => !/[?#]/.test(url), 'a base URL takes no query (?…) or fragment (#…): the signer appends its own paths to it')

const vaultSignerSchema = z.object({
  kind: z.literal('vault'),
  ...expectedAddress,
  url: baseUrlSchema,
  auth: z
    .discriminatedUnion('method', [
      z.object({ method: z.literal('token'), tokenSecret: secretNameSchema.default('VAULT_TOKEN') }),
      z.object({
        method: z.literal('approle'),
        roleIdSecret: secretNameSchema.default('VAULT_ROLE_ID'),
        secretIdSecret: secretNameSchema.default('VAULT_SECRET_ID'),
        mount: z.string().default('approle'),
      }),
    ])
    .default({ method: 'token', tokenSecret: 'VAULT_TOKEN' }),
  kvMount: z.string().min(1).default('secret'),
  path: z.string().min(1, 'the KV v2 path of the key, e.g. paymaster/signer'),
  field: z.string().min(1).default('private_key'),
  namespace: z.string().optional(),
  cacheTtlSeconds: z.number().int().min(1).max(86_400).default(300),
  timeoutMs: milliseconds(100, 30_000, 5_000),
})

const httpSignerSchema = z.object({
  kind: z.literal('http'),
  url: baseUrlSchema,
  keyId: z.string().min(1),
  tokenSecret: secretNameSchema.default('SIGNER_TOKEN'),
  /** Required: every signature the key server returns is checked against it. */
  address: addressSchema,
  timeoutMs: milliseconds(50, 30_000, 2_000),
})

const keylessSignerSchema = z.object({
  kind: z.literal('keyless'),
  /**
   * Required: every signature is checked against it. The parent host, outside the enclave, must not be what
   * decides which key the Worker trusts (its answer to "which address has this key" could name any key).
   */
  address: addressSchema,
  /** The enclave origin parent's HTTPS API. */
  url: baseUrlSchema,
  /**
   * The origin key that signs: any non-empty string (the parent makes UUIDs), percent-encoded into the path.
   * "." and ".." are refused: URL normalisation would drop them as path segments, and name another route.
   */
  keyId: z
    .string()
    .min(1)
    .refine((keyId) => keyId !== '.' && keyId !== '..', 'a key id of "." or ".." would be removed from the URL path by normalisation'),
  /**
   * The HMAC key id the parent knows this Worker by, and the Worker secret holding its secret. Visible ASCII but
   * `,` and `:`, as the parent takes key ids (ORIGIN_HMAC_KEYS): fetch would trim white space off the header it
   * travels in, and the parent would check a signature over another id.
   */
  hmacKeyId: z
    .string()
    .regex(/^[\x21-\x2b\x2d-\x39\x3b-\x7e]+$/, 'an HMAC key id is visible ASCII characters other than "," and ":", as the parent takes them')
    .default('worker'),
  hmacSecret: secretNameSchema.default('ORIGIN_HMAC_SECRET'),
  /** Everything one signature may take, including waits for an enclave unlock (Retry-After). */
  deadlineMs: milliseconds(50, 30_000, 1_000),
  /**
   * An `[[mtls_certificates]]` binding: requests go out through it, presenting its certificate, for a parent that
   * requires client certificates (TLS_REQUIRE_CLIENT_CERT=1); an https url only. Without it the Worker presents none.
   * Any binding with a fetch is used as it is (a Worker cannot tell an mTLS binding from a service binding).
   */
  clientCertificate: secretNameSchema.optional(),
})

const fallbackSignerSchema = z.object({
  kind: z.literal('fallback'),
  /** Names of other signers, primary first. */
  members: z.array(z.string()).min(1),
  timeoutMs: milliseconds(50, 30_000, 2_000),
  failureThreshold: z.number().int().min(1).max(100).default(3),
  coolDownSeconds: z.number().int().min(1).max(3_600).default(30),
  /** Ask the next member as well when one is slower than this. */
  hedgeAfterMs: z.number().int().min(1).max(30_000).optional(),
})

export const signerConfigSchema = z.discriminatedUnion('kind', [
  localSignerSchema,
  secretsStoreSignerSchema,
  awsKmsSignerSchema,
  vaultSignerSchema,
  httpSignerSchema,
  keylessSignerSchema,
  fallbackSignerSchema,
])
export type SignerConfig = z.infer<typeof signerConfigSchema>

const paymasterSchema = z
  .object({
    entryPointVersion: z.enum(entryPointVersions),
    contract: z.enum(paymasterContracts),
    address: addressSchema,
    /** Gas the paymaster's validation may use; signed into v0.7+ paymasterAndData. */
    verificationGasLimit: paymasterGasLimitSchema.optional(),
    postOpGasLimit: paymasterGasLimitSchema.optional(),
  })
  .superRefine((p, ctx) => {
    const versions = contractVersions[p.contract]
    if (versions.includes(p.entryPointVersion)) return
    ctx.addIssue({ code: 'custom', message: `${p.contract} is supported for EntryPoint ${versions.join(', ')} only`, path: ['entryPointVersion'] })
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
    /** Optional chain RPC, used only by /health to check that each signer is authorised on the paymaster. */
    rpcUrl: z.url().optional(),
  })
  .refine((c) => new Set(c.paymasters.map((p) => p.entryPointVersion)).size === c.paymasters.length, {
    message: 'at most one paymaster per entry point version',
    path: ['paymasters'],
  })

const quotaLimitSchema = z
  .object({
    /** Whose sponsorships are counted: each sender's, or each API key's; on each chain apart. */
    per: z.enum(['sender', 'apiKey']),
    /** The sliding window, in seconds (exact to the second; at most 31 days). */
    windowSeconds: z.number().int().min(1).max(2_678_400),
    /** Signed sponsorships in any window. */
    maxOperations: z.number().int().min(1).max(1_000_000_000).optional(),
    /** The summed maximum cost (each as `maxTotalCostWei` counts it) of the sponsorships signed in any window, in wei. */
    maxCostWei: amountSchema.optional(),
  })
  .refine((limit) => limit.maxOperations !== undefined || limit.maxCostWei !== undefined, 'set maxOperations, maxCostWei or both')

const policySchema = z.object({
  validity: z
    .object({
      /** How long a signature stays valid on chain (validUntil = now + this). */
      validForSeconds: z.number().int().min(30).max(86_400).default(600),
      /** validAfter = now − this, so a chain whose clock lags ours still accepts; at least 1, as v0.8 wants block.timestamp > validAfter. */
      validAfterSkewSeconds: z.number().int().min(1).max(3_600).default(60),
    })
    .prefault({}),
  apiKeys: z
    .object({
      required: z.boolean().default(true),
      /** Worker secret with the accepted keys, comma separated. */
      secret: secretNameSchema.default('API_KEYS'),
      /**
       * Worker secret with the operators' keys (comma separated), which alone read /health's details: they name
       * backends' URLs, key ids and why they fail, which the API keys (shipped in front ends) must not. Unset: no one.
       */
      operatorSecret: secretNameSchema.default('OPERATOR_KEYS'),
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
  /** Spend over time, counted in a Durable Object per sender or API key and chain. */
  quotas: z
    .object({
      /** The Durable Object namespace binding of class SponsorshipQuota. */
      binding: secretNameSchema.default('QUOTAS'),
      limits: z.array(quotaLimitSchema).max(16).default([]),
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
    sponsor: z
      .object({
        name: z.string().min(1),
        /** ERC-7677: a data URI (RFC 2397) of an image, which wallets show beside the name; in every stub's answer. */
        icon: z
          .string()
          .max(32_768, 'at most 32 KiB: it goes out with every stub data answer')
          // Aborts: the data URI's own message would only mislead.
          .refine((icon) => !icon.includes('#'), { message: 'a raw # cuts a data URI off in browsers (an SVG colour, say): write it as %23', abort: true })
          .refine(isImageDataUri, 'expected an image as a data URI (RFC 2397), e.g. data:image/png;base64,…, as ERC-7677 asks; base64 data must be base64')
          .optional(),
      })
      .default({ name: 'Edge Paymaster' }),
    /** Workers Analytics Engine dataset binding for signer outcomes, when bound. */
    analyticsEngineBinding: secretNameSchema.optional(),
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
    config.chains.forEach((chain, index) => {
      const signer = config.signers[chain.signer]
      if (signer?.kind !== 'fallback' || !acceptsSingleSigner(chain)) return
      const declared = new Set(
        signer.members.map((m) => config.signers[m]).flatMap((member) => (member && 'address' in member && member.address ? [member.address] : [])),
      )
      if (declared.size > 1) {
        ctx.addIssue({
          code: 'custom',
          path: ['chains', index, 'signer'],
          message: `the paymaster on chain ${chain.chainId} accepts a single signer, but the members of "${chain.signer}" declare different addresses`,
        })
      }
    })
    // Anyone holding an API key (often shipped in a dapp's front end) could otherwise have one operation draw the whole deposit.
    if (config.profile !== 'development' && config.policy.gas.maxTotalCostWei === undefined) {
      ctx.addIssue({
        code: 'custom',
        path: ['policy', 'gas', 'maxTotalCostWei'],
        message: 'required outside the development profile: the most one sponsored operation may cost, in wei (its gas limits × maxFeePerGas)',
      })
    }
    if (config.policy.apiKeys.operatorSecret === config.policy.apiKeys.secret) {
      ctx.addIssue({ code: 'custom', path: ['policy', 'apiKeys', 'operatorSecret'], message: 'must name another secret than policy.apiKeys.secret: every API key would read /health\u2019s details' })
    }
    config.policy.quotas.limits.forEach((limit, index) => {
      if (limit.per === 'apiKey' && !config.policy.apiKeys.required) {
        ctx.addIssue({ code: 'custom', path: ['policy', 'quotas', 'limits', index, 'per'], message: 'counting per API key needs policy.apiKeys.required: without keys there is nothing to count by' })
      }
    })
    if (config.defaultChainId !== undefined && !seen.has(config.defaultChainId)) {
      ctx.addIssue({ code: 'custom', path: ['defaultChainId'], message: `chain ${config.defaultChainId} is not configured` })
    }
    for (const [name, signer] of Object.entries(config.signers)) {
      if (signer.kind === 'fallback') {
        signer.members.forEach((member, index) => {
          const target = config.signers[member]
          if (!target) ctx.addIssue({ code: 'custom', path: ['signers', name, 'members', index], message: `no signer named "${member}"` })
          else if (target.kind === 'fallback') {
            ctx.addIssue({ code: 'custom', path: ['signers', name, 'members', index], message: 'a fallback member cannot itself be a fallback' })
          }
        })
      }
      if (signer.kind === 'local' && signer.allowEphemeral && config.profile !== 'development') {
        ctx.addIssue({ code: 'custom', path: ['signers', name, 'allowEphemeral'], message: 'ephemeral keys are for the development profile only' })
      }
      if (signer.kind === 'keyless' && signer.clientCertificate !== undefined && !signer.url.startsWith('https:')) {
        ctx.addIssue({ code: 'custom', path: ['signers', name, 'clientCertificate'], message: 'a client certificate is presented over TLS only: the url must be https://' })
      }
      if ((signer.kind === 'local' || signer.kind === 'secrets-store') && config.profile === 'high-security') {
        ctx.addIssue({ code: 'custom', path: ['signers', name, 'kind'], message: 'the high-security profile keeps no key in the Worker (use aws-kms or vault)' })
      }
    }
  })

export type ConfigInput = z.input<typeof configSchema>
export type Config = z.infer<typeof configSchema>
export type ChainConfig = Config['chains'][number]
export type PaymasterConfig = ChainConfig['paymasters'][number]
export type PolicyConfig = Config['policy']
export type QuotaConfig = PolicyConfig['quotas']
