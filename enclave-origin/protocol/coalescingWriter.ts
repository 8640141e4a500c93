/**
 * Gathers the frames written to a socket during one turn of the event loop
 * into a single write: at thousands of small frames per second, one syscall
 * per frame costs more CPU than the signing itself.
 */
export class CoalescingWriter {
  private chunks: Uint8Array[] = []
  private scheduled = false

  constructor(private readonly socket: { write(data: Uint8Array): boolean; readonly destroyed: boolean }) {}

  /** Frames are waiting for this turn's write. */
  get queued(): boolean {
    return this.scheduled
  }

  write(frame: Uint8Array): void {
    this.chunks.push(frame)
    if (this.scheduled) return
    this.scheduled = true
    setImmediate(this.flush)
  }

  private readonly flush = (): void => {
    this.scheduled = false
    const chunks = this.chunks
    this.chunks = []
    if (this.socket.destroyed || chunks.length === 0) return
    this.socket.write(chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks))
  }
}
