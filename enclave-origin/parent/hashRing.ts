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
    return this.points[this.firstPointFor(key)]!.node
  }

  /**
   * Every node, in the order the key would fall to them: its owner, then
   * the next distinct nodes clockwise. Each node's keys spread over all the
   * others, so no one node takes a failed node's whole load.
   */
  nodesFor(key: string): Node[] {
    const nodes: Node[] = []
    const first = this.firstPointFor(key)
    for (let step = 0; step < this.points.length && nodes.length < this.nodeCount; step++) {
      const { node } = this.points[(first + step) % this.points.length]!
      if (!nodes.includes(node)) nodes.push(node)
    }
    return nodes
  }

  /** The index of the first point at or after the key's hash, wrapping round. */
  private firstPointFor(key: string): number {
    const at = hash32(key)
    let low = 0
    let high = this.points.length
    while (low < high) {
      const middle = (low + high) >>> 1
      if (this.points[middle]!.at < at) low = middle + 1
      else high = middle
    }
    return low % this.points.length
  }
}

/** The one-shot hash: `createHash` would leave a native object per request for the GC to finalise. */
function hash32(value: string): number {
  return (hash('sha256', value, 'buffer') as unknown as Buffer).readUInt32BE(0)
}
