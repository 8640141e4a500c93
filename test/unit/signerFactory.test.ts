import { describe, expect, it } from 'vitest'
import { keccak256, toHex, type Address } from 'viem'
import { generatePrivateKey, privateKeyToAddress } from 'viem/accounts'
import { DeclaredAddressSigner } from '../../backends/declaredAddress.js'
import { createSigners } from '../../backends/factory.js'
import { LocalSigner } from '../../backends/local.js'
import { SignerMetrics } from '../../backends/signerMetrics.js'
import { loadConfig } from '../../config/load.js'

const digest = keccak256(toHex('factory'))
const paymaster = '0xd8a5406e24dcdc93656c1ef20e491a1fcf43b558'
const singleton = { entryPointVersion: '0.7', contract: 'pimlico-singleton', address: paymaster }
const verifying = { entryPointVersion: '0.7', contract: 'eth-infinitism-verifying', address: paymaster }

function signersFor(options: { signers: Record<string, unknown>; paymasterOnChain: object; env: Record<string, string> }) {
  const config = loadConfig({ PAYMASTER_CONFIG: { chains: [{ chainId: 8453, paymasters: [options.paymasterOnChain] }], signers: options.signers } })
  return createSigners({ config, env: options.env, metrics: new SignerMetrics() })
}

describe('signers built from config', () => {
  it('a signer whose key is not the address its config declares refuses to sign, and is not healthy', async () => {
    const [meant, actual] = [generatePrivateKey(), generatePrivateKey()]
    const signer = signersFor({
      signers: { primary: { kind: 'local', secret: 'KEY', address: privateKeyToAddress(meant) } },
      paymasterOnChain: singleton,
      env: { KEY: actual },
    }).get('primary')!
    const mismatch = `signer primary: its key has address ${privateKeyToAddress(actual)}, but its config declares ${privateKeyToAddress(meant)}`
    await expect(signer.signDigest(digest)).rejects.toThrow(mismatch)
    await expect(signer.address()).rejects.toThrow(mismatch)
    expect(await signer.health()).toEqual({ ok: false, error: mismatch })
  })

  it('a declared address matches however it is cased', async () => {
    const key = generatePrivateKey()
    const local = new LocalSigner({ name: 'primary', privateKey: key, secretName: 'KEY', allowEphemeral: false })
    const signer = new DeclaredAddressSigner({ signer: local, declared: privateKeyToAddress(key).toLowerCase() as Address })
    expect(await signer.signDigest(digest)).toMatchObject({ signedBy: 'primary', address: privateKeyToAddress(key) })
    expect(await signer.health()).toEqual({ ok: true, address: privateKeyToAddress(key) })
  })

  it('for a single-signer paymaster, the address a member declares is the chain\'s, whichever member signs first', async () => {
    const [declared, other] = [generatePrivateKey(), generatePrivateKey()]
    const chainWithBackupKey = (backupKey: string) =>
      signersFor({
        signers: {
          primary: { kind: 'fallback', members: ['kms', 'edge'] },
          // Its secret is not set: the primary cannot sign, and the backup answers first.
          kms: { kind: 'local', secret: 'KMS_KEY', address: privateKeyToAddress(declared) },
          edge: { kind: 'local', secret: 'EDGE_KEY' },
        },
        paymasterOnChain: verifying,
        env: { EDGE_KEY: backupKey },
      }).get('primary')!
    const misconfigured = chainWithBackupKey(other)
    await expect(misconfigured.signDigest(digest)).rejects.toThrow(`edge signs as ${privateKeyToAddress(other)}, but this chain's paymaster accepts only ${privateKeyToAddress(declared)}`)
    expect((await misconfigured.health()).ok).toBe(false)
    expect(await chainWithBackupKey(declared).signDigest(digest)).toMatchObject({ signedBy: 'edge', address: privateKeyToAddress(declared) })
  })
})
