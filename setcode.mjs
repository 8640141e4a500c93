// Experiment: deploy EntryPoints with plain CREATE from an EOA, copy runtime code to the canonical
// address with anvil_setCode, then test getSenderAddress (which goes through SenderCreator).
import { createRequire } from 'module'
const require = createRequire('/work/main/')
const viem = require('viem'); const aa = require('viem/account-abstraction')
const { privateKeyToAccount } = require('viem/accounts')
const { createPublicClient, createWalletClient, createTestClient, http, concat, encodeFunctionData, BaseError, ContractFunctionRevertedError } = viem
const NM = '/work/main/node_modules'; const art = (v, n) => require(`${NM}/ep0${v}/artifacts/${n}.json`)
const RPC = process.argv[2]
const chain = { ...require('viem/chains').foundry, rpcUrls: { default: { http: [RPC] } } }
const pub = createPublicClient({ chain, transport: http(RPC) })
const test = createTestClient({ chain, mode: 'anvil', transport: http(RPC) })
const deployer = privateKeyToAccount('0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80')
const wallet = createWalletClient({ chain, transport: http(RPC), account: deployer })
const wait = async (hash) => pub.waitForTransactionReceipt({ hash })
const CANON = { 6: aa.entryPoint06Address, 7: aa.entryPoint07Address, 8: aa.entryPoint08Address }
for (const v of [6, 7, 8]) {
  const ep = art(v, 'EntryPoint'), fac = art(v, 'SimpleAccountFactory')
  const tmp = (await wait(await wallet.deployContract({ abi: ep.abi, bytecode: ep.bytecode }))).contractAddress
  await test.setCode({ address: CANON[v], bytecode: await pub.getCode({ address: tmp }) })
  const factory = (await wait(await wallet.deployContract({ abi: fac.abi, bytecode: fac.bytecode, args: [CANON[v]] }))).contractAddress
  const initCode = concat([factory, encodeFunctionData({ abi: fac.abi, functionName: 'createAccount', args: [deployer.address, 0n] })])
  let res
  try { await pub.simulateContract({ address: CANON[v], abi: ep.abi, functionName: 'getSenderAddress', args: [initCode] }); res = 'no revert?' }
  catch (e) { const r = e instanceof BaseError ? e.walk(x => x instanceof ContractFunctionRevertedError) : null; res = r?.data ? `${r.data.errorName}(${r.data.args.join(',')})` : (r?.reason ?? e.shortMessage) }
  const expected = await pub.readContract({ address: factory, abi: fac.abi, functionName: 'getAddress', args: [deployer.address, 0n] })
  let extra = ''
  if (v === 8) {
    const sc = await pub.readContract({ address: CANON[8], abi: ep.abi, functionName: 'senderCreator' })
    const scEp = await pub.readContract({ address: sc, abi: art(8, 'SenderCreator').abi, functionName: 'entryPoint' })
    const dom = await pub.readContract({ address: CANON[8], abi: ep.abi, functionName: 'eip712Domain' })
    extra = ` | senderCreator()=${sc} SenderCreator.entryPoint()=${scEp} (tmp EP ${tmp}); eip712Domain.verifyingContract=${dom[4]}`
  }
  console.log(`v0.${v} setCode copy: getSenderAddress -> ${res}; factory.getAddress=${expected}${extra}`)
}
