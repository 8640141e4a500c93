import { expect, it } from 'vitest'
import { SignerMetrics, type AnalyticsEngineDataset } from '../../backends/signerMetrics.js'

it('counts outcomes per backend as Prometheus text, and streams each one to Analytics Engine when bound', () => {
  const points: Parameters<AnalyticsEngineDataset['writeDataPoint']>[0][] = []
  const metrics = new SignerMetrics({ writeDataPoint: (point) => points.push(point) })
  metrics.record('kms', 'timeout', 400)
  metrics.record('edge', 'success', 3)
  metrics.record('edge', 'success', 5)
  expect(metrics.count('edge', 'success')).toBe(2)
  const text = metrics.toPrometheus()
  expect(text).toContain('# TYPE paymaster_signer_requests_total counter')
  expect(text).toContain('paymaster_signer_requests_total{backend="kms",outcome="timeout"} 1')
  expect(text).toContain('paymaster_signer_requests_total{backend="edge",outcome="success"} 2')
  expect(text).toContain('paymaster_signer_latency_ms_sum{backend="edge",outcome="success"} 8')
  expect(points).toEqual([
    { blobs: ['kms', 'timeout'], doubles: [400], indexes: ['kms'] },
    { blobs: ['edge', 'success'], doubles: [3], indexes: ['edge'] },
    { blobs: ['edge', 'success'], doubles: [5], indexes: ['edge'] },
  ])
})
