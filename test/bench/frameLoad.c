/*
 * frameLoad: an open-loop load generator for the enclave's binary protocol
 * with no garbage collector, for `npm run bench:origin`.
 *
 * The benchmark's JavaScript generator shares the CPU with the origin, and
 * its own scavenges (5-15 ms each, several a second) hold back every request
 * it should send and every answer it should time: in diagnostic runs most
 * stretches of requests over 10 ms began at one. This program sends the same
 * SIGN frames at a fixed offered rate, so that the tail it reports is the
 * enclave's and the machine's, not a garbage collector's in the generator.
 *
 *   frameLoad PORT RATE SECONDS WARMUP_SECONDS CONNECTIONS MAX_IN_FLIGHT < key-ids
 *
 * Key ids come one per line on stdin; each request takes one at random and a
 * pseudo-random 32-byte digest. Latency runs from each request's scheduled
 * time (no coordinated omission). A request that would exceed MAX_IN_FLIGHT
 * is skipped and counted. The requests of one loop turn go out on one
 * connection in one write, as the parent's pool sends them. After
 * WARMUP_SECONDS unrecorded, SECONDS are recorded; then it waits up to 10 s
 * for the answers still out, and prints one JSON line: counts, latency
 * quantiles (client: end to end; enclave: the enclave's own time, from its
 * answer; -1 when no request succeeded) and its CPU time over the recorded
 * seconds. Recorded requests still unanswered after the drain count as failed.
 *
 * Wire format (enclave-origin/protocol/frames.ts and messages.ts):
 *   u32 BE length of the rest ‖ u32 BE requestId ‖ u8 opcode ‖ u8 status ‖ payload
 *   SIGN request payload:  u8 keyIdLength ‖ keyId ‖ digest(32)
 *   SIGN answer payload:   signature(64) ‖ u8 recoveryId ‖ u32 BE enclaveMicros
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>

#define OPCODE_SIGN 2
#define STATUS_OK 0
#define STATUS_NEEDS_UNLOCK 1
#define MAX_KEY_ID 128
/* The longest SIGN frame: length, requestId, opcode, status, keyId length, keyId, digest. */
#define MAX_FRAME (10 + 1 + MAX_KEY_ID + 32)
#define SLOT_BITS 20
#define SLOTS (1u << SLOT_BITS)
#define BUFFER_BYTES (1 << 20)
/*
 * The shortest sleep between two sends. Waking for every request (every
 * 55 µs at 18,000/s) cost half a core on the CPU the origin needs; a quarter
 * of a millisecond gathers a few requests per write, as the parent's pool
 * does, and adds at most that to a request's latency.
 */
#define MIN_WAIT_MS 0.25

typedef struct {
  int fd;
  unsigned char *out;
  size_t outLength;
  unsigned char *in;
  size_t inLength;
} Connection;

/* One per request id (modulo SLOTS); a slot still live when its id comes round again has timed out. */
typedef struct {
  double scheduledMs;
  unsigned char live;
  unsigned char recorded;
} Slot;

static double nowMs(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec * 1e3 + (double)t.tv_nsec / 1e6;
}

/* CPU time this process has used, user and system. */
static double cpuMs(void) {
  struct rusage usage;
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_utime.tv_sec * 1e3 + usage.ru_utime.tv_usec / 1e3 + usage.ru_stime.tv_sec * 1e3 + usage.ru_stime.tv_usec / 1e3;
}

static void die(const char *what) {
  perror(what);
  exit(1);
}

static uint32_t prng = 0x9e3779b9u;
static uint32_t nextRandom(void) {
  prng ^= prng << 13;
  prng ^= prng >> 17;
  prng ^= prng << 5;
  return prng;
}

static void putU32(unsigned char *at, uint32_t value) {
  at[0] = value >> 24;
  at[1] = value >> 16;
  at[2] = value >> 8;
  at[3] = value;
}

static uint32_t getU32(const unsigned char *at) {
  return ((uint32_t)at[0] << 24) | ((uint32_t)at[1] << 16) | ((uint32_t)at[2] << 8) | at[3];
}

static int compareDoubles(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

static double quantile(const double *sorted, size_t count, double q) {
  if (count == 0) return -1;
  size_t at = (size_t)(q * (double)(count - 1));
  return sorted[at];
}

static void flush(Connection *c) {
  size_t written = 0;
  while (written < c->outLength) {
    ssize_t n = write(c->fd, c->out + written, c->outLength - written);
    if (n < 0) {
      if (errno == EAGAIN || errno == EINTR) break;
      die("write");
    }
    written += (size_t)n;
  }
  memmove(c->out, c->out + written, c->outLength - written);
  c->outLength -= written;
}

int main(int argc, char **argv) {
  if (argc != 7) {
    fprintf(stderr, "usage: frameLoad PORT RATE SECONDS WARMUP_SECONDS CONNECTIONS MAX_IN_FLIGHT < key-ids\n");
    return 2;
  }
  int port = atoi(argv[1]);
  double rate = atof(argv[2]);
  double seconds = atof(argv[3]);
  double warmupSeconds = atof(argv[4]);
  int connectionCount = atoi(argv[5]);
  long maxInFlight = atol(argv[6]);
  if (port <= 0 || rate <= 0 || seconds <= 0 || warmupSeconds < 0 || connectionCount <= 0 || maxInFlight <= 0) {
    fprintf(stderr, "frameLoad: every argument must be positive\n");
    return 2;
  }

  size_t keyCapacity = 1024, keyCount = 0;
  char (*keys)[MAX_KEY_ID + 1] = malloc(keyCapacity * sizeof *keys);
  unsigned char *keyLengths = malloc(keyCapacity);
  char line[512];
  while (fgets(line, sizeof line, stdin)) {
    size_t length = strcspn(line, "\r\n");
    if (length == 0) continue;
    if (length > MAX_KEY_ID) {
      fprintf(stderr, "frameLoad: key id longer than %d bytes\n", MAX_KEY_ID);
      return 2;
    }
    if (keyCount == keyCapacity) {
      keyCapacity *= 2;
      keys = realloc(keys, keyCapacity * sizeof *keys);
      keyLengths = realloc(keyLengths, keyCapacity);
    }
    memcpy(keys[keyCount], line, length);
    keyLengths[keyCount++] = (unsigned char)length;
  }
  if (keyCount == 0) {
    fprintf(stderr, "frameLoad: no key ids on stdin\n");
    return 2;
  }

  int epoll = epoll_create1(0);
  if (epoll < 0) die("epoll_create1");
  Connection *connections = calloc((size_t)connectionCount, sizeof *connections);
  for (int i = 0; i < connectionCount; i++) {
    Connection *c = &connections[i];
    c->fd = socket(AF_INET, SOCK_STREAM, 0);
    if (c->fd < 0) die("socket");
    struct sockaddr_in address = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, "127.0.0.1", &address.sin_addr);
    if (connect(c->fd, (struct sockaddr *)&address, sizeof address) < 0) die("connect");
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (fcntl(c->fd, F_SETFL, O_NONBLOCK) < 0) die("fcntl");
    c->out = malloc(BUFFER_BYTES);
    c->in = malloc(BUFFER_BYTES);
    struct epoll_event event = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
    if (epoll_ctl(epoll, EPOLL_CTL_ADD, c->fd, &event) < 0) die("epoll_ctl");
  }

  Slot *slots = calloc(SLOTS, sizeof *slots);
  size_t latencyCapacity = (size_t)(rate * seconds * 1.1) + 1024;
  double *latencies = malloc(latencyCapacity * sizeof *latencies);
  double *enclaveMs = malloc(latencyCapacity * sizeof *enclaveMs);
  size_t recordedCount = 0;
  long inFlight = 0, skipped = 0, failed = 0, needsUnlock = 0, sentRecorded = 0;
  uint32_t nextId = 1;
  int nextConnection = 0;

  const double started = nowMs();
  const double recordFrom = started + warmupSeconds * 1e3;
  const double sendUntil = recordFrom + seconds * 1e3;
  const double drainUntil = sendUntil + 10e3;
  double sent = 0; /* requests scheduled so far, counted from `started` */
  double cpuAtRecordMs = -1, cpuAtEndMs = -1;
  struct epoll_event events[64];

  for (;;) {
    double now = nowMs();
    if (cpuAtRecordMs < 0 && now >= recordFrom) cpuAtRecordMs = cpuMs();
    if (cpuAtEndMs < 0 && now >= sendUntil) cpuAtEndMs = cpuMs();
    if (now >= sendUntil && (inFlight == 0 || now >= drainUntil)) break;
    if (now < sendUntil) {
      long due = (long)((now - started) / 1e3 * rate);
      Connection *c = &connections[nextConnection];
      nextConnection = (nextConnection + 1) % connectionCount;
      for (; (long)sent < due; sent++) {
        /* A full buffer waits for the next turn, before this request is counted. */
        if (c->outLength + MAX_FRAME > BUFFER_BYTES) break;
        double scheduledMs = started + sent / rate * 1e3;
        int recorded = scheduledMs >= recordFrom;
        if (recorded) sentRecorded++;
        if (inFlight >= maxInFlight) {
          if (recorded) skipped++;
          continue;
        }
        size_t key = nextRandom() % keyCount;
        size_t payloadLength = 1 + keyLengths[key] + 32;
        unsigned char *frame = c->out + c->outLength;
        uint32_t id = nextId++;
        if (nextId == 0) nextId = 1;
        putU32(frame, (uint32_t)(6 + payloadLength));
        putU32(frame + 4, id);
        frame[8] = OPCODE_SIGN;
        frame[9] = 0;
        frame[10] = keyLengths[key];
        memcpy(frame + 11, keys[key], keyLengths[key]);
        for (int w = 0; w < 8; w++) putU32(frame + 11 + keyLengths[key] + 4 * w, nextRandom());
        c->outLength += 10 + payloadLength;
        Slot *slot = &slots[id & (SLOTS - 1)];
        if (slot->live) {
          /* Still unanswered a million requests later: count it failed, as the JS generator's timeout would. */
          inFlight--;
          if (slot->recorded) failed++;
        }
        slot->scheduledMs = scheduledMs;
        slot->live = 1;
        slot->recorded = (unsigned char)recorded;
        inFlight++;
      }
    }
    for (int i = 0; i < connectionCount; i++) if (connections[i].outLength > 0) flush(&connections[i]);

    /* Sleep until the next request is due, at least MIN_WAIT_MS, or until an answer comes. */
    double nextDueMs = started + (sent + 1) / rate * 1e3;
    double waitMs = now < sendUntil ? nextDueMs - nowMs() : 5;
    if (waitMs < MIN_WAIT_MS) waitMs = MIN_WAIT_MS;
    struct timespec timeout = {.tv_sec = (time_t)(waitMs / 1e3), .tv_nsec = (long)(((long long)(waitMs * 1e6)) % 1000000000LL)};
    int ready = epoll_pwait2(epoll, events, 64, &timeout, NULL);
    if (ready < 0) {
      if (errno == EINTR) continue;
      die("epoll_pwait2");
    }
    double arrived = nowMs();
    for (int e = 0; e < ready; e++) {
      Connection *c = &connections[events[e].data.u32];
      for (;;) {
        ssize_t n = read(c->fd, c->in + c->inLength, BUFFER_BYTES - c->inLength);
        if (n < 0) {
          if (errno == EAGAIN || errno == EINTR) break;
          die("read");
        }
        if (n == 0) {
          fprintf(stderr, "frameLoad: the server closed a connection\n");
          return 1;
        }
        c->inLength += (size_t)n;
        size_t at = 0;
        while (c->inLength - at >= 10) {
          uint32_t length = getU32(c->in + at);
          if (c->inLength - at < 4 + (size_t)length) break;
          uint32_t id = getU32(c->in + at + 4);
          unsigned char status = c->in[at + 9];
          const unsigned char *payload = c->in + at + 10;
          Slot *slot = &slots[id & (SLOTS - 1)];
          if (slot->live) {
            slot->live = 0;
            inFlight--;
            if (slot->recorded) {
              if (status == STATUS_OK && length == 6 + 69) {
                latencies[recordedCount] = arrived - slot->scheduledMs;
                enclaveMs[recordedCount] = getU32(payload + 65) / 1e3;
                if (recordedCount + 1 < latencyCapacity) recordedCount++;
              } else {
                failed++;
                if (status == STATUS_NEEDS_UNLOCK) needsUnlock++;
              }
            }
          }
          at += 4 + length;
        }
        memmove(c->in, c->in + at, c->inLength - at);
        c->inLength -= at;
      }
    }
  }

  /* Recorded requests whose answers never came within the drain. */
  for (uint32_t i = 0; i < SLOTS; i++) if (slots[i].live && slots[i].recorded) failed++;
  double elapsedSeconds = (sendUntil - recordFrom) / 1e3;
  qsort(latencies, recordedCount, sizeof *latencies, compareDoubles);
  qsort(enclaveMs, recordedCount, sizeof *enclaveMs, compareDoubles);
  printf(
      "{\"offered\":%ld,\"ok\":%zu,\"failed\":%ld,\"needsUnlock\":%ld,\"skipped\":%ld,\"seconds\":%.3f,"
      "\"clientMs\":{\"p50\":%.2f,\"p90\":%.2f,\"p99\":%.2f,\"p999\":%.2f},"
      "\"enclaveMs\":{\"p50\":%.2f,\"p90\":%.2f,\"p99\":%.2f,\"p999\":%.2f},\"cpuMs\":%.1f}\n",
      sentRecorded, recordedCount, failed, needsUnlock, skipped, elapsedSeconds,
      quantile(latencies, recordedCount, 0.5), quantile(latencies, recordedCount, 0.9), quantile(latencies, recordedCount, 0.99), quantile(latencies, recordedCount, 0.999),
      quantile(enclaveMs, recordedCount, 0.5), quantile(enclaveMs, recordedCount, 0.9), quantile(enclaveMs, recordedCount, 0.99), quantile(enclaveMs, recordedCount, 0.999),
      cpuAtEndMs - cpuAtRecordMs);
  return 0;
}
