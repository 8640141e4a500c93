/**
 * `npm run build:origin [-- OUTDIR]`: the enclave origin as plain JavaScript
 * (default `dist/enclave-origin`), what its processes run in production. One
 * file per source file, dependencies left to node_modules. Run through tsx
 * instead, each process paid for its TypeScript loader and for esbuild's
 * `keepNames` wrappers on every closure, about 10% of the parent's CPU per
 * signature.
 */
import { build } from 'esbuild'
import { copyFileSync, readdirSync, rmSync } from 'node:fs'
import path from 'node:path'

const source = 'enclave-origin'
const outdir = process.argv[2] ?? path.join('dist', source)
const files = readdirSync(source, { recursive: true }).map(String)

rmSync(outdir, { recursive: true, force: true })
await build({
  entryPoints: files.filter((file) => file.endsWith('.ts')).map((file) => path.join(source, file)),
  outdir,
  format: 'esm',
  platform: 'node',
  target: 'node20',
  logLevel: 'warning',
})
// The sign worker is JavaScript already; the engine loads it next to itself.
for (const file of files.filter((name) => name.endsWith('.mjs'))) copyFileSync(path.join(source, file), path.join(outdir, file))
