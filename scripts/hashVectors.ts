/**
 * `npx tsx scripts/hashVectors.ts`: rewrites test/vectors/paymasterHashes.json
 * from the contracts deployed on a throwaway anvil chain.
 */
import { writeFileSync } from 'node:fs'
import { startDevnet } from '../test/support/devnet.js'
import { readHashVectors } from '../test/support/hashVectors.js'

const { devnet, stop } = await startDevnet({ port: Number(process.env.DEVNET_PORT ?? 18599) })
try {
  const vectors = await readHashVectors(devnet)
  writeFileSync('test/vectors/paymasterHashes.json', `${JSON.stringify(vectors, null, 2)}\n`)
  console.log(`wrote ${vectors.length} vectors`)
} finally {
  await stop()
}
