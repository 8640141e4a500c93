import { env, exports } from 'cloudflare:workers'
import { generatePrivateKey, privateKeyToAddress } from 'viem/accounts'
import type { Address, Hex } from 'viem'
import { app } from '../../worker/app.js'

export const apiKey = 'test-key-1'
/** The key in OPERATOR_KEYS, which alone reads /health's details. */
export const operatorKey = 'test-operator-key'
export const chainId = 31337
export const entryPoints = {
  '0.6': '0x5FF137D4b0FDCD49DcA30c7CF57E578a026d2789',
  '0.7': '0x0000000071727De22E5E9d8BAf0edAc6f37da032',
  '0.8': '0x4337084D9E255Ff0702461CF8895CE9E3b5Ff108',
} as const
export const paymasters = {
  '0.6': '0x3dd4568B46ec6fB9333F57Ec0E780CC94D19B322',
  '0.7': '0xd8A5406E24dcDc93656c1eF20E491a1FcF43b558',
  '0.8': '0x7B6310A3247EcCCF0c34Ae6c77f6837d193077CF',
} as const

type SecretAdmin = { create(value: string): Promise<string> }
type SecretBinding = Record<'SecretsStoreSecret::admin_api', () => SecretAdmin>

/** Puts a value into the local Secrets Store behind `binding` (miniflare's admin API for local secrets). */
export async function seedSecret(binding: string, value: string): Promise<void> {
  await (env as unknown as Record<string, SecretBinding>)[binding]!['SecretsStoreSecret::admin_api']().create(value)
}

let signerAddress: Address | undefined
/** A key made for this test run, stored in the local Secrets Store once per isolate. */
export async function seedSignerKey(): Promise<Address> {
  if (!signerAddress) {
    const key: Hex = generatePrivateKey()
    await seedSecret('PAYMASTER_KEY', key)
    signerAddress = privateKeyToAddress(key)
  }
  return signerAddress
}

export function call(path: string, init: RequestInit = {}): Promise<Response> {
  return (exports as unknown as { default: Fetcher }).default.fetch(new Request(`http://paymaster.test${path}`, init))
}

export async function rpc(body: unknown, options: { path?: string; headers?: Record<string, string> } = {}) {
  const response = await call(options.path ?? '/rpc', {
    method: 'POST',
    headers: { 'content-type': 'application/json', 'x-api-key': apiKey, ...options.headers },
    body: typeof body === 'string' ? body : JSON.stringify(body),
  })
  const text = await response.text()
  return { status: response.status, body: text ? JSON.parse(text) : undefined }
}

type TestConfig = { policy: Record<string, unknown>; chains: Array<{ paymasters: Array<Record<string, unknown>> }> }

/** The test bindings with the config as `change` makes it and `extra` bindings over them: a config, and so services, of their own. */
export function withConfig(change: (config: TestConfig) => TestConfig, extra: Record<string, unknown> = {}): Record<string, unknown> {
  const bindings = env as unknown as Record<string, unknown> & { PAYMASTER_CONFIG: string }
  return { ...bindings, ...extra, PAYMASTER_CONFIG: JSON.stringify(change(JSON.parse(bindings.PAYMASTER_CONFIG) as TestConfig)) }
}

/** `withConfig` with `policy` entries set. */
export function withPolicy(policy: Record<string, unknown>, extra: Record<string, unknown> = {}): Record<string, unknown> {
  return withConfig((config) => ({ ...config, policy: { ...config.policy, ...policy } }), extra)
}

/** `withPolicy` with these quota limits. */
export function withQuotas(limits: unknown[], extra: Record<string, unknown> = {}): Record<string, unknown> {
  return withPolicy({ quotas: { limits } }, extra)
}

/** A JSON POST to the app with bindings of the test's own (a config of its own gets services, and metrics, of its own). */
export function postWith(bindings: Record<string, unknown>, path: string, body: unknown, key = apiKey): Promise<Response> {
  return Promise.resolve(
    app.fetch(
      new Request(`http://paymaster.test${path}`, { method: 'POST', headers: { 'content-type': 'application/json', 'x-api-key': key }, body: JSON.stringify(body) }),
      bindings,
    ),
  )
}

export function request(method: string, params: unknown[], id: number | string = 1) {
  return { jsonrpc: '2.0', id, method, params }
}
