import { connect, type Socket } from 'node:net'

/** Raw HTTP/1.1 against a local server, for what a well-behaved client would never send. */

export type Exchange = { answer: string; closed: boolean; socket: Socket }

/**
 * Writes each part in turn (a number waits that many ms); resolves with what
 * came back once the server closes, once `answers` whole answers have come
 * (each JSON body ends with "}"; with `headsOnly`, answers to HEAD, each head ends with a blank line), or after `waitMs`.
 */
export function exchange(port: number, parts: Array<string | number>, options: { waitMs: number; endAfter?: boolean; answers?: number; headsOnly?: boolean }): Promise<Exchange> {
  return new Promise((resolve, reject) => {
    const socket = connect(port, '127.0.0.1')
    let answer = ''
    const done = (closed: boolean) => {
      clearTimeout(timer)
      resolve({ answer, closed, socket })
    }
    const timer = setTimeout(() => done(false), options.waitMs)
    socket.on('data', (chunk) => {
      answer += chunk.toString('latin1')
      if (options.answers !== undefined && answer.endsWith(options.headsOnly ? '\r\n\r\n' : '}') && statuses(answer).length >= options.answers) done(false)
    })
    socket.on('error', reject)
    socket.on('close', () => done(true))
    void (async () => {
      for (const part of parts) {
        if (typeof part === 'number') await new Promise((wait) => setTimeout(wait, part))
        else socket.write(part)
      }
      if (options.endAfter) socket.end()
    })()
  })
}

/** The status of each answer in what came back, in order. */
export const statuses = (answer: string) => [...answer.matchAll(/HTTP\/1\.1 (\d{3}) /g)].map((match) => Number(match[1]))
