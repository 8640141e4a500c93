import { createHash } from 'node:crypto'

/**
 * Consistent hashing of key ids onto enclaves, so each key lives in one
 * enclave's cache and adding an enclave moves only about 1/n of the keys.
 */
export class HashRing<Node> {
  private readonly points: Array<{ at: number; node: Node }>

  constructor(nodes: Array<{ id: string; node: Node }>, virtualNodes = 128) {
    if (nodes.length === 0) throw new Error('a hash ring needs at least one node')
    this.points = nodes
      .flatMap(({ id, node }) => Array.from({ length: virtualNodes }, (_, i) => ({ at: hash32(`${id}#${i}`), node })))
      .sort((a, b) => a.at - b.at)
  }

  nodeFor(key: string): Node {
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

function hash32(value: string): number {
  return createHash('sha256').update(value).digest().readUInt32BE(0)
}
