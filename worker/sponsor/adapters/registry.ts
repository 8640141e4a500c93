import type { EntryPointVersion, PaymasterContract } from '../../../config/schema.js'
import { UnsupportedError } from '../../errors.js'
import type { PaymasterAdapter } from './paymasterAdapter.js'
import { pimlicoSingletonV6, pimlicoSingletonV7, pimlicoSingletonV8, pimlicoSingletonV8Eip7702 } from './pimlicoSingleton.js'
import { verifyingPaymasterV07 } from './verifyingPaymasterV07.js'

const adapters: ReadonlyArray<PaymasterAdapter<never>> = [
  pimlicoSingletonV6,
  pimlicoSingletonV7,
  pimlicoSingletonV8,
  pimlicoSingletonV8Eip7702,
  verifyingPaymasterV07,
]

export function adapterFor(contract: PaymasterContract, version: EntryPointVersion): PaymasterAdapter<never> {
  const adapter = adapters.find((a) => a.contract === contract && a.entryPointVersion === version)
  if (!adapter) {
    throw new UnsupportedError(`no adapter for ${contract} at EntryPoint v${version}`, { reason: 'unsupported_paymaster' })
  }
  return adapter
}

/** The adapters for other contract families at `version`: what a deployed contract might be instead of `contract`. */
export function otherAdapters(contract: PaymasterContract, version: EntryPointVersion): ReadonlyArray<PaymasterAdapter<never>> {
  return adapters.filter((a) => a.contract !== contract && a.entryPointVersion === version)
}
