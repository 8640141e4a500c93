import { ParseError, PayloadTooLargeError } from '../errors.js'

/**
 * Reads and parses a JSON body of at most `maxBytes`, counting as it reads so a
 * missing or false Content-Length cannot make us buffer more than the limit.
 */
export async function readJsonBody(request: Request, maxBytes: number): Promise<unknown> {
  const declared = Number(request.headers.get('content-length'))
  if (Number.isFinite(declared) && declared > maxBytes) {
    throw new PayloadTooLargeError(`request body of ${declared} bytes exceeds the limit of ${maxBytes} bytes`)
  }
  const bytes = await readAtMost(request, maxBytes)
  let text: string
  try {
    text = new TextDecoder('utf-8', { fatal: true, ignoreBOM: false }).decode(bytes)
  } catch {
    throw new ParseError('request body is not valid UTF-8')
  }
  if (text.trim() === '') throw new ParseError('request body is empty; expected JSON')
  try {
    return JSON.parse(text)
  } catch {
    throw new ParseError('request body is not valid JSON')
  }
}

async function readAtMost(request: Request, maxBytes: number): Promise<Uint8Array> {
  if (!request.body) return new Uint8Array()
  const reader = request.body.getReader()
  const chunks: Uint8Array[] = []
  let total = 0
  for (;;) {
    const { done, value } = await reader.read()
    if (done) break
    total += value.byteLength
    if (total > maxBytes) {
      await reader.cancel()
      throw new PayloadTooLargeError(`request body exceeds the limit of ${maxBytes} bytes`)
    }
    chunks.push(value)
  }
  const bytes = new Uint8Array(total)
  let offset = 0
  for (const chunk of chunks) {
    bytes.set(chunk, offset)
    offset += chunk.byteLength
  }
  return bytes
}
