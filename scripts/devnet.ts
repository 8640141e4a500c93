/**
 * `npm run devnet`: a local anvil chain with the EntryPoints, SimpleAccount
 * factories and paymasters deployed, the paymaster signer set to anvil's
 * well-known account #1. Prints the PAYMASTER_CONFIG that points the Worker
 * at it; runs until Ctrl-C.
 */
import { anvilWellKnownKeys } from '../test/support/anvilKeys.js'
import { devnetChainConfig, startDevnet } from '../test/support/devnet.js'

const port = Number(process.env.DEVNET_PORT ?? 8545)
const { anvil, devnet, stop: stopDevnet } = await startDevnet({ port })
console.log(JSON.stringify({ devnet, paymasterConfig: { chains: [devnetChainConfig(devnet, 'pimlico-singleton')] } }, null, 2))
console.log(`\nanvil on ${anvil.rpcUrl}. For the Worker to sign for these paymasters, put the well-known anvil key #1 in .dev.vars:\nPAYMASTER_PRIVATE_KEY=${anvilWellKnownKeys.paymasterSigner}\n`)
if (process.env.DEVNET_ONCE) {
  await stopDevnet()
} else {
  const stop = () => void stopDevnet().then(() => process.exit(0))
  process.on('SIGINT', stop)
  process.on('SIGTERM', stop)
}
