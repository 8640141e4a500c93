/**
 * `npm run build:origin [-- OUTDIR] [-- --bench]`: the enclave origin as
 * plain JavaScript (default `dist/enclave-origin`), what its processes run in
 * production. One file per source file, dependencies left to node_modules.
 * Run through tsx instead, each process paid for its TypeScript loader and
 * for esbuild's `keepNames` wrappers on every closure, about 10% of the
 * parent's CPU per signature. `--bench` also bundles `bench:origin` and its
 * floor servers into `dist/bench`, for the same reason: they share the CPU;
 * and compiles its GC-free load generator, test/bench/openLoad.c, with cc.
 */
import { spawnSync } from 'node:child_process'
import { build } from 'esbuild'
import { chmodSync, copyFileSync, existsSync, mkdirSync, mkdtempSync, readdirSync, renameSync, rmSync, statSync } from 'node:fs'
import path from 'node:path'

const source = 'enclave-origin'
const args = process.argv.slice(2)
// Normalised: a trailing / would put the names below inside it.
const outdir = path.resolve(args.find((arg) => !arg.startsWith('--')) ?? path.join('dist', source))
const files = readdirSync(source, { recursive: true }).map(String)
const node = { format: 'esm', platform: 'node', target: 'node20', logLevel: 'warning' }

// Built beside it and swapped in whole: processes running from `outdir` (`npm run origin` builds before each
// command, `status` too) keep a complete build under it but for the moment between two renames. A signing thread
// started later loads its script from there. The names are this build's own: two commands started together each
// build, and whichever swaps in last wins with a whole build (the same sources make the same build). What a build
// killed half-way left (over ten minutes old: no build takes that long) goes first.
mkdirSync(path.dirname(outdir), { recursive: true })
for (const name of readdirSync(path.dirname(outdir))) {
  if (!name.startsWith(`${path.basename(outdir)}.building-`)) continue
  const left = path.join(path.dirname(outdir), name)
  // Another build may remove its own meanwhile.
  const ageMs = Date.now() - (statSync(left, { throwIfNoEntry: false })?.mtimeMs ?? Date.now())
  if (ageMs > 600_000) rmSync(left, { recursive: true, force: true })
}
const building = mkdtempSync(`${outdir}.building-`)
const previous = `${building}.previous`
try {
  await build({ ...node, entryPoints: files.filter((file) => file.endsWith('.ts')).map((file) => path.join(source, file)), outdir: building })
  // The sign worker is JavaScript already; the engine loads it next to itself.
  for (const file of files.filter((name) => name.endsWith('.mjs'))) copyFileSync(path.join(source, file), path.join(building, file))
  // Readable by all, whatever the umask (mkdtemp makes the directory owner-only): an image built as root must let
  // the user it runs as read its code.
  chmodSync(building, 0o755)
  for (const entry of readdirSync(building, { recursive: true, withFileTypes: true })) {
    chmodSync(path.join(entry.parentPath ?? entry.path, entry.name), entry.isDirectory() ? 0o755 : 0o644)
  }
  for (;;) {
    try {
      if (existsSync(outdir)) renameSync(outdir, previous)
    } catch (error) {
      // Another build moved it away first.
      if (error.code !== 'ENOENT') throw error
    }
    try {
      renameSync(building, outdir)
      break
    } catch (error) {
      // Another build swapped its own in between our two renames: move that one aside too.
      if (error.code !== 'ENOTEMPTY' && error.code !== 'EEXIST') throw error
      rmSync(previous, { recursive: true, force: true })
    }
  }
} finally {
  rmSync(building, { recursive: true, force: true })
  rmSync(previous, { recursive: true, force: true })
}

if (args.includes('--bench')) {
  const benchDir = path.join('dist', 'bench')
  await build({
    ...node,
    entryPoints: ['origin', 'frameEcho', 'httpEcho'].map((name) => `test/bench/${name}.ts`),
    outdir: benchDir,
    bundle: true,
    packages: 'external',
  })
  // The GC-free load generator (frames and HTTP); the benchmark skips them without a C compiler.
  rmSync(path.join(benchDir, 'openLoad'), { force: true })
  const compiled = spawnSync('cc', ['-O2', '-Wall', '-Wextra', '-Werror', '-o', path.join(benchDir, 'openLoad'), 'test/bench/openLoad.c'], { stdio: 'inherit' })
  if (compiled.status !== 0) console.warn(`bench: could not compile test/bench/openLoad.c (${compiled.error?.message ?? `cc exited ${compiled.status}`}); the native-generator runs are skipped`)
}
