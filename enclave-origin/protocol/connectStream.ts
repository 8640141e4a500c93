import { connect, type Socket } from 'node:net'
import type { StreamAddress } from '../config.js'
import { connectVsock } from './vsock.js'

const connectTimeoutMs = 2_000

/** A connected byte stream: vsock in an enclave, TCP or a Unix socket elsewhere. */
export function connectStream(address: StreamAddress): Promise<Socket> {
  if ('vsock' in address) return connectVsock({ ...address.vsock, timeoutMs: connectTimeoutMs })
  return new Promise<Socket>((resolve, reject) => {
    const socket = connect(address)
    const timer = setTimeout(() => socket.destroy(new Error('connect timeout')), connectTimeoutMs)
    socket.once('connect', () => {
      clearTimeout(timer)
      resolve(socket)
    })
    socket.once('error', (error) => {
      clearTimeout(timer)
      reject(error)
    })
  })
}
