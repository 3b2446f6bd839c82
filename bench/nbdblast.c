/* nbdblast: an NBD load generator built to be cheaper than the server.
 *
 * nbdload drives libnbd with poll(2); at QD32 on one connection its own CPU
 * per request is close to the server's, so it can be the limit.  nbdblast
 * speaks the NBD wire protocol itself over io_uring: one ring per thread,
 * --conns connections spread over --threads threads, --qd requests in flight
 * per connection, requests of a pass batched into one send, one recv per
 * connection parsing every reply it holds, and one io_uring_enter per pass.
 * Read data is not copied anywhere: the payload is skipped in the receive
 * buffer.
 *
 * This is a minimal client, not an NBD implementation: fixed newstyle
 * handshake, NBD_OPT_GO to --export (no TLS, no structured or extended
 * replies, no LIST/INFO), then READ, WRITE (optionally FUA) and DISC with
 * simple replies.  Every reply's magic and cookie are checked; a cookie
 * carries the slot and a per-slot sequence number, so a duplicate or stale
 * reply is an error rather than a miscounted op.  The few protocol constants
 * are kept here on purpose (the server's C++ headers are not usable from C).
 *
 * Prints one JSON line like nbdload (ops, iops, latency percentiles in us
 * from a log-linear histogram, client CPU seconds and CPU us per op).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <liburing.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "loadgen.h"

/* Protocol constants (NBD protocol document, "newstyle" negotiation). */
#define NBD_MAGIC 0x4e42444d41474943ull         /* "NBDMAGIC" */
#define NBD_IHAVEOPT 0x49484156454f5054ull      /* "IHAVEOPT" */
#define NBD_REP_MAGIC 0x0003e889045565a9ull
#define NBD_FLAG_FIXED_NEWSTYLE 1u
#define NBD_FLAG_NO_ZEROES 2u
#define NBD_OPT_GO 7u
#define NBD_REP_ACK 1u
#define NBD_REP_INFO 3u
#define NBD_REP_FLAG_ERROR 0x80000000u
#define NBD_INFO_EXPORT 0u
#define NBD_FLAG_READ_ONLY (1u << 1)
#define NBD_FLAG_SEND_FUA (1u << 3)
#define NBD_REQUEST_MAGIC 0x25609513u
#define NBD_SIMPLE_REPLY_MAGIC 0x67446698u
#define NBD_CMD_READ 0u
#define NBD_CMD_WRITE 1u
#define NBD_CMD_DISC 2u
#define NBD_CMD_FLAG_FUA 1u
#define REQ_SIZE 28u
#define REPLY_SIZE 16u

/* ------------------------------------------------------------------ */
/* Utilities                                                           */

static void put_be16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static void put_be32(uint8_t *p, uint32_t v)
{
  for (int i = 3; i >= 0; i--) { p[i] = (uint8_t)v; v >>= 8; }
}
static void put_be64(uint8_t *p, uint64_t v)
{
  for (int i = 7; i >= 0; i--) { p[i] = (uint8_t)v; v >>= 8; }
}
static uint16_t get_be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static uint32_t get_be32(const uint8_t *p)
{
  return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static uint64_t get_be64(const uint8_t *p) { return (uint64_t)get_be32(p) << 32 | get_be32(p + 4); }

/* ------------------------------------------------------------------ */
/* Configuration                                                       */

static struct {
  const char *uri;
  char host[256], port[16], unix_path[108], export[4096];
  bool write, fua;
  uint64_t bs;
  unsigned qd, conns, threads;
  double seconds, warmup, timeout;
  uint64_t seed;
} cfg = { .bs = 4096, .qd = 32, .conns = 1, .threads = 1, .seconds = 5,
          .seed = 0x6e6264626c617374ull };

/* nbd://HOST[:PORT][/EXPORT] or nbd+unix:///EXPORT?socket=PATH */
static void parse_uri(const char *u)
{
  const char *rest;
  if (!strncmp(u, "nbd+unix://", 11)) {
    rest = u + 11;
    const char *q = strstr(rest, "?socket=");
    if (!q) die("--uri: nbd+unix needs ?socket=PATH");
    if (strlen(q + 8) >= sizeof cfg.unix_path) die("--uri: socket path too long");
    strcpy(cfg.unix_path, q + 8);
    size_t n = (size_t)(q - rest);
    if (n > 0 && rest[0] == '/') { rest++; n--; }
    if (n >= sizeof cfg.export) die("--uri: export name too long");
    memcpy(cfg.export, rest, n);
    cfg.export[n] = '\0';
    return;
  }
  if (strncmp(u, "nbd://", 6)) die("--uri must be nbd://HOST[:PORT]/NAME or nbd+unix:///NAME?socket=P");
  rest = u + 6;
  const char *slash = strchr(rest, '/');
  size_t hl = slash ? (size_t)(slash - rest) : strlen(rest);
  char hp[256];
  if (hl >= sizeof hp) die("--uri: host too long");
  memcpy(hp, rest, hl);
  hp[hl] = '\0';
  char *colon = strrchr(hp, ':');
  if (hp[0] == '[') {  /* [v6]:port */
    char *close = strchr(hp, ']');
    if (!close) die("--uri: bad IPv6 host");
    *close = '\0';
    snprintf(cfg.host, sizeof cfg.host, "%s", hp + 1);
    snprintf(cfg.port, sizeof cfg.port, "%s", close[1] == ':' ? close + 2 : "10809");
  } else {
    if (colon) *colon = '\0';
    snprintf(cfg.host, sizeof cfg.host, "%s", hp);
    snprintf(cfg.port, sizeof cfg.port, "%s", colon ? colon + 1 : "10809");
  }
  snprintf(cfg.export, sizeof cfg.export, "%s", slash ? slash + 1 : "");
}

/* ------------------------------------------------------------------ */
/* Handshake (blocking, before the rings start)                         */

static void read_full(int fd, void *buf, size_t n, const char *what)
{
  uint8_t *p = buf;
  while (n) {
    ssize_t r = read(fd, p, n);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) die("handshake: reading %s: %s", what, strerror(errno));
    if (r == 0) die("handshake: server closed the connection while sending %s", what);
    p += r;
    n -= (size_t)r;
  }
}

static void write_full(int fd, const void *buf, size_t n)
{
  const uint8_t *p = buf;
  while (n) {
    ssize_t r = write(fd, p, n);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) die("handshake: write: %s", strerror(errno));
    p += r;
    n -= (size_t)r;
  }
}

static int dial(void)
{
  if (cfg.unix_path[0]) {
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket: %s", strerror(errno));
    struct sockaddr_un a = { .sun_family = AF_UNIX };
    strcpy(a.sun_path, cfg.unix_path);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0)
      die("connect %s: %s", cfg.unix_path, strerror(errno));
    return fd;
  }
  struct addrinfo hints = { .ai_socktype = SOCK_STREAM }, *res;
  int e = getaddrinfo(cfg.host, cfg.port, &hints, &res);
  if (e) die("%s:%s: %s", cfg.host, cfg.port, gai_strerror(e));
  int fd = -1;
  for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
    fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
    if (fd < 0) continue;
    if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0) break;
    close(fd);
    fd = -1;
  }
  freeaddrinfo(res);
  if (fd < 0) die("cannot connect to %s:%s", cfg.host, cfg.port);
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  return fd;
}

/* Negotiates with NBD_OPT_GO; returns the export size, sets *tflags. */
static uint64_t handshake(int fd, uint16_t *tflags)
{
  uint8_t b[18];
  read_full(fd, b, 18, "the greeting");
  if (get_be64(b) != NBD_MAGIC || get_be64(b + 8) != NBD_IHAVEOPT)
    die("handshake: not a newstyle NBD server");
  uint16_t sflags = get_be16(b + 16);
  if (!(sflags & NBD_FLAG_FIXED_NEWSTYLE)) die("handshake: server is not fixed newstyle");
  uint8_t cf[4];
  put_be32(cf, NBD_FLAG_FIXED_NEWSTYLE | (sflags & NBD_FLAG_NO_ZEROES));
  write_full(fd, cf, 4);

  size_t nl = strlen(cfg.export);
  size_t olen = 4 + nl + 2;
  uint8_t *opt = malloc(16 + olen);
  if (!opt) die("out of memory");
  put_be64(opt, NBD_IHAVEOPT);
  put_be32(opt + 8, NBD_OPT_GO);
  put_be32(opt + 12, (uint32_t)olen);
  put_be32(opt + 16, (uint32_t)nl);
  memcpy(opt + 20, cfg.export, nl);
  put_be16(opt + 20 + nl, 0); /* no information requests */
  write_full(fd, opt, 16 + olen);
  free(opt);

  uint64_t size = 0;
  bool have_export = false;
  for (;;) {
    uint8_t h[20];
    read_full(fd, h, 20, "an option reply");
    if (get_be64(h) != NBD_REP_MAGIC) die("handshake: bad option reply magic");
    if (get_be32(h + 8) != NBD_OPT_GO) die("handshake: reply to an option not sent");
    uint32_t type = get_be32(h + 12), len = get_be32(h + 16);
    if (len > 65536) die("handshake: option reply of %u bytes", len);
    uint8_t *d = malloc(len + 1);
    if (!d) die("out of memory");
    read_full(fd, d, len, "option reply data");
    d[len] = '\0';
    if (type & NBD_REP_FLAG_ERROR)
      die("server refused export '%s' (reply type 0x%x): %.*s", cfg.export, type, (int)len, d);
    if (type == NBD_REP_INFO && len >= 2 && get_be16(d) == NBD_INFO_EXPORT) {
      if (len != 12) die("handshake: NBD_INFO_EXPORT of %u bytes", len);
      size = get_be64(d + 2);
      *tflags = get_be16(d + 10);
      have_export = true;
    }
    free(d);
    if (type == NBD_REP_ACK) break;
  }
  if (!have_export) die("handshake: GO acknowledged without NBD_INFO_EXPORT");
  return size;
}

/* ------------------------------------------------------------------ */
/* Connections and workers                                             */

/* user_data: connection index << 1 | (0 recv, 1 send) */
struct slot {
  uint64_t t0;
  uint32_t seq;
  bool busy;
};

struct conn {
  int fd;
  uint64_t rng;
  struct slot *slots;
  uint32_t *idle;       /* stack of idle slot indexes */
  unsigned nidle, inflight;
  /* Two send buffers: one being sent (the kernel owns it), one filling. */
  uint8_t *out[2];
  size_t out_len[2], out_sent;
  int sending;          /* index of the buffer in flight, or -1 */
  int fill;             /* index of the buffer new requests go to */
  uint8_t *in;
  size_t in_cap, in_len, in_skip; /* in_skip: read payload bytes still to drop */
  bool recv_posted;
  bool eof;
};

struct worker {
  pthread_t tid;
  struct io_uring ring;
  struct conn **conns;
  unsigned nconns;
  uint64_t nblocks;
  const uint8_t *wdata;
  struct hist hist;
  uint64_t ops, ops_all, errors, passes, submits;
  uint32_t first_error;
  uint64_t t_count_from, t_stop, t_hard;
  const char *fatal;
  char fatal_msg[256];
};

static void wfail(struct worker *w, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void wfail(struct worker *w, const char *fmt, ...)
{
  if (w->fatal) return;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(w->fatal_msg, sizeof w->fatal_msg, fmt, ap);
  va_end(ap);
  w->fatal = w->fatal_msg;
}

static struct io_uring_sqe *get_sqe(struct worker *w)
{
  struct io_uring_sqe *s = io_uring_get_sqe(&w->ring);
  if (!s) {
    io_uring_submit(&w->ring);
    w->submits++;
    s = io_uring_get_sqe(&w->ring);
    if (!s) die("io_uring: no SQE");
  }
  return s;
}

/* Appends one request to the filling buffer. */
static void issue(struct worker *w, struct conn *c, uint64_t t)
{
  uint32_t i = c->idle[--c->nidle];
  struct slot *s = &c->slots[i];
  s->busy = true;
  s->seq++;
  s->t0 = t;
  int f = c->fill;
  uint8_t *p = c->out[f] + c->out_len[f];
  uint64_t off = (splitmix64(&c->rng) % w->nblocks) * cfg.bs;
  put_be32(p, NBD_REQUEST_MAGIC);
  put_be16(p + 4, (uint16_t)(cfg.write && cfg.fua ? NBD_CMD_FLAG_FUA : 0));
  put_be16(p + 6, (uint16_t)(cfg.write ? NBD_CMD_WRITE : NBD_CMD_READ));
  put_be64(p + 8, (uint64_t)s->seq << 32 | i);
  put_be64(p + 16, off);
  put_be32(p + 24, (uint32_t)cfg.bs);
  c->out_len[f] += REQ_SIZE;
  if (cfg.write) {
    memcpy(p + REQ_SIZE, w->wdata, cfg.bs);
    c->out_len[f] += cfg.bs;
  }
  c->inflight++;
}

static void post_send(struct worker *w, struct conn *c, unsigned ci)
{
  const uint8_t *b = c->out[c->sending] + c->out_sent;
  size_t n = c->out_len[c->sending] - c->out_sent;
  struct io_uring_sqe *s = get_sqe(w);
  io_uring_prep_send(s, c->fd, b, n, MSG_NOSIGNAL);
  io_uring_sqe_set_data64(s, (uint64_t)ci << 1 | 1);
}

static void maybe_send(struct worker *w, struct conn *c, unsigned ci)
{
  if (c->sending >= 0 || c->out_len[c->fill] == 0) return;
  c->sending = c->fill;
  c->fill ^= 1;
  c->out_sent = 0;
  post_send(w, c, ci);
}

static void post_recv(struct worker *w, struct conn *c, unsigned ci)
{
  struct io_uring_sqe *s = get_sqe(w);
  io_uring_prep_recv(s, c->fd, c->in + c->in_len, c->in_cap - c->in_len, 0);
  io_uring_sqe_set_data64(s, (uint64_t)ci << 1);
  c->recv_posted = true;
}

static void on_reply(struct worker *w, struct conn *c, const uint8_t *h, uint64_t t)
{
  uint64_t cookie = get_be64(h + 8);
  uint32_t i = (uint32_t)cookie, seq = (uint32_t)(cookie >> 32);
  if (i >= cfg.qd || !c->slots[i].busy || c->slots[i].seq != seq) {
    wfail(w, "reply with an unknown cookie 0x%016" PRIx64, cookie);
    return;
  }
  struct slot *s = &c->slots[i];
  s->busy = false;
  c->idle[c->nidle++] = i;
  c->inflight--;
  uint32_t err = get_be32(h + 4);
  if (err) {
    if (w->errors++ == 0) w->first_error = err;
    return;
  }
  w->ops_all++;
  if (s->t0 >= w->t_count_from && t <= w->t_stop) {
    h_add(&w->hist, t - s->t0);
    w->ops++;
  }
}

/* Parses every complete reply in the receive buffer. */
static void parse_input(struct worker *w, struct conn *c, uint64_t t)
{
  size_t pos = 0;
  for (;;) {
    if (c->in_skip) {
      size_t n = c->in_len - pos < c->in_skip ? c->in_len - pos : c->in_skip;
      pos += n;
      c->in_skip -= n;
      if (c->in_skip) break;
    }
    if (c->in_len - pos < REPLY_SIZE) break;
    const uint8_t *h = c->in + pos;
    if (get_be32(h) != NBD_SIMPLE_REPLY_MAGIC) {
      wfail(w, "bad reply magic 0x%08x", get_be32(h));
      return;
    }
    pos += REPLY_SIZE;
    /* A read's payload follows a successful simple reply. */
    if (!cfg.write && get_be32(h + 4) == 0) c->in_skip = cfg.bs;
    on_reply(w, c, h, t);
    if (w->fatal) return;
  }
  if (pos) {
    memmove(c->in, c->in + pos, c->in_len - pos);
    c->in_len -= pos;
  }
}

static void on_cqe(struct worker *w, const struct io_uring_cqe *cqe, uint64_t t)
{
  uint64_t ud = io_uring_cqe_get_data64(cqe);
  unsigned ci = (unsigned)(ud >> 1);
  struct conn *c = w->conns[ci];
  int res = cqe->res;
  if (ud & 1) {  /* send */
    if (res == -EINTR || res == -EAGAIN) { post_send(w, c, ci); return; }
    if (res < 0) { wfail(w, "send: %s", strerror(-res)); return; }
    c->out_sent += (size_t)res;
    if (c->out_sent < c->out_len[c->sending]) { post_send(w, c, ci); return; }
    c->out_len[c->sending] = 0;
    c->sending = -1;
    return;
  }
  c->recv_posted = false;
  if (res == -EINTR || res == -EAGAIN) return;
  if (res < 0) { wfail(w, "recv: %s", strerror(-res)); return; }
  if (res == 0) { c->eof = true; wfail(w, "server closed the connection"); return; }
  c->in_len += (size_t)res;
  parse_input(w, c, t);
}

static void *worker_main(void *arg)
{
  struct worker *w = arg;
  for (;;) {
    uint64_t t = now_ns();
    if (t >= w->t_hard) { wfail(w, "timed out (server not answering?)"); break; }
    bool issuing = !w->fatal && w->errors == 0 && t < w->t_stop;
    unsigned inflight = 0;
    for (unsigned ci = 0; ci < w->nconns; ci++) {
      struct conn *c = w->conns[ci];
      while (issuing && c->nidle > 0) issue(w, c, t);
      maybe_send(w, c, ci);
      if (c->inflight && !c->recv_posted) post_recv(w, c, ci);
      inflight += c->inflight;
    }
    if (w->fatal || inflight == 0) break;
    struct __kernel_timespec ts = { .tv_sec = 0, .tv_nsec = 100 * 1000 * 1000 };
    struct io_uring_cqe *cqe;
    w->passes++;
    w->submits++;
    int r = io_uring_submit_and_wait_timeout(&w->ring, &cqe, 1, &ts, NULL);
    if (r < 0 && r != -ETIME && r != -EINTR) { wfail(w, "io_uring_enter: %s", strerror(-r)); break; }
    t = now_ns();
    unsigned head, n = 0;
    io_uring_for_each_cqe(&w->ring, head, cqe) {
      on_cqe(w, cqe, t);
      n++;
    }
    io_uring_cq_advance(&w->ring, n);
    if (w->fatal) break;
  }
  return NULL;
}

/* ------------------------------------------------------------------ */

static void usage(FILE *f)
{
  fprintf(f,
    "usage: nbdblast --uri URI [options]\n"
    "  --uri URI        nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH\n"
    "  --op read|write  request type (default read)\n"
    "  --fua            set FUA on writes\n"
    "  --bs BYTES       request size, random offsets aligned to it (default 4096)\n"
    "  --qd N           requests in flight per connection (default 32)\n"
    "  --conns N        connections (default 1)\n"
    "  --threads N      threads, each with its own ring and a share of the\n"
    "                   connections (default 1)\n"
    "  --seconds S      measure for S seconds (default 5)\n"
    "  --warmup S       run S seconds before measuring (default 0)\n"
    "  --timeout S      hard limit (default seconds+warmup+30)\n"
    "  --seed N         random seed\n"
    "Prints one JSON line: ops, iops, latency percentiles (us), client CPU.\n");
}

int main(int argc, char **argv)
{
  enum { O_URI = 256, O_OP, O_FUA, O_BS, O_QD, O_CONNS, O_THREADS, O_SECONDS, O_WARMUP,
         O_TIMEOUT, O_SEED, O_HELP };
  static const struct option longopts[] = {
    { "uri", required_argument, 0, O_URI }, { "op", required_argument, 0, O_OP },
    { "fua", no_argument, 0, O_FUA }, { "bs", required_argument, 0, O_BS },
    { "qd", required_argument, 0, O_QD }, { "conns", required_argument, 0, O_CONNS },
    { "threads", required_argument, 0, O_THREADS },
    { "seconds", required_argument, 0, O_SECONDS },
    { "warmup", required_argument, 0, O_WARMUP },
    { "timeout", required_argument, 0, O_TIMEOUT },
    { "seed", required_argument, 0, O_SEED }, { "help", no_argument, 0, O_HELP },
    { 0, 0, 0, 0 },
  };
  int o;
  while ((o = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
    switch (o) {
    case O_URI: cfg.uri = optarg; break;
    case O_OP:
      if (!strcmp(optarg, "read")) cfg.write = false;
      else if (!strcmp(optarg, "write")) cfg.write = true;
      else die("--op must be read or write");
      break;
    case O_FUA: cfg.fua = true; break;
    case O_BS: cfg.bs = parse_size("--bs", optarg); break;
    case O_QD: cfg.qd = (unsigned)parse_size("--qd", optarg); break;
    case O_CONNS: cfg.conns = (unsigned)parse_size("--conns", optarg); break;
    case O_THREADS: cfg.threads = (unsigned)parse_size("--threads", optarg); break;
    case O_SECONDS: cfg.seconds = parse_double("--seconds", optarg); break;
    case O_WARMUP: cfg.warmup = parse_double("--warmup", optarg); break;
    case O_TIMEOUT: cfg.timeout = parse_double("--timeout", optarg); break;
    case O_SEED: cfg.seed = parse_size("--seed", optarg); break;
    case O_HELP: case 'h': usage(stdout); return 0;
    default: usage(stderr); return 2;
    }
  }
  if (optind != argc || !cfg.uri) { usage(stderr); return 2; }
  parse_uri(cfg.uri);
  if (cfg.bs == 0 || cfg.bs > 32u << 20) die("--bs must be in 1..32M");
  if (cfg.qd == 0 || cfg.qd > 4096) die("--qd must be in 1..4096");
  if (cfg.conns == 0 || cfg.conns > 1024) die("--conns must be in 1..1024");
  if (cfg.threads == 0) die("--threads must be >= 1");
  if (cfg.threads > cfg.conns) cfg.threads = cfg.conns;
  if (cfg.seconds <= 0) die("--seconds must be > 0");
  if (cfg.fua && !cfg.write) die("--fua needs --op write");
  if (cfg.timeout == 0) cfg.timeout = cfg.seconds + cfg.warmup + 30;
  signal(SIGALRM, watchdog_alarm);
  alarm((unsigned)cfg.timeout + 15);
  signal(SIGPIPE, SIG_IGN);

  /* Connect and negotiate. */
  struct conn *conns = calloc(cfg.conns, sizeof *conns);
  if (!conns) die("out of memory");
  uint64_t size = 0;
  for (unsigned i = 0; i < cfg.conns; i++) {
    struct conn *c = &conns[i];
    c->fd = dial();
    uint16_t tflags = 0;
    uint64_t sz = handshake(c->fd, &tflags);
    if (i == 0) size = sz;
    else if (sz != size) die("connections disagree on the export size");
    if (cfg.write && (tflags & NBD_FLAG_READ_ONLY)) die("export is read-only, cannot --op write");
    if (cfg.fua && !(tflags & NBD_FLAG_SEND_FUA)) die("server does not support FUA");
    c->rng = cfg.seed ^ (0x9e3779b97f4a7c15ull * (i + 1));
    c->slots = calloc(cfg.qd, sizeof *c->slots);
    c->idle = calloc(cfg.qd, sizeof *c->idle);
    size_t per = REQ_SIZE + (cfg.write ? cfg.bs : 0);
    for (int b = 0; b < 2; b++) c->out[b] = malloc(per * cfg.qd);
    c->in_cap = 65536 + 2 * (REPLY_SIZE + cfg.bs);
    c->in = malloc(c->in_cap);
    if (!c->slots || !c->idle || !c->out[0] || !c->out[1] || !c->in) die("out of memory");
    for (unsigned k = 0; k < cfg.qd; k++) c->idle[k] = cfg.qd - 1 - k;
    c->nidle = cfg.qd;
    c->sending = -1;
  }
  uint64_t nblocks = size / cfg.bs;
  if (nblocks == 0) die("export smaller than --bs");

  uint8_t *wdata = NULL;
  if (cfg.write) {
    wdata = malloc(cfg.bs);
    if (!wdata) die("out of memory");
    uint64_t st = cfg.seed;
    for (uint64_t p = 0; p < cfg.bs; p++) wdata[p] = (uint8_t)splitmix64(&st);
  }

  struct worker *workers = calloc(cfg.threads, sizeof *workers);
  if (!workers) die("out of memory");
  for (unsigned t = 0; t < cfg.threads; t++) {
    struct worker *w = &workers[t];
    w->conns = calloc(cfg.conns, sizeof *w->conns);
    if (!w->conns) die("out of memory");
    w->nblocks = nblocks;
    w->wdata = wdata;
  }
  for (unsigned i = 0; i < cfg.conns; i++) {
    struct worker *w = &workers[i % cfg.threads];
    w->conns[w->nconns++] = &conns[i];
  }
  for (unsigned t = 0; t < cfg.threads; t++) {
    struct worker *w = &workers[t];
    unsigned entries = 8;
    while (entries < 4 * w->nconns + 8) entries <<= 1;
    int e = io_uring_queue_init(entries, &w->ring, 0);
    if (e < 0) die("io_uring_queue_init: %s", strerror(-e));
  }

  struct rusage ru0, ru1;
  getrusage(RUSAGE_SELF, &ru0);
  uint64_t t_start = now_ns();
  uint64_t t_count_from = t_start + (uint64_t)(cfg.warmup * 1e9);
  uint64_t t_stop = t_count_from + (uint64_t)(cfg.seconds * 1e9);
  uint64_t t_hard = t_start + (uint64_t)(cfg.timeout * 1e9);
  for (unsigned t = 0; t < cfg.threads; t++) {
    struct worker *w = &workers[t];
    w->t_count_from = t_count_from;
    w->t_stop = t_stop;
    w->t_hard = t_hard;
    if (cfg.threads == 1) {
      worker_main(w);
    } else {
      int e = pthread_create(&w->tid, NULL, worker_main, w);
      if (e) die("pthread_create: %s", strerror(e));
    }
  }
  if (cfg.threads > 1)
    for (unsigned t = 0; t < cfg.threads; t++) pthread_join(workers[t].tid, NULL);
  uint64_t t_end = now_ns();
  getrusage(RUSAGE_SELF, &ru1);

  struct hist *h = calloc(1, sizeof *h);
  if (!h) die("out of memory");
  uint64_t ops = 0, ops_all = 0, errors = 0, passes = 0, submits = 0;
  uint32_t first_error = 0;
  const char *fatal = NULL;
  for (unsigned t = 0; t < cfg.threads; t++) {
    struct worker *w = &workers[t];
    h_merge(h, &w->hist);
    ops += w->ops;
    ops_all += w->ops_all;
    passes += w->passes;
    submits += w->submits;
    if (w->errors && !errors) first_error = w->first_error;
    errors += w->errors;
    if (w->fatal && !fatal) fatal = w->fatal;
    io_uring_queue_exit(&w->ring);
  }
  double secs = (double)((t_end < t_stop ? t_end : t_stop) - t_count_from) / 1e9;

  /* Clean disconnect: every connection is idle unless something failed. */
  for (unsigned i = 0; i < cfg.conns; i++) {
    if (!fatal) {
      uint8_t d[REQ_SIZE] = { 0 };
      put_be32(d, NBD_REQUEST_MAGIC);
      put_be16(d + 6, NBD_CMD_DISC);
      ssize_t r = send(conns[i].fd, d, sizeof d, MSG_NOSIGNAL);
      (void)r;
    }
    close(conns[i].fd);
  }

  double cpu = (double)(ru1.ru_utime.tv_sec - ru0.ru_utime.tv_sec) +
               (double)(ru1.ru_utime.tv_usec - ru0.ru_utime.tv_usec) / 1e6 +
               (double)(ru1.ru_stime.tv_sec - ru0.ru_stime.tv_sec) +
               (double)(ru1.ru_stime.tv_usec - ru0.ru_stime.tv_usec) / 1e6;
  printf("{\"engine\":\"uring\",\"op\":\"%s\",\"fua\":%s,\"bs\":%" PRIu64
         ",\"qd\":%u,\"conns\":%u,\"threads\":%u,\"export_size\":%" PRIu64
         ",\"ops\":%" PRIu64 ",\"ops_all\":%" PRIu64 ",\"seconds\":%.6f,\"iops\":%.1f"
         ",\"mib_s\":%.2f,\"lat_mean_us\":%.2f,\"lat_p50_us\":%.2f,\"lat_p90_us\":%.2f"
         ",\"lat_p99_us\":%.2f,\"lat_p999_us\":%.2f,\"lat_max_us\":%.2f"
         ",\"client_cpu_s\":%.3f,\"client_cpu_us_per_op\":%.3f,\"enter_per_op\":%.3f"
         ",\"errors\":%" PRIu64 ",\"first_error\":%u,\"fatal\":",
         cfg.write ? "write" : "read", cfg.fua ? "true" : "false", cfg.bs, cfg.qd, cfg.conns,
         cfg.threads, size, ops, ops_all, secs, secs > 0 ? (double)ops / secs : 0,
         secs > 0 ? (double)ops * (double)cfg.bs / secs / 1048576.0 : 0,
         h->count ? (double)(h->sum / h->count) / 1e3 : 0, h_pct(h, 50) / 1e3,
         h_pct(h, 90) / 1e3, h_pct(h, 99) / 1e3, h_pct(h, 99.9) / 1e3, (double)h->max / 1e3,
         cpu, ops_all ? cpu * 1e6 / (double)ops_all : 0,
         ops_all ? (double)submits / (double)ops_all : 0, errors, first_error);
  if (fatal) printf("\"%s\"", fatal);
  else printf("null");
  printf("}\n");
  fflush(stdout);
  (void)passes;
  if (fatal) { fprintf(stderr, "nbdblast: %s\n", fatal); return 1; }
  if (errors) { fprintf(stderr, "nbdblast: %" PRIu64 " request(s) failed, first NBD error %u\n", errors, first_error); return 1; }
  if (ops == 0) { fprintf(stderr, "nbdblast: no request completed\n"); return 1; }
  return 0;
}
