/**
 * `npx tsx scripts/hashVectors.ts`: rewrites test/vectors/paymasterHashes.json
 * from the contracts deployed on a throwaway anvil chain.
 */
import { writeFileSync } from 'node:fs'
import { privateKeyToAddress } from 'viem/accounts'
import { anvilWellKnownKeys } from '../test/support/anvilKeys.js'
import { startAnvil } from '../test/support/anvil.js'
import { deployDevnet } from '../test/support/devnet.js'
import { readHashVectors } from '../test/support/hashVectors.js'

const anvil = await startAnvil({ port: Number(process.env.DEVNET_PORT ?? 18599) })
try {
  const devnet = await deployDevnet({ rpcUrl: anvil.rpcUrl, paymasterSigner: privateKeyToAddress(anvilWellKnownKeys.paymasterSigner) })
  const vectors = await readHashVectors(devnet)
  writeFileSync('test/vectors/paymasterHashes.json', `${JSON.stringify(vectors, null, 2)}\n`)
  console.log(`wrote ${vectors.length} vectors`)
} finally {
  await anvil.stop()
}
