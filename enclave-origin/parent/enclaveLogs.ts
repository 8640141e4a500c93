import { jsonObjectOf, messageOf } from '../errors.js'
import { decodeLogsResponse, encodeLogsRequest } from '../protocol/messages.js'
import { EnclaveUnavailableError } from './enclavePool.js'

/**
 * Collects one enclave's log lines (LOGS) and writes them to the parent's
 * log, each with `source: "enclave"` and the enclave's id: in production no
 * one reads an enclave's console, and its audits must reach someone. Asks
 * once a `poll`, and again at once while the enclave says it holds more;
 * each request acknowledges the lines of the last answer, which the enclave
 * then forgets. Lines it dropped before they were collected (it keeps a
 * bounded amount) are reported as `enclave_log_lines_lost`. An enclave out
 * of reach (`ask` rejects with EnclaveUnavailableError) is asked again at a
 * later poll; its health says why.
 */
export class EnclaveLogCollector {
  private instance = 0
  private after = 0
  private collecting: Promise<void> | undefined
  /** Collection fails for a reason other than the enclave being out of reach: said once, until it works again. */
  private failing = false

  constructor(
    private readonly options: {
      enclave: string
      /** Sends a LOGS request; resolves to the OK answer's payload (any other answer rejects). */
      ask: (payload: Uint8Array) => Promise<Uint8Array>
      log: (fields: Record<string, unknown>) => void
    },
  ) {}

  /** Collects what there is; one collection at a time (a poll during one joins it). */
  poll(): Promise<void> {
    this.collecting ??= this.collect().finally(() => {
      this.collecting = undefined
    })
    return this.collecting
  }

  private async collect(): Promise<void> {
    const { enclave, log } = this.options
    for (;;) {
      let answer
      try {
        answer = decodeLogsResponse(await this.options.ask(encodeLogsRequest({ instance: this.instance, after: this.after })))
      } catch (error) {
        // Out of reach: its health says so. Anything else (a refusal, an answer this parent cannot read) would
        // stop the enclave's lines reaching anyone, silently: said once.
        if (error instanceof EnclaveUnavailableError) return
        if (!this.failing) log({ level: 'error', event: 'enclave_logs_not_collected', enclave, error: messageOf(error) })
        this.failing = true
        return
      }
      this.failing = false
      if (answer.skipped > 0) log({ level: 'warn', event: 'enclave_log_lines_lost', source: 'enclave', enclave, count: answer.skipped })
      // A line that is not a JSON object is kept as its text.
      for (const line of answer.lines) log({ ...(jsonObjectOf(line) ?? { event: 'enclave_log_line', text: line }), source: 'enclave', enclave })
      this.instance = answer.instance
      this.after = answer.first + answer.lines.length - 1
      if (!answer.more || answer.lines.length === 0) return
    }
  }
}
