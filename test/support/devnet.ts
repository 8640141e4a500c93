import {
  concat,
  createPublicClient,
  createWalletClient,
  encodeAbiParameters,
  getContractAddress,
  http,
  parseEther,
  type Address,
  type Hex,
  type PublicClient,
} from 'viem'
import { privateKeyToAccount, privateKeyToAddress } from 'viem/accounts'
import { foundry } from 'viem/chains'
import type { EntryPointVersion } from '../../config/schema.js'
import { canonicalEntryPoints } from '../../worker/sponsor/entryPoints.js'
import { startAnvil, type Anvil } from './anvil.js'
import { anvilWellKnownKeys } from './anvilKeys.js'
import { artifact, singletonPaymasterAbi, singletonPaymasterInitCode } from './artifacts.js'

/**
 * Deploys the real contracts on a local anvil chain, at the addresses they
 * have on every public chain where that is possible: the EntryPoints through
 * the CREATE2 deployer with their canonical salts, SimpleAccountFactory at
 * its usual addresses, and the paymasters at CREATE2 addresses that depend
 * only on their constructor arguments, so a config can name them in advance.
 */

/** The deterministic CREATE2 deployer anvil ships at genesis. */
export const create2Deployer: Address = '0x4e59b44847b379578588920ca78fbf26c0b4956c'
const zeroSalt: Hex = `0x${'00'.repeat(32)}`

const entryPointSalts: Record<EntryPointVersion, Hex> = {
  '0.6': zeroSalt,
  '0.7': '0x90d8084deab30c2a37c45e8d47f49f2f7965183cb6990a98943ef94940681de3',
  '0.8': '0x0a59dbff790c23c976a548690c27297883cc66b4c67024f9117b0238995e35e9',
}

export const entryPointVersions: EntryPointVersion[] = ['0.6', '0.7', '0.8']

export type Devnet = {
  rpcUrl: string
  chainId: number
  entryPoints: Record<EntryPointVersion, Address>
  simpleAccountFactories: Record<EntryPointVersion, Address>
  singletonPaymasters: Record<EntryPointVersion, Address>
  verifyingPaymasterV07: Address
  paymasterSigner: Address
}

function create2Address(salt: Hex, initCode: Hex): Address {
  return getContractAddress({ opcode: 'CREATE2', from: create2Deployer, salt, bytecode: initCode })
}

export function clientsFor(rpcUrl: string) {
  const chain = { ...foundry, rpcUrls: { default: { http: [rpcUrl] } } }
  const publicClient = createPublicClient({ chain, transport: http(rpcUrl) }) as PublicClient
  const deployer = createWalletClient({ chain, transport: http(rpcUrl), account: privateKeyToAccount(anvilWellKnownKeys.deployer) })
  const bundler = createWalletClient({ chain, transport: http(rpcUrl), account: privateKeyToAccount(anvilWellKnownKeys.bundler) })
  return { chain, publicClient, deployer, bundler }
}

/** The init code of every devnet contract, by the address it lands at. */
async function devnetInitCodes(paymasterSigner: Address) {
  const owner = privateKeyToAddress(anvilWellKnownKeys.deployer)
  const entries: Array<{ name: string; salt: Hex; initCode: Hex }> = []
  for (const version of entryPointVersions) {
    entries.push({ name: `EntryPoint ${version}`, salt: entryPointSalts[version], initCode: artifact(version, 'EntryPoint').bytecode })
    entries.push({
      name: `SimpleAccountFactory ${version}`,
      salt: zeroSalt,
      initCode: concat([
        artifact(version, 'SimpleAccountFactory').bytecode,
        encodeAbiParameters([{ type: 'address' }], [canonicalEntryPoints[version]]),
      ]),
    })
    entries.push({ name: `SingletonPaymaster ${version}`, salt: zeroSalt, initCode: await singletonPaymasterInitCode(version, owner) })
  }
  entries.push({
    name: 'VerifyingPaymaster 0.7',
    salt: zeroSalt,
    initCode: concat([
      artifact('0.7', 'VerifyingPaymaster').bytecode,
      encodeAbiParameters([{ type: 'address' }, { type: 'address' }], [canonicalEntryPoints['0.7'], paymasterSigner]),
    ]),
  })
  return entries.map((entry) => ({ ...entry, address: create2Address(entry.salt, entry.initCode) }))
}

export async function deployDevnet(options: { rpcUrl: string; paymasterSigner: Address; depositEth?: string }): Promise<Devnet> {
  const { publicClient, deployer } = clientsFor(options.rpcUrl)
  const contracts = await devnetInitCodes(options.paymasterSigner)
  const byName = (name: string) => contracts.find((c) => c.name === name)!.address

  for (const contract of contracts) {
    if (await publicClient.getCode({ address: contract.address })) continue
    const hash = await deployer.sendTransaction({ to: create2Deployer, data: concat([contract.salt, contract.initCode]), gas: 12_000_000n })
    const receipt = await publicClient.waitForTransactionReceipt({ hash })
    if (receipt.status !== 'success' || !(await publicClient.getCode({ address: contract.address }))) {
      throw new Error(`deploying ${contract.name} failed`)
    }
  }
  for (const version of entryPointVersions) {
    if (byName(`EntryPoint ${version}`) !== canonicalEntryPoints[version]) {
      throw new Error(`EntryPoint ${version} landed at ${byName(`EntryPoint ${version}`)}, not its canonical address`)
    }
  }

  const singletonPaymasters = Object.fromEntries(
    entryPointVersions.map((v) => [v, byName(`SingletonPaymaster ${v}`)]),
  ) as Record<EntryPointVersion, Address>
  const verifyingPaymasterV07 = byName('VerifyingPaymaster 0.7')
  const deposit = parseEther(options.depositEth ?? '100')

  for (const paymaster of [...Object.values(singletonPaymasters), verifyingPaymasterV07]) {
    const isSingleton = paymaster !== verifyingPaymasterV07
    if (isSingleton) {
      const authorised = await publicClient.readContract({
        address: paymaster,
        abi: singletonPaymasterAbi,
        functionName: 'signers',
        args: [options.paymasterSigner],
      })
      if (!authorised) {
        const hash = await deployer.writeContract({ address: paymaster, abi: singletonPaymasterAbi, functionName: 'addSigner', args: [options.paymasterSigner] })
        await publicClient.waitForTransactionReceipt({ hash })
      }
    }
    const hash = await deployer.writeContract({ address: paymaster, abi: singletonPaymasterAbi, functionName: 'deposit', value: deposit })
    await publicClient.waitForTransactionReceipt({ hash })
  }

  return {
    rpcUrl: options.rpcUrl,
    chainId: await publicClient.getChainId(),
    entryPoints: canonicalEntryPoints,
    simpleAccountFactories: Object.fromEntries(
      entryPointVersions.map((v) => [v, byName(`SimpleAccountFactory ${v}`)]),
    ) as Record<EntryPointVersion, Address>,
    singletonPaymasters,
    verifyingPaymasterV07,
    paymasterSigner: options.paymasterSigner,
  }
}

/** A fresh anvil chain on `port` with the devnet deployed, its paymasters authorising the well-known anvil key #1. */
export async function startDevnet(options: { port: number }): Promise<{ anvil: Anvil; devnet: Devnet; stop(): Promise<void> }> {
  const anvil = await startAnvil({ port: options.port })
  try {
    const devnet = await deployDevnet({ rpcUrl: anvil.rpcUrl, paymasterSigner: privateKeyToAddress(anvilWellKnownKeys.paymasterSigner) })
    return { anvil, devnet, stop: () => anvil.stop() }
  } catch (error) {
    await anvil.stop()
    throw error
  }
}

/** A PAYMASTER_CONFIG chain entry for a devnet: the singleton paymaster on every version, or the VerifyingPaymaster on v0.7. */
export function devnetChainConfig(devnet: Devnet, family: 'pimlico-singleton' | 'eth-infinitism-verifying') {
  const paymasters =
    family === 'pimlico-singleton'
      ? entryPointVersions.map((v) => ({ entryPointVersion: v, contract: family, address: devnet.singletonPaymasters[v] }))
      : [{ entryPointVersion: '0.7', contract: family, address: devnet.verifyingPaymasterV07 }]
  return { chainId: devnet.chainId, name: 'anvil', paymasters }
}
