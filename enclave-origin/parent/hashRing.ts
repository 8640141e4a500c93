import { hash } from 'node:crypto'

/**
 * Consistent hashing of key ids onto enclaves, so each key lives in one
 * enclave's cache and adding an enclave moves only about 1/n of the keys.
 */
export class HashRing<Node> {
  private readonly points: Array<{ at: number; node: Node }>
  private readonly nodeCount: number

  constructor(nodes: Array<{ id: string; node: Node }>, virtualNodes = 128) {
    if (nodes.length === 0) throw new Error('a hash ring needs at least one node')
    this.nodeCount = nodes.length
    this.points = nodes
      .flatMap(({ id, node }) => Array.from({ length: virtualNodes }, (_, i) => ({ at: hash32(`${id}#${i}`), node })))
      .sort((a, b) => a.at - b.at)
  }

  nodeFor(key: string): Node {
    // One enclave owns every key: no hash on the sign path.
    if (this.nodeCount === 1) return this.points[0]!.node
    const at = hash32(key)
    let low = 0
    let high = this.points.length
    while (low < high) {
      const middle = (low + high) >>> 1
      if (this.points[middle]!.at < at) low = middle + 1
      else high = middle
    }
    return this.points[low % this.points.length]!.node
  }
}

/** The one-shot hash: `createHash` would leave a native object per request for the GC to finalise. */
function hash32(value: string): number {
  return (hash('sha256', value, 'buffer') as unknown as Buffer).readUInt32BE(0)
}
