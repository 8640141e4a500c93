import { readFileSync } from 'node:fs'

/** The PROFILE and PAYMASTER_CONFIG pairs wrangler.toml defines, in file order (top level first). */
export function wranglerProfileConfigs(path = 'wrangler.toml'): Array<{ profile: string; config: string }> {
  const toml = readFileSync(path, 'utf8')
  return [...toml.matchAll(/PROFILE = "([a-z-]+)"\nPAYMASTER_CONFIG = '''([\s\S]*?)'''/g)].map(([, profile, config]) => ({
    profile: profile!,
    config: config!,
  }))
}
