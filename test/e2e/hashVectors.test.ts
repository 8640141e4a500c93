import { afterAll, beforeAll, expect, it } from 'vitest'
import { privateKeyToAddress } from 'viem/accounts'
import committed from '../vectors/paymasterHashes.json' with { type: 'json' }
import { anvilWellKnownKeys } from '../support/anvilKeys.js'
import { startAnvil, type Anvil } from '../support/anvil.js'
import { deployDevnet, type Devnet } from '../support/devnet.js'
import { readHashVectors } from '../support/hashVectors.js'

let anvil: Anvil
let devnet: Devnet

beforeAll(async () => {
  anvil = await startAnvil({ port: 18547 })
  devnet = await deployDevnet({ rpcUrl: anvil.rpcUrl, paymasterSigner: privateKeyToAddress(anvilWellKnownKeys.paymasterSigner) })
})

afterAll(async () => {
  await anvil?.stop()
})

it('the committed hash vectors are what the deployed contracts compute today', async () => {
  expect(await readHashVectors(devnet)).toEqual(committed)
})
