/**
 * Malformed variants of valid requests, for the sweeps that check bad input
 * gets a clear error and harms nothing: values of the wrong type, size or
 * form put in place of what was there, or what was there removed.
 */

export type Json = null | boolean | number | string | Json[] | { [key: string]: Json }

const strangeValues: Json[] = [
  null,
  true,
  0,
  -1,
  1.5,
  2 ** 53,
  -(2 ** 63),
  1e308,
  '',
  '0x',
  '0x0',
  '0xzz',
  '0X12',
  ' 0x12',
  '0x' + 'f'.repeat(63),
  '0x' + 'f'.repeat(64),
  '0x' + 'f'.repeat(65),
  '0x' + 'ff'.repeat(20_000),
  'x'.repeat(70_000),
  '\u0000',
  '\ud800',
  '😀',
  [],
  [null],
  {},
  JSON.parse('{"__proto__": {"polluted": true}}') as Json,
  { constructor: { prototype: { polluted: true } } },
  { toString: 'not a function' },
  JSON.parse('['.repeat(100) + ']'.repeat(100)) as Json,
]

export function strangeValue(random: () => number): Json {
  return strangeValues[Math.floor(random() * strangeValues.length)]!
}

/** Every path to a value in `value`, the root's included. */
function pathsOf(value: Json, prefix: Array<string | number> = []): Array<Array<string | number>> {
  const below = Array.isArray(value)
    ? value.flatMap((item, index) => pathsOf(item, [...prefix, index]))
    : value !== null && typeof value === 'object'
      ? Object.entries(value).flatMap(([key, item]) => pathsOf(item, [...prefix, key]))
      : []
  return [prefix, ...below]
}

/** `value` with the thing at `path` replaced by `replacement`, or removed when `replacement` is undefined (the root: null). */
function withAt(value: Json, path: Array<string | number>, replacement: Json | undefined): Json {
  if (path.length === 0) return replacement === undefined ? null : replacement
  const [head, ...rest] = path
  if (Array.isArray(value)) {
    const copy = [...value]
    if (rest.length === 0 && replacement === undefined) copy.splice(head as number, 1)
    else copy[head as number] = withAt(copy[head as number]!, rest, replacement)
    return copy
  }
  const copy = { ...(value as Record<string, Json>) }
  if (rest.length === 0 && replacement === undefined) delete copy[head as string]
  // Defined, not assigned: a key named __proto__ stays a key.
  else Object.defineProperty(copy, head as string, { value: withAt(copy[head as string]!, rest, replacement), enumerable: true, writable: true, configurable: true })
  return copy
}

/**
 * `base` with one to three of its own values (mostly leaves, the whole of it only now and then) replaced by a
 * strange value, or removed. Each is a path of `base`, none inside one already changed, so the changes land in the request's fields,
 * not inside a strange value put in by an earlier one.
 */
export function mutated(base: Json, random: () => number): Json {
  const [root, ...fields] = pathsOf(base)
  // Mostly leaves (a quantity, an address, hex bytes), where a value of the wrong form goes furthest before it is caught.
  const leaves = fields.filter((path) => {
    const value = path.reduce<Json>((at, step) => (at as Record<string, Json>)[step]!, base)
    return value === null || typeof value !== 'object'
  })
  const pick = random()
  const candidates = pick < 0.05 || fields.length === 0 ? [root!] : pick < 0.8 && leaves.length > 0 ? leaves : fields
  const changed: Array<Array<string | number>> = []
  let value = base
  const changes = 1 + Math.floor(random() * 3)
  for (let i = 0; i < changes; i++) {
    const path = candidates[Math.floor(random() * candidates.length)]!
    const replacement = random() < 0.15 ? undefined : strangeValue(random)
    if (changed.some((done) => done.length <= path.length && done.every((step, at) => path[at] === step))) continue
    // A removal shifts the array's later elements: paths into them no longer name what they did.
    if (replacement === undefined && typeof path.at(-1) === 'number') changed.push(path.slice(0, -1))
    changed.push(path)
    value = withAt(value, path, replacement)
  }
  return value
}
