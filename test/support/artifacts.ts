import { createRequire } from 'node:module'
import path from 'node:path'
import { pathToFileURL } from 'node:url'
import type { Abi, Address, Hex } from 'viem'
import { entryPoint06Abi, entryPoint07Abi, entryPoint08Abi } from 'viem/account-abstraction'
import type { EntryPointVersion } from '../../config/schema.js'

/**
 * Contract artifacts straight from their npm packages: eth-infinitism's
 * @account-abstraction/contracts 0.6.0/0.7.0/0.8.0 (installed as ep06/ep07/ep08)
 * and Pimlico's SingletonPaymaster init code from @pimlico/mock-paymaster.
 * The EntryPoint ABIs are viem's: typed, unlike the JSON artifacts.
 */

const require = createRequire(import.meta.url)

export type Artifact = { abi: Abi; bytecode: Hex }

export const entryPointAbis = { '0.6': entryPoint06Abi, '0.7': entryPoint07Abi, '0.8': entryPoint08Abi } as const

const packageOf: Record<EntryPointVersion, string> = { '0.6': 'ep06', '0.7': 'ep07', '0.8': 'ep08' }

export function artifact(version: EntryPointVersion, contract: string): Artifact {
  const { abi, bytecode } = require(`${packageOf[version]}/artifacts/${contract}.json`) as Artifact
  return { abi, bytecode }
}

type SingletonInitCodes = {
  getSingletonPaymaster06InitCode(owner: Address): Hex
  getSingletonPaymaster07InitCode(owner: Address): Hex
  getSingletonPaymaster08InitCode(owner: Address): Hex
}

/** The package exports only its server; its constants module holds the bytecode. */
export async function singletonPaymasterInitCode(version: EntryPointVersion, owner: Address): Promise<Hex> {
  const packageDir = path.dirname(path.dirname(require.resolve('@pimlico/mock-paymaster')))
  const constants = (await import(pathToFileURL(path.join(packageDir, '_esm', 'constants.js')).href)) as SingletonInitCodes
  const byVersion = {
    '0.6': constants.getSingletonPaymaster06InitCode,
    '0.7': constants.getSingletonPaymaster07InitCode,
    '0.8': constants.getSingletonPaymaster08InitCode,
  }
  return byVersion[version](owner)
}

/** The parts of the Pimlico SingletonPaymaster ABI the harness uses (the package's own ABI is stale). */
export const singletonPaymasterAbi = [
  { type: 'function', name: 'addSigner', stateMutability: 'nonpayable', inputs: [{ name: 'signer', type: 'address' }], outputs: [] },
  { type: 'function', name: 'signers', stateMutability: 'view', inputs: [{ name: 'account', type: 'address' }], outputs: [{ type: 'bool' }] },
  { type: 'function', name: 'deposit', stateMutability: 'payable', inputs: [], outputs: [] },
  { type: 'function', name: 'getDeposit', stateMutability: 'view', inputs: [], outputs: [{ type: 'uint256' }] },
] as const

/** Pimlico's getHash(uint8 mode, userOp) with the userOp tuple of the EntryPoint version. */
export function singletonGetHashAbi(version: EntryPointVersion) {
  const userOpType = (entryPointAbis[version] as readonly { type: string; name?: string; inputs?: readonly { components?: unknown }[] }[]).find(
    (item) => item.type === 'function' && item.name === 'getUserOpHash',
  )!.inputs![0]!
  return [
    {
      type: 'function',
      name: 'getHash',
      stateMutability: 'view',
      inputs: [{ name: 'mode', type: 'uint8' }, { ...userOpType, name: 'userOp' }],
      outputs: [{ type: 'bytes32' }],
    },
  ] as const
}
