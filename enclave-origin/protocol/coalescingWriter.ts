/**
 * Gathers the frames written to a socket during one turn of the event loop
 * into a single write: at thousands of small frames per second, one syscall
 * per frame costs more CPU than the signing itself.
 */
export class CoalescingWriter {
  private chunks: Uint8Array[] = []
  private bytes = 0
  private scheduled = false

  /** `onFlush`: called after each write, once the bytes held here are the socket's (see `bufferedBytes`). */
  constructor(
    private readonly socket: { write(data: Uint8Array): boolean; readonly destroyed: boolean },
    private readonly onFlush?: () => void,
  ) {}

  /** Frames are waiting for this turn's write. */
  get queued(): boolean {
    return this.scheduled
  }

  /** Bytes waiting for this turn's write: not yet in the socket's `writableLength`. */
  get bufferedBytes(): number {
    return this.bytes
  }

  write(frame: Uint8Array): void {
    this.chunks.push(frame)
    this.bytes += frame.byteLength
    if (this.scheduled) return
    this.scheduled = true
    setImmediate(this.flush)
  }

  private readonly flush = (): void => {
    this.scheduled = false
    const chunks = this.chunks
    this.chunks = []
    this.bytes = 0
    if (this.socket.destroyed || chunks.length === 0) return
    this.socket.write(chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks))
    this.onFlush?.()
  }
}
