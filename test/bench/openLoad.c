/*
 * openLoad: an open-loop load generator with no garbage collector, for
 * `npm run bench:origin`, in two modes: `frames` sends SIGN frames straight
 * to the enclave (its binary protocol), `http` sends signed sign requests to
 * the parent's HTTP API, as the Worker does.
 *
 * The benchmark's JavaScript generator shares the CPU with the origin, and
 * its own scavenges (5-15 ms each, several a second) hold back every request
 * it should send and every answer it should time: in diagnostic runs most
 * stretches of requests over 10 ms began at one. This program offers the
 * same requests at a fixed rate, so that the tail it reports is the
 * origin's and the machine's, not a garbage collector's in the generator.
 *
 *   openLoad frames|http PORT RATE SECONDS WARMUP_SECONDS CONNECTIONS MAX_IN_FLIGHT < key-ids
 *
 * Key ids come one per line on stdin; each request takes one at random and a
 * pseudo-random 32-byte digest. Latency runs from each request's scheduled
 * time (no coordinated omission). A request that would exceed MAX_IN_FLIGHT
 * (in http mode: that finds every connection busy) is skipped and counted,
 * as is a recorded one still unsent when the drain ends.
 * After WARMUP_SECONDS unrecorded, SECONDS are recorded; then it waits up to
 * 10 s for the answers still out, and prints one JSON line: counts, latency
 * quantiles per phase (-1 when no request succeeded), its CPU time over
 * the recorded seconds, and the bursts its slow requests came in
 * (printSlowBursts). Recorded requests still unanswered after the drain
 * count as failed.
 *
 * frames: the requests of one loop turn go out on one connection in one
 * write, as the parent's pool sends them; answers are matched by request id.
 *   u32 BE length of the rest | u32 BE requestId | u8 opcode | u8 status | payload
 *   SIGN request payload:  u8 keyIdLength | keyId | digest(32)
 *   SIGN answer payload:   signature(64) | u8 recoveryId | u32 BE enclaveMicros
 *   (enclave-origin/protocol/frames.ts and messages.ts)
 * Phases: client (end to end) and enclave (the enclave's own time).
 *
 * http: one request at a time per keep-alive connection, as a Worker's
 * fetch does: POST /v1/keys/{keyId}/sign with {"digest":"0x..."}, signed as
 * enclave-origin/protocol/requestSigning.ts describes, with the key id and
 * secret from ORIGIN_HMAC_KEY_ID and ORIGIN_HMAC_SECRET. A 200 is a success,
 * a 503 whose body says "needs_unlock" is NEEDS_UNLOCK (another 503, an
 * overloaded parent's say, is only a failure). Phases: client, rpc, parent (total - rpc) and
 * enclave, from the answer's Server-Timing. Connections are taken oldest
 * first; one the server closes or resets, or whose answer says
 * `connection: close`, is dropped (a request out on it counts as failed) and
 * the run goes on with the others.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <math.h>
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
/* The longest request either mode writes: a SIGN frame is far shorter than an HTTP request. */
#define MAX_REQUEST 1024
#define SLOT_BITS 20
#define SLOTS (1u << SLOT_BITS)
#define BUFFER_BYTES (1 << 20)
/*
 * The shortest sleep between two sends. Waking for every request (every
 * 55 us at 18,000/s) cost half a core on the CPU the origin needs; a quarter
 * of a millisecond gathers a few requests per write, as the parent's pool
 * does, and adds at most that to a request's latency.
 */
#define MIN_WAIT_MS 0.25

enum { PHASE_CLIENT, PHASE_RPC, PHASE_PARENT, PHASE_ENCLAVE, PHASES };
static const char *phaseNames[PHASES] = {"client", "rpc", "parent", "enclave"};

typedef struct {
  int fd;
  /* Set once the server has closed it: it carries nothing more. */
  int closed;
  unsigned char *out;
  size_t outLength;
  unsigned char *in;
  size_t inLength;
} Connection;

/*
 * One request out: in frames mode one per request id (modulo SLOTS), in
 * http mode one per connection. A frames slot still live when its id comes
 * round again has timed out.
 */
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

static void toHex(const unsigned char *bytes, size_t length, char *out) {
  static const char digits[] = "0123456789abcdef";
  for (size_t i = 0; i < length; i++) {
    out[2 * i] = digits[bytes[i] >> 4];
    out[2 * i + 1] = digits[bytes[i] & 15];
  }
  out[2 * length] = 0;
}

/* ---------------------------------------------------------------- SHA-256 and HMAC (FIPS 180-4, RFC 2104) */

typedef struct {
  uint32_t state[8];
  unsigned char block[64];
  size_t blockLength;
  uint64_t totalLength;
} Sha256;

static const uint32_t roundConstants[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be,
    0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa,
    0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85,
    0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3,
    0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f,
    0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};

static uint32_t rotateRight(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

static void sha256Block(Sha256 *h, const unsigned char *block) {
  uint32_t w[64];
  for (int i = 0; i < 16; i++) w[i] = getU32(block + 4 * i);
  for (int i = 16; i < 64; i++) {
    uint32_t s0 = rotateRight(w[i - 15], 7) ^ rotateRight(w[i - 15], 18) ^ (w[i - 15] >> 3);
    uint32_t s1 = rotateRight(w[i - 2], 17) ^ rotateRight(w[i - 2], 19) ^ (w[i - 2] >> 10);
    w[i] = w[i - 16] + s0 + w[i - 7] + s1;
  }
  uint32_t a = h->state[0], b = h->state[1], c = h->state[2], d = h->state[3], e = h->state[4], f = h->state[5], g = h->state[6], k = h->state[7];
  for (int i = 0; i < 64; i++) {
    uint32_t t1 = k + (rotateRight(e, 6) ^ rotateRight(e, 11) ^ rotateRight(e, 25)) + ((e & f) ^ (~e & g)) + roundConstants[i] + w[i];
    uint32_t t2 = (rotateRight(a, 2) ^ rotateRight(a, 13) ^ rotateRight(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
    k = g;
    g = f;
    f = e;
    e = d + t1;
    d = c;
    c = b;
    b = a;
    a = t1 + t2;
  }
  h->state[0] += a;
  h->state[1] += b;
  h->state[2] += c;
  h->state[3] += d;
  h->state[4] += e;
  h->state[5] += f;
  h->state[6] += g;
  h->state[7] += k;
}

static void sha256Start(Sha256 *h) {
  static const uint32_t initial[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  memcpy(h->state, initial, sizeof initial);
  h->blockLength = 0;
  h->totalLength = 0;
}

static void sha256Add(Sha256 *h, const void *data, size_t length) {
  const unsigned char *bytes = data;
  h->totalLength += length;
  while (length > 0) {
    size_t take = 64 - h->blockLength < length ? 64 - h->blockLength : length;
    memcpy(h->block + h->blockLength, bytes, take);
    h->blockLength += take;
    bytes += take;
    length -= take;
    if (h->blockLength == 64) {
      sha256Block(h, h->block);
      h->blockLength = 0;
    }
  }
}

static void sha256Finish(Sha256 *h, unsigned char digest[32]) {
  uint64_t bits = h->totalLength * 8;
  unsigned char pad = 0x80, zero = 0, length[8];
  sha256Add(h, &pad, 1);
  while (h->blockLength != 56) sha256Add(h, &zero, 1);
  for (int i = 0; i < 8; i++) length[i] = (unsigned char)(bits >> (56 - 8 * i));
  sha256Add(h, length, 8);
  for (int i = 0; i < 8; i++) putU32(digest + 4 * i, h->state[i]);
}

/* HMAC-SHA256 with a key of at most 64 bytes (the benchmark's secret is). */
static void hmacSha256(const unsigned char *key, size_t keyLength, const char *message, size_t messageLength, unsigned char mac[32]) {
  unsigned char pad[64], inner[32];
  Sha256 h;
  for (int pass = 0; pass < 2; pass++) {
    memset(pad, pass == 0 ? 0x36 : 0x5c, 64);
    for (size_t i = 0; i < keyLength; i++) pad[i] ^= key[i];
    sha256Start(&h);
    sha256Add(&h, pad, 64);
    if (pass == 0) sha256Add(&h, message, messageLength);
    else sha256Add(&h, inner, 32);
    sha256Finish(&h, pass == 0 ? inner : mac);
  }
}

/* ---------------------------------------------------------------- requests */

typedef struct {
  int http;
  const char *host;
  const char *hmacKeyId;
  const unsigned char *hmacSecret;
  size_t hmacSecretLength;
  uint64_t nonceCounter;
} Requests;

/* A SIGN frame with request id `id`; returns its length. */
static size_t writeFrame(unsigned char *frame, uint32_t id, const char *keyId, size_t keyIdLength) {
  size_t payloadLength = 1 + keyIdLength + 32;
  putU32(frame, (uint32_t)(6 + payloadLength));
  putU32(frame + 4, id);
  frame[8] = OPCODE_SIGN;
  frame[9] = 0;
  frame[10] = (unsigned char)keyIdLength;
  memcpy(frame + 11, keyId, keyIdLength);
  for (int w = 0; w < 8; w++) putU32(frame + 11 + keyIdLength + 4 * w, nextRandom());
  return 10 + payloadLength;
}

/* A signed HTTP sign request; returns its length. */
static size_t writeHttpRequest(Requests *r, unsigned char *out, const char *keyId, size_t keyIdLength) {
  unsigned char digest[32], bodyHash[32], mac[32], nonceBytes[16];
  char digestHex[65], bodyHashHex[65], macHex[65], nonce[33], path[160], body[96], signedText[512];
  for (int w = 0; w < 8; w++) putU32(digest + 4 * w, nextRandom());
  toHex(digest, 32, digestHex);
  int bodyLength = snprintf(body, sizeof body, "{\"digest\":\"0x%s\"}", digestHex);
  snprintf(path, sizeof path, "/v1/keys/%.*s/sign", (int)keyIdLength, keyId);
  Sha256 h;
  sha256Start(&h);
  sha256Add(&h, body, (size_t)bodyLength);
  sha256Finish(&h, bodyHash);
  toHex(bodyHash, 32, bodyHashHex);
  /* A counter and a random word: unique within the parent's replay window. */
  uint64_t counter = ++r->nonceCounter;
  for (int i = 0; i < 8; i++) nonceBytes[i] = (unsigned char)(counter >> (56 - 8 * i));
  putU32(nonceBytes + 8, nextRandom());
  putU32(nonceBytes + 12, nextRandom());
  toHex(nonceBytes, 16, nonce);
  struct timespec wall;
  clock_gettime(CLOCK_REALTIME, &wall);
  long long timestamp = (long long)wall.tv_sec * 1000 + wall.tv_nsec / 1000000;
  int signedLength = snprintf(signedText, sizeof signedText, "%s\nPOST\n%s\n%lld\n%s\n%s", r->hmacKeyId, path, timestamp, nonce, bodyHashHex);
  hmacSha256(r->hmacSecret, r->hmacSecretLength, signedText, (size_t)signedLength, mac);
  toHex(mac, 32, macHex);
  int length = snprintf((char *)out, MAX_REQUEST,
                        "POST %s HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                        "x-origin-key-id: %s\r\nx-origin-timestamp: %lld\r\nx-origin-nonce: %s\r\nx-origin-signature: %s\r\n\r\n%s",
                        path, r->host, bodyLength, r->hmacKeyId, timestamp, nonce, macHex, body);
  if (length <= 0 || length >= MAX_REQUEST) {
    fprintf(stderr, "openLoad: request longer than %d bytes\n", MAX_REQUEST);
    exit(2);
  }
  return (size_t)length;
}

/* ---------------------------------------------------------------- answers */

typedef struct {
  double *phases[PHASES];
  /* Each success's scheduled time, for the slow bursts (printSlowBursts). */
  double *scheduledMs;
  size_t count;
  size_t capacity;
  long failed;
  long needsUnlock;
} Results;

/* A recorded answer: a success with its phase times (NaN where the answer had none), or a failure. */
static void recordAnswer(Results *results, int ok, int needsUnlock, double scheduledMs, const double phaseMs[PHASES]) {
  if (!ok) {
    results->failed++;
    if (needsUnlock) results->needsUnlock++;
    return;
  }
  for (int p = 0; p < PHASES; p++) results->phases[p][results->count] = phaseMs[p];
  results->scheduledMs[results->count] = scheduledMs;
  if (results->count + 1 < results->capacity) results->count++;
}

/* The `name;dur=X` value in a Server-Timing header, or NaN. */
static double serverTiming(const char *headers, size_t length, const char *name) {
  char needle[32];
  int needleLength = snprintf(needle, sizeof needle, "%s;dur=", name);
  const char *found = memmem(headers, length, needle, (size_t)needleLength);
  return found ? strtod(found + needleLength, NULL) : NAN;
}

/*
 * Completes the connection's answer once it is all there (only one request is
 * out at a time): 0 if it is not yet, 1 if it is, 2 if it is and says
 * `connection: close` (the connection must not carry another request: the
 * server's FIN may come a turn later, and a request sent meanwhile is reset).
 */
static int readHttpAnswer(Connection *c, Slot *slot, double arrived, Results *results, long *inFlight) {
  const unsigned char *end = memmem(c->in, c->inLength, "\r\n\r\n", 4);
  if (!end) return 0;
  size_t headLength = (size_t)(end - c->in) + 4;
  /* Lower-case a copy of the head: header names are case-insensitive. */
  char head[4096];
  size_t copied = headLength < sizeof head - 1 ? headLength : sizeof head - 1;
  for (size_t i = 0; i < copied; i++) head[i] = (char)(c->in[i] >= 'A' && c->in[i] <= 'Z' ? c->in[i] + 32 : c->in[i]);
  head[copied] = 0;
  const char *lengthField = strstr(head, "\r\ncontent-length:");
  if (!lengthField) {
    fprintf(stderr, "openLoad: an answer without content-length\n");
    exit(1);
  }
  size_t bodyLength = (size_t)strtoul(lengthField + 17, NULL, 10);
  if (c->inLength < headLength + bodyLength) return 0;
  if (!slot->live) {
    fprintf(stderr, "openLoad: an answer on a connection with no request out\n");
    exit(1);
  }
  int status = atoi(head + 9);
  slot->live = 0;
  (*inFlight)--;
  if (slot->recorded) {
    double phaseMs[PHASES];
    phaseMs[PHASE_CLIENT] = arrived - slot->scheduledMs;
    phaseMs[PHASE_RPC] = serverTiming(head, copied, "rpc");
    phaseMs[PHASE_PARENT] = serverTiming(head, copied, "total") - phaseMs[PHASE_RPC];
    phaseMs[PHASE_ENCLAVE] = serverTiming(head, copied, "enclave");
    int needsUnlock = status == 503 && memmem(c->in + headLength, bodyLength, "\"needs_unlock\"", 14) != NULL;
    recordAnswer(results, status == 200, needsUnlock, slot->scheduledMs, phaseMs);
  }
  memmove(c->in, c->in + headLength + bodyLength, c->inLength - headLength - bodyLength);
  c->inLength -= headLength + bodyLength;
  return strstr(head, "\r\nconnection: close\r\n") ? 2 : 1;
}

/* Completes every whole SIGN answer frame in the connection's buffer. */
static void readFrameAnswers(Connection *c, Slot *slots, double arrived, Results *results, long *inFlight) {
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
      (*inFlight)--;
      if (slot->recorded) {
        int ok = status == STATUS_OK && length == 6 + 69;
        double phaseMs[PHASES] = {arrived - slot->scheduledMs, arrived - slot->scheduledMs, 0, ok ? getU32(payload + 65) / 1e3 : 0};
        recordAnswer(results, ok, status == STATUS_NEEDS_UNLOCK, slot->scheduledMs, phaseMs);
      }
    }
    at += 4 + length;
  }
  memmove(c->in, c->in + at, c->inLength - at);
  c->inLength -= at;
}

/* Writes what the connection has queued, as far as the socket takes it; -1 if the server has reset it. */
static int flush(Connection *c) {
  size_t written = 0;
  while (written < c->outLength) {
    ssize_t n = send(c->fd, c->out + written, c->outLength - written, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EAGAIN || errno == EINTR) break;
      if (errno == EPIPE || errno == ECONNRESET) return -1;
      die("write");
    }
    written += (size_t)n;
  }
  memmove(c->out, c->out + written, c->outLength - written);
  c->outLength -= written;
  return 0;
}

/* http mode: the connections with no request out, oldest first, as a ring. */
typedef struct {
  int *at;
  int head;
  int count;
  int capacity;
} Ring;

static void ringPush(Ring *ring, int at) { ring->at[(ring->head + ring->count++) % ring->capacity] = at; }

static int ringPop(Ring *ring) {
  int at = ring->at[ring->head];
  ring->head = (ring->head + 1) % ring->capacity;
  ring->count--;
  return at;
}

static void ringRemove(Ring *ring, int at) {
  int kept = 0;
  for (int i = 0; i < ring->count; i++) {
    int other = ring->at[(ring->head + i) % ring->capacity];
    if (other != at) ring->at[(ring->head + kept++) % ring->capacity] = other;
  }
  ring->count = kept;
}

/*
 * http mode: the server closed or reset connection `at`. It carries nothing
 * more; a request out on it has failed, and an idle one leaves the ring.
 */
static void dropConnection(Connection *c, int at, int epoll, Slot *slot, Ring *idle, Results *results, long *inFlight) {
  c->closed = 1;
  c->outLength = 0;
  epoll_ctl(epoll, EPOLL_CTL_DEL, c->fd, NULL);
  close(c->fd);
  if (slot->live) {
    slot->live = 0;
    (*inFlight)--;
    if (slot->recorded) results->failed++;
  } else {
    ringRemove(idle, at);
  }
}

/*
 * How the requests of SLOW_MS or more end to end lie in time: how many, in
 * how many bursts (a gap of more than BURST_GAP_MS between two of them, by
 * scheduled time, starts a new burst), and the median time from one burst's
 * start to the next. A tail made of a few periodic bursts points at
 * something that stops the whole machine now and then, not at the cost of
 * each request. Call before printPhase, which sorts the latencies in place.
 */
#define SLOW_MS 10.0
#define BURST_GAP_MS 20.0
static void printSlowBursts(const Results *results) {
  double *slow = malloc((results->count + 1) * sizeof(double));
  size_t slowCount = 0;
  for (size_t i = 0; i < results->count; i++)
    if (results->phases[PHASE_CLIENT][i] >= SLOW_MS) slow[slowCount++] = results->scheduledMs[i];
  qsort(slow, slowCount, sizeof *slow, compareDoubles);
  double *gaps = malloc((slowCount + 1) * sizeof(double));
  size_t bursts = 0, gapCount = 0;
  double burstStart = 0;
  for (size_t i = 0; i < slowCount; i++) {
    if (i > 0 && slow[i] - slow[i - 1] <= BURST_GAP_MS) continue;
    if (bursts > 0) gaps[gapCount++] = slow[i] - burstStart;
    burstStart = slow[i];
    bursts++;
  }
  qsort(gaps, gapCount, sizeof *gaps, compareDoubles);
  printf("\"slow\":{\"overMs\":%.0f,\"requests\":%zu,\"bursts\":%zu,\"medianBurstGapMs\":%.0f},", SLOW_MS, slowCount, bursts,
         gapCount > 0 ? quantile(gaps, gapCount, 0.5) : -1.0);
  free(slow);
  free(gaps);
}

/* Sorts a phase's successful samples (NaN left out) and prints its quantiles. */
static void printPhase(const char *name, double *values, size_t count, int last) {
  size_t kept = 0;
  for (size_t i = 0; i < count; i++) if (!isnan(values[i])) values[kept++] = values[i];
  qsort(values, kept, sizeof *values, compareDoubles);
  printf("\"%s\":{\"p50\":%.2f,\"p90\":%.2f,\"p99\":%.2f,\"p999\":%.2f}%s", name, quantile(values, kept, 0.5), quantile(values, kept, 0.9),
         quantile(values, kept, 0.99), quantile(values, kept, 0.999), last ? "" : ",");
}

int main(int argc, char **argv) {
  if (argc != 8 || (strcmp(argv[1], "frames") != 0 && strcmp(argv[1], "http") != 0)) {
    fprintf(stderr, "usage: openLoad frames|http PORT RATE SECONDS WARMUP_SECONDS CONNECTIONS MAX_IN_FLIGHT < key-ids\n");
    return 2;
  }
  Requests requests = {.http = strcmp(argv[1], "http") == 0};
  int port = atoi(argv[2]);
  double rate = atof(argv[3]);
  double seconds = atof(argv[4]);
  double warmupSeconds = atof(argv[5]);
  int connectionCount = atoi(argv[6]);
  long maxInFlight = atol(argv[7]);
  if (port <= 0 || rate <= 0 || seconds <= 0 || warmupSeconds < 0 || connectionCount <= 0 || maxInFlight <= 0) {
    fprintf(stderr, "openLoad: every argument must be positive\n");
    return 2;
  }
  char host[32];
  snprintf(host, sizeof host, "127.0.0.1:%d", port);
  requests.host = host;
  // Each run its own nonces: a second run against the same parent would otherwise replay the first one's.
  prng ^= (uint32_t)time(NULL) ^ ((uint32_t)getpid() << 16);
  if (prng == 0) prng = 0x9e3779b9u;
  if (requests.http) {
    requests.hmacKeyId = getenv("ORIGIN_HMAC_KEY_ID");
    const char *secret = getenv("ORIGIN_HMAC_SECRET");
    if (!requests.hmacKeyId || !secret || strlen(secret) > 64 || strlen(requests.hmacKeyId) > 64) {
      fprintf(stderr, "openLoad: http mode needs ORIGIN_HMAC_KEY_ID and ORIGIN_HMAC_SECRET (each at most 64 bytes)\n");
      return 2;
    }
    requests.hmacSecret = (const unsigned char *)secret;
    requests.hmacSecretLength = strlen(secret);
  }

  size_t keyCapacity = 1024, keyCount = 0;
  char (*keys)[MAX_KEY_ID + 1] = malloc(keyCapacity * sizeof *keys);
  unsigned char *keyLengths = malloc(keyCapacity);
  char line[512];
  while (fgets(line, sizeof line, stdin)) {
    size_t length = strcspn(line, "\r\n");
    if (length == 0) continue;
    if (length > MAX_KEY_ID) {
      fprintf(stderr, "openLoad: key id longer than %d bytes\n", MAX_KEY_ID);
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
    fprintf(stderr, "openLoad: no key ids on stdin\n");
    return 2;
  }

  int epoll = epoll_create1(0);
  if (epoll < 0) die("epoll_create1");
  Connection *connections = calloc((size_t)connectionCount, sizeof *connections);
  /* Oldest first, so that every connection carries requests: none sits idle into the server's keep-alive timeout. */
  Ring idle = {.at = malloc((size_t)connectionCount * sizeof(int)), .capacity = connectionCount};
  size_t bufferBytes = requests.http ? 64 * 1024 : BUFFER_BYTES;
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
    c->out = malloc(bufferBytes);
    c->in = malloc(bufferBytes);
    struct epoll_event event = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
    if (epoll_ctl(epoll, EPOLL_CTL_ADD, c->fd, &event) < 0) die("epoll_ctl");
    ringPush(&idle, i);
  }

  Slot *slots = calloc(requests.http ? (size_t)connectionCount : SLOTS, sizeof *slots);
  Results results = {.capacity = (size_t)(rate * seconds * 1.1) + 1024};
  for (int p = 0; p < PHASES; p++) results.phases[p] = malloc(results.capacity * sizeof(double));
  results.scheduledMs = malloc(results.capacity * sizeof(double));
  long inFlight = 0, skipped = 0, sentRecorded = 0;
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
    /* Every request due before sendUntil is sent, also when a stall kept this loop from waking until after it. */
    long due = (long)(((now < sendUntil ? now : sendUntil) - started) / 1e3 * rate);
    if (now >= sendUntil && (((long)sent >= due && inFlight == 0) || now >= drainUntil)) break;
    if ((long)sent < due) {
      Connection *frames = &connections[nextConnection];
      nextConnection = (nextConnection + 1) % connectionCount;
      for (; (long)sent < due; sent++) {
        /* A full buffer waits for the next turn, before this request is counted. */
        if (!requests.http && frames->outLength + MAX_REQUEST > BUFFER_BYTES) break;
        double scheduledMs = started + sent / rate * 1e3;
        int recorded = scheduledMs >= recordFrom;
        if (recorded) sentRecorded++;
        if (inFlight >= maxInFlight || (requests.http && idle.count == 0)) {
          if (recorded) skipped++;
          continue;
        }
        size_t key = nextRandom() % keyCount;
        Slot *slot;
        if (requests.http) {
          int at = ringPop(&idle);
          Connection *c = &connections[at];
          c->outLength += writeHttpRequest(&requests, c->out + c->outLength, keys[key], keyLengths[key]);
          slot = &slots[at];
        } else {
          uint32_t id = nextId++;
          if (nextId == 0) nextId = 1;
          frames->outLength += writeFrame(frames->out + frames->outLength, id, keys[key], keyLengths[key]);
          slot = &slots[id & (SLOTS - 1)];
          if (slot->live) {
            /* Still unanswered a million requests later: count it failed, as the JS generator's timeout would. */
            inFlight--;
            if (slot->recorded) results.failed++;
          }
        }
        slot->scheduledMs = scheduledMs;
        slot->live = 1;
        slot->recorded = (unsigned char)recorded;
        inFlight++;
      }
    }
    for (int i = 0; i < connectionCount; i++) {
      Connection *c = &connections[i];
      if (c->closed || c->outLength == 0 || flush(c) == 0) continue;
      if (!requests.http) die("write");
      dropConnection(c, i, epoll, &slots[i], &idle, &results, &inFlight);
    }

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
      int at = (int)events[e].data.u32;
      Connection *c = &connections[at];
      for (;;) {
        if (c->closed) break;
        ssize_t n = read(c->fd, c->in + c->inLength, bufferBytes - c->inLength);
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) break;
        if (n < 0 && errno != ECONNRESET) die("read");
        if (n <= 0) {
          /* Closed or reset by the server: in frames mode the run cannot go on. */
          if (!requests.http) {
            fprintf(stderr, "openLoad: the server closed a connection\n");
            return 1;
          }
          dropConnection(c, at, epoll, &slots[at], &idle, &results, &inFlight);
          break;
        }
        c->inLength += (size_t)n;
        if (requests.http) {
          int answered = readHttpAnswer(c, &slots[at], arrived, &results, &inFlight);
          if (answered == 1) ringPush(&idle, at);
          if (answered == 2) {
            dropConnection(c, at, epoll, &slots[at], &idle, &results, &inFlight);
            break;
          }
        } else {
          readFrameAnswers(c, slots, arrived, &results, &inFlight);
        }
      }
    }
  }

  /* Recorded requests never sent (a server that stopped reading kept the buffer full until the drain ended). */
  long due = (long)((sendUntil - started) / 1e3 * rate);
  for (; (long)sent < due; sent++) {
    if (started + sent / rate * 1e3 < recordFrom) continue;
    sentRecorded++;
    skipped++;
  }
  /* Recorded requests whose answers never came within the drain. */
  size_t slotCount = requests.http ? (size_t)connectionCount : SLOTS;
  for (size_t i = 0; i < slotCount; i++) if (slots[i].live && slots[i].recorded) results.failed++;
  int closedCount = 0;
  for (int i = 0; i < connectionCount; i++) closedCount += connections[i].closed;
  if (closedCount > 0) fprintf(stderr, "openLoad: the server closed %d of %d connections\n", closedCount, connectionCount);
  printf("{\"offered\":%ld,\"ok\":%zu,\"failed\":%ld,\"needsUnlock\":%ld,\"skipped\":%ld,\"seconds\":%.3f,\"cpuMs\":%.1f,",
         sentRecorded, results.count, results.failed, results.needsUnlock, skipped, (sendUntil - recordFrom) / 1e3, cpuAtEndMs - cpuAtRecordMs);
  printSlowBursts(&results);
  printf("\"latencyMs\":{");
  for (int p = 0; p < PHASES; p++) printPhase(phaseNames[p], results.phases[p], results.count, p == PHASES - 1);
  printf("}}\n");
  return 0;
}
