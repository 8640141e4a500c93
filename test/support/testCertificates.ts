import { execFileSync } from 'node:child_process'
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import path from 'node:path'

/** A P-256 certificate authority made with openssl at test time, and the certificates it issues (PEM). */
export type TestCa = {
  caPem: string
  /** A leaf certificate and its key; `subjectAltName` as openssl writes it, e.g. `IP:127.0.0.1` or `DNS:kms.example`. */
  issue(name: string, subjectAltName?: string): { cert: string; key: string }
  close(): void
}

export function startTestCa(commonName = 'test CA'): TestCa {
  const dir = mkdtempSync(path.join(tmpdir(), 'test-ca-'))
  const openssl = (args: string[]) => execFileSync('openssl', args, { cwd: dir, stdio: 'ignore' })
  const p256 = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes']
  const read = (file: string) => readFileSync(path.join(dir, file), 'utf8')
  openssl(['req', '-x509', ...p256, '-keyout', 'ca.key', '-out', 'ca.crt', '-days', '1', '-subj', `/CN=${commonName}`])
  return {
    caPem: read('ca.crt'),
    issue(name, subjectAltName) {
      openssl(['req', ...p256, '-keyout', `${name}.key`, '-out', `${name}.csr`, '-subj', `/CN=${name}`])
      const extensions = subjectAltName ? ['-extfile', `${name}.ext`] : []
      if (subjectAltName) writeFileSync(path.join(dir, `${name}.ext`), `subjectAltName=${subjectAltName}\n`)
      openssl(['x509', '-req', '-in', `${name}.csr`, '-CA', 'ca.crt', '-CAkey', 'ca.key', '-CAcreateserial', '-out', `${name}.crt`, '-days', '1', ...extensions])
      return { cert: read(`${name}.crt`), key: read(`${name}.key`) }
    },
    close: () => rmSync(dir, { recursive: true, force: true }),
  }
}
