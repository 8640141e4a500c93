/**
 * `npm run devnet`: a local anvil chain with the EntryPoints, SimpleAccount
 * factories and paymasters deployed, the paymaster signer set to anvil's
 * well-known account #1. Prints the PAYMASTER_CONFIG that points the Worker
 * at it; runs until Ctrl-C.
 */
import { privateKeyToAddress } from 'viem/accounts'
import { anvilWellKnownKeys } from '../test/support/anvilKeys.js'
import { startAnvil } from '../test/support/anvil.js'
import { deployDevnet, devnetChainConfig } from '../test/support/devnet.js'

const port = Number(process.env.DEVNET_PORT ?? 8545)
const anvil = await startAnvil({ port })
const devnet = await deployDevnet({ rpcUrl: anvil.rpcUrl, paymasterSigner: privateKeyToAddress(anvilWellKnownKeys.paymasterSigner) }).catch(
  async (error: unknown) => {
    await anvil.stop()
    throw error
  },
)
console.log(JSON.stringify({ devnet, paymasterConfig: { chains: [devnetChainConfig(devnet, 'pimlico-singleton')] } }, null, 2))
console.log(`\nanvil on ${anvil.rpcUrl}. For the Worker to sign for these paymasters, put the well-known anvil key #1 in .dev.vars:\nPAYMASTER_PRIVATE_KEY=${anvilWellKnownKeys.paymasterSigner}\n`)
if (process.env.DEVNET_ONCE) {
  await anvil.stop()
} else {
  const stop = () => void anvil.stop().then(() => process.exit(0))
  process.on('SIGINT', stop)
  process.on('SIGTERM', stop)
}
