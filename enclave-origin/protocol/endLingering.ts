import type { Socket } from 'node:net'

/**
 * Ends a connection that is closing with a last word: what was written goes
 * out, then the write side closes. Until the peer closes too, the socket keeps
 * reading (the caller drops what comes): closing a TCP socket with input
 * unread resets the connection, and the reset can overtake that last word.
 * It is destroyed `lingerMs` after the last byte went out, or `capMs` after
 * this call if that never happens (a peer that reads nothing).
 */
export function endLingering(socket: Socket, options: { lingerMs: number; capMs: number }): void {
  if (socket.isPaused()) socket.resume()
  socket.end()
  const destroy = () => socket.destroy()
  let linger: NodeJS.Timeout | undefined
  socket.once('finish', () => (linger = setTimeout(destroy, options.lingerMs).unref()))
  const cap = setTimeout(destroy, options.capMs).unref()
  // A pending timer would hold the closed socket (and what refers to it) until it fires.
  socket.once('close', () => {
    clearTimeout(linger)
    clearTimeout(cap)
  })
}
