import { setFlagsFromString } from 'node:v8'

/**
 * Turns off V8's allocation-site pretenuring for this process. Call it first
 * thing in a process that serves many short requests.
 *
 * After a burst (start-up warming, a spike) V8 may decide that objects from a
 * request path's allocation sites live long, and allocate them in old space
 * from then on. Dead there, they keep young objects alive, and every scavenge
 * copies and promotes them. It happens in some runs and not in others:
 * - the enclave at 3,000 signs/s: each scavenge kept ~560 KB alive and paused
 *   4.7–5.2 ms on average, against 4–13 KB and 1.8–2.9 ms with this off;
 * - the parent at 5,200 signs/s: one run in five spent 84 ms a second in GC
 *   (10 ms pauses) against 18–26 ms in the others; none in five with this off;
 * - a standalone copy of the benchmark's load loop at 18,000 requests/s:
 *   two runs in four kept ~2.5 MB per scavenge (5–15 ms pauses), none in
 *   four with this off.
 */
export function keepRequestObjectsYoung(): void {
  setFlagsFromString('--no-allocation-site-pretenuring')
}
