/* nbdload: a small NBD load generator on libnbd's asynchronous API.
 *
 * Opens --conns connections to --uri, keeps --qd requests in flight on every
 * connection, and records every request's latency in a log-linear histogram
 * (about 1.5 % resolution).  Connections are driven by --threads worker
 * threads (default: 1), each polling all the handles it owns with poll(2).
 * At the end it prints one JSON line on stdout.
 *
 * Run time is bounded: in --seconds mode no request is issued after the
 * deadline and a watchdog (SIGALRM) kills the process if draining or
 * connecting hangs; in --ops mode --timeout bounds the whole run.
 *
 * Build: see CMakeLists.txt (pkg-config libnbd).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include <libnbd.h>

#include "loadgen.h"

/* ------------------------------------------------------------------ */
/* Utilities                                                           */

static void die_nbd(const char *what)
{
  die("%s: %s (errno %d)", what, nbd_get_error() ? nbd_get_error() : "(no message)",
      nbd_get_errno());
}

/* ------------------------------------------------------------------ */
/* Configuration                                                       */

enum op { OP_READ, OP_WRITE };
enum pattern { PAT_RAND, PAT_SEQ };

static struct {
  const char *uri;
  enum op op;
  enum pattern pattern;
  uint64_t bs;
  unsigned qd;
  unsigned conns;
  unsigned threads;
  double seconds;
  double warmup;
  uint64_t ops;          /* 0 = time mode */
  double timeout;        /* hard limit on the whole run */
  uint64_t size_limit;   /* 0 = whole export */
  uint64_t seed;
  bool fua;
  uint64_t align;        /* 0 = bs: random offsets are multiples of this */
  uint64_t flush_every;  /* 0 = never: every Nth request is a FLUSH */
} cfg = {
  .op = OP_READ, .pattern = PAT_RAND, .bs = 4096, .qd = 1, .conns = 1,
  .threads = 1, .seconds = 5, .warmup = 0, .ops = 0, .timeout = 0,
  .size_limit = 0, .seed = 0x6e62646c6f6164ull, .fua = false,
};

/* ------------------------------------------------------------------ */
/* Connections and workers                                             */

struct conn;

struct slot {
  struct conn *c;
  char *buf;
  uint64_t t0;
  bool flush;         /* --flush-every: this request is a FLUSH */
};

struct worker;

struct conn {
  struct nbd_handle *h;
  struct worker *w;
  unsigned id;
  uint64_t nblocks;   /* addressable blocks of bs */
  uint64_t seq_next;  /* next block for PAT_SEQ */
  uint64_t rng;
  uint64_t nalign;    /* --align: addressable offsets (multiples of align) */
  uint64_t since_flush;
  struct slot *slots;
  struct slot **ready; /* stack of idle slots */
  unsigned nready;
  unsigned inflight;
};

struct worker {
  pthread_t tid;
  unsigned id;
  struct conn **conns;
  unsigned nconns;
  /* results */
  struct hist hist;
  uint64_t ops, bytes;
  uint64_t ops_all;     /* every successful completion, incl. warmup/drain */
  uint64_t flushes;     /* --flush-every: completed FLUSHes (not in ops) */
  uint64_t issued;
  uint64_t quota;       /* --ops mode: ops this worker issues */
  uint64_t first_t0, last_done;
  uint64_t errors;
  int first_error;
  /* timing, set by main before the threads start */
  uint64_t t_start, t_count_from, t_stop, t_hard;
  const char *fatal;   /* non-NULL: libnbd failure in the worker */
  char fatal_msg[512];
};

static int completion_cb(void *user_data, int *error)
{
  struct slot *s = user_data;
  struct conn *c = s->c;
  struct worker *w = c->w;
  uint64_t t = now_ns();

  c->inflight--;
  c->ready[c->nready++] = s;
  if (*error) {
    if (w->errors++ == 0)
      w->first_error = *error;
    return 1;
  }
  if (s->flush) {
    w->flushes++;
    return 1;
  }
  w->ops_all++;
  if (cfg.ops) {
    /* ops mode: everything counts */
    h_add(&w->hist, t - s->t0);
    w->ops++;
    w->bytes += cfg.bs;
    w->last_done = t;
  } else if (s->t0 >= w->t_count_from && t <= w->t_stop) {
    h_add(&w->hist, t - s->t0);
    w->ops++;
    w->bytes += cfg.bs;
  }
  return 1; /* auto-retire */
}

static void worker_fail(struct worker *w, const char *what)
{
  const char *e = nbd_get_error();
  snprintf(w->fatal_msg, sizeof w->fatal_msg, "%s: %s (errno %d)", what,
           e ? e : "(no message)", nbd_get_errno());
  w->fatal = w->fatal_msg;
}

static bool submit(struct worker *w, struct conn *c)
{
  struct slot *s = c->ready[--c->nready];
  s->flush = false;
  if (cfg.flush_every && ++c->since_flush > cfg.flush_every) {
    /* Every (N+1)th request is a FLUSH; it neither counts as an op nor
     * towards --ops. */
    c->since_flush = 0;
    s->flush = true;
    nbd_completion_callback cb = { .callback = completion_cb, .user_data = s, .free = NULL };
    s->t0 = now_ns();
    if (nbd_aio_flush(c->h, cb, 0) == -1) {
      c->ready[c->nready++] = s;
      worker_fail(w, "nbd_aio_flush");
      return false;
    }
    c->inflight++;
    return true;
  }
  uint64_t blk;
  if (cfg.pattern == PAT_RAND) {
    blk = splitmix64(&c->rng) % c->nblocks;
  } else {
    blk = c->seq_next++;
    if (c->seq_next >= c->nblocks)
      c->seq_next = 0;
  }
  uint64_t off = blk * cfg.bs;
  if (cfg.align && cfg.pattern == PAT_RAND) /* --align: any multiple of align */
    off = splitmix64(&c->rng) % c->nalign * cfg.align;
  nbd_completion_callback cb = { .callback = completion_cb, .user_data = s, .free = NULL };
  s->t0 = now_ns();
  if (w->first_t0 == 0)
    w->first_t0 = s->t0;
  int64_t cookie;
  if (cfg.op == OP_READ)
    cookie = nbd_aio_pread(c->h, s->buf, cfg.bs, off, cb, 0);
  else
    cookie = nbd_aio_pwrite(c->h, s->buf, cfg.bs, off, cb, cfg.fua ? LIBNBD_CMD_FLAG_FUA : 0);
  if (cookie == -1) {
    c->ready[c->nready++] = s;
    worker_fail(w, cfg.op == OP_READ ? "nbd_aio_pread" : "nbd_aio_pwrite");
    return false;
  }
  c->inflight++;
  w->issued++;
  return true;
}

static void *worker_main(void *arg)
{
  struct worker *w = arg;
  struct pollfd *pfd = calloc(w->nconns, sizeof *pfd);
  if (!pfd) {
    w->fatal = "out of memory";
    return NULL;
  }

  for (;;) {
    uint64_t t = now_ns();
    if (t >= w->t_hard) {
      w->fatal = "timed out (server not answering?)";
      break;
    }
    bool issuing = w->errors == 0 && !w->fatal &&
                   (cfg.ops ? w->issued < w->quota : t < w->t_stop);
    unsigned inflight = 0;
    for (unsigned i = 0; i < w->nconns; i++) {
      struct conn *c = w->conns[i];
      while (issuing && c->nready > 0) {
        if (!submit(w, c)) {
          issuing = false;
          break;
        }
        if (cfg.ops && w->issued >= w->quota)
          issuing = false;
      }
      inflight += c->inflight;
    }
    if (w->fatal)
      break;
    if (inflight == 0) {
      if (!issuing)
        break;
      continue;
    }

    for (unsigned i = 0; i < w->nconns; i++) {
      struct nbd_handle *h = w->conns[i]->h;
      unsigned dir = nbd_aio_get_direction(h);
      pfd[i].fd = nbd_aio_get_fd(h);
      if (pfd[i].fd < 0) {
        worker_fail(w, "nbd_aio_get_fd");
        break;
      }
      pfd[i].events = ((dir & LIBNBD_AIO_DIRECTION_READ) ? POLLIN : 0) |
                      ((dir & LIBNBD_AIO_DIRECTION_WRITE) ? POLLOUT : 0);
      pfd[i].revents = 0;
    }
    if (w->fatal)
      break;

    /* Wake up at least at the stop time (to stop issuing) and every 100 ms
     * (to enforce the hard deadline). */
    int64_t wait_ms = 100;
    if (!cfg.ops && issuing && w->t_stop > t) {
      int64_t left = (int64_t)((w->t_stop - t) / 1000000) + 1;
      if (left < wait_ms)
        wait_ms = left;
    }
    int r = poll(pfd, w->nconns, (int)wait_ms);
    if (r == -1) {
      if (errno == EINTR)
        continue;
      snprintf(w->fatal_msg, sizeof w->fatal_msg, "poll: %s", strerror(errno));
      w->fatal = w->fatal_msg;
      break;
    }
    for (unsigned i = 0; i < w->nconns && r > 0; i++) {
      struct nbd_handle *h = w->conns[i]->h;
      short rev = pfd[i].revents;
      if (rev & (POLLIN | POLLHUP | POLLERR)) {
        if (nbd_aio_notify_read(h) == -1) {
          worker_fail(w, "nbd_aio_notify_read (connection lost?)");
          break;
        }
      } else if (rev & POLLOUT) {
        if (nbd_aio_notify_write(h) == -1) {
          worker_fail(w, "nbd_aio_notify_write (connection lost?)");
          break;
        }
      }
      if (rev & POLLNVAL) {
        w->fatal = "poll: POLLNVAL";
        break;
      }
    }
    if (w->fatal)
      break;
  }
  free(pfd);
  return NULL;
}

/* ------------------------------------------------------------------ */

/* Prints s as a JSON string literal. */
static void json_str(FILE *f, const char *s)
{
  fputc('"', f);
  for (; *s; s++) {
    unsigned char ch = (unsigned char)*s;
    if (ch == '"' || ch == '\\') fprintf(f, "\\%c", ch);
    else if (ch < 0x20) fprintf(f, "\\u%04x", ch);
    else fputc(ch, f);
  }
  fputc('"', f);
}

static void usage(FILE *f)
{
  fprintf(f,
    "usage: nbdload --uri URI [options]\n"
    "  --uri URI            NBD URI, e.g. nbd://127.0.0.1:10809/name, or over TLS\n"
    "                       nbds://ID@127.0.0.1:10809/name?tls-psk-file=FILE\n"
    "  --op read|write      request type (default read)\n"
    "  --pattern rand|seq   offsets: random aligned to bs, or sequential (default rand)\n"
    "  --bs BYTES           request size, suffixes K M G (default 4096)\n"
    "  --qd N               requests in flight per connection (default 1)\n"
    "  --conns N            connections (default 1)\n"
    "  --threads N          client threads driving the connections (default 1)\n"
    "  --seconds S          measure for S seconds (default 5)\n"
    "  --warmup S           run S seconds before measuring (default 0)\n"
    "  --ops N              instead of --seconds: issue N requests in total\n"
    "  --timeout S          hard limit for the run (default seconds+warmup+30, or 300 with --ops)\n"
    "  --size-limit BYTES   only address the first BYTES of the export\n"
    "  --seed N             random seed (default fixed)\n"
    "  --fua                set FUA on writes\n"
    "  --align BYTES        random offsets are multiples of BYTES (default bs), e.g.\n"
    "                       --bs 1K --align 512 for unaligned writes\n"
    "  --flush-every N      after every N requests on a connection, send a FLUSH\n"
    "                       (not counted in ops; \"flushes\" in the output)\n"
    "Prints one JSON line with ops, bytes, seconds, iops, mb_s (1e6 B/s), mib_s,\n"
    "and latency percentiles in microseconds.\n");
}

int main(int argc, char **argv)
{
  enum { O_URI = 256, O_OP, O_PATTERN, O_BS, O_QD, O_CONNS, O_THREADS, O_SECONDS,
         O_WARMUP, O_OPS, O_TIMEOUT, O_SIZE_LIMIT, O_SEED, O_FUA, O_ALIGN, O_FLUSH_EVERY,
         O_HELP };
  static const struct option longopts[] = {
    { "uri", required_argument, 0, O_URI },
    { "op", required_argument, 0, O_OP },
    { "pattern", required_argument, 0, O_PATTERN },
    { "bs", required_argument, 0, O_BS },
    { "qd", required_argument, 0, O_QD },
    { "conns", required_argument, 0, O_CONNS },
    { "threads", required_argument, 0, O_THREADS },
    { "seconds", required_argument, 0, O_SECONDS },
    { "warmup", required_argument, 0, O_WARMUP },
    { "ops", required_argument, 0, O_OPS },
    { "timeout", required_argument, 0, O_TIMEOUT },
    { "size-limit", required_argument, 0, O_SIZE_LIMIT },
    { "seed", required_argument, 0, O_SEED },
    { "fua", no_argument, 0, O_FUA },
    { "align", required_argument, 0, O_ALIGN },
    { "flush-every", required_argument, 0, O_FLUSH_EVERY },
    { "help", no_argument, 0, O_HELP },
    { 0, 0, 0, 0 },
  };
  int o;
  while ((o = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
    switch (o) {
    case O_URI: cfg.uri = optarg; break;
    case O_OP:
      if (!strcmp(optarg, "read")) cfg.op = OP_READ;
      else if (!strcmp(optarg, "write")) cfg.op = OP_WRITE;
      else die("--op must be read or write");
      break;
    case O_PATTERN:
      if (!strcmp(optarg, "rand")) cfg.pattern = PAT_RAND;
      else if (!strcmp(optarg, "seq")) cfg.pattern = PAT_SEQ;
      else die("--pattern must be rand or seq");
      break;
    case O_BS: cfg.bs = parse_size("--bs", optarg); break;
    case O_QD: cfg.qd = (unsigned)parse_size("--qd", optarg); break;
    case O_CONNS: cfg.conns = (unsigned)parse_size("--conns", optarg); break;
    case O_THREADS: cfg.threads = (unsigned)parse_size("--threads", optarg); break;
    case O_SECONDS: cfg.seconds = parse_double("--seconds", optarg); break;
    case O_WARMUP: cfg.warmup = parse_double("--warmup", optarg); break;
    case O_OPS: cfg.ops = parse_size("--ops", optarg); break;
    case O_TIMEOUT: cfg.timeout = parse_double("--timeout", optarg); break;
    case O_SIZE_LIMIT: cfg.size_limit = parse_size("--size-limit", optarg); break;
    case O_SEED: cfg.seed = parse_size("--seed", optarg); break;
    case O_FUA: cfg.fua = true; break;
    case O_ALIGN: cfg.align = parse_size("--align", optarg); break;
    case O_FLUSH_EVERY: cfg.flush_every = parse_size("--flush-every", optarg); break;
    case O_HELP: case 'h': usage(stdout); return 0;
    default: usage(stderr); return 2;
    }
  }
  if (optind != argc || !cfg.uri) {
    usage(stderr);
    return 2;
  }
  if (cfg.bs == 0 || cfg.bs > 64u << 20) die("--bs must be in 1..64M");
  if (cfg.qd == 0 || cfg.qd > 1024) die("--qd must be in 1..1024");
  if (cfg.conns == 0 || cfg.conns > 256) die("--conns must be in 1..256");
  if (cfg.threads == 0) die("--threads must be >= 1");
  if (cfg.threads > cfg.conns) cfg.threads = cfg.conns;
  if (!cfg.ops && cfg.seconds <= 0) die("--seconds must be > 0");
  if (cfg.align == cfg.bs) cfg.align = 0;  /* the default: identical to no --align */
  if (cfg.align && cfg.pattern != PAT_RAND) die("--align only applies to --pattern rand");
  if (cfg.timeout == 0)
    cfg.timeout = cfg.ops ? 300 : cfg.seconds + cfg.warmup + 30;

  /* Watchdog over everything, including connecting and draining. */
  signal(SIGALRM, watchdog_alarm);
  alarm((unsigned)cfg.timeout + 15);
  signal(SIGPIPE, SIG_IGN);

  /* Connect. */
  struct conn *conns = calloc(cfg.conns, sizeof *conns);
  if (!conns) die("out of memory");
  int64_t size = -1;
  int multi_conn = -1;
  for (unsigned i = 0; i < cfg.conns; i++) {
    struct conn *c = &conns[i];
    c->id = i;
    c->h = nbd_create();
    if (!c->h) die_nbd("nbd_create");
    if (nbd_set_pread_initialize(c->h, false) == -1) die_nbd("nbd_set_pread_initialize");
    /* The URI is ours to trust: let nbds:// URIs name a tls-psk-file. */
    if (nbd_set_uri_allow_local_file(c->h, true) == -1) die_nbd("nbd_set_uri_allow_local_file");
    if (nbd_connect_uri(c->h, cfg.uri) == -1) die_nbd("nbd_connect_uri");
    int64_t sz = nbd_get_size(c->h);
    if (sz == -1) die_nbd("nbd_get_size");
    if (size == -1) size = sz;
    else if (sz != size) die("connections disagree on the export size");
    if (i == 0) {
      multi_conn = nbd_can_multi_conn(c->h);
      if (multi_conn == -1) die_nbd("nbd_can_multi_conn");
    }
    if (cfg.op == OP_WRITE) {
      int ro = nbd_is_read_only(c->h);
      if (ro == -1) die_nbd("nbd_is_read_only");
      if (ro) die("export is read-only, cannot --op write");
      if (cfg.flush_every) {
        int f = nbd_can_flush(c->h);
        if (f == -1) die_nbd("nbd_can_flush");
        if (!f) die("server does not support FLUSH");
      }
      if (cfg.fua) {
        int f = nbd_can_fua(c->h);
        if (f == -1) die_nbd("nbd_can_fua");
        if (!f) die("server does not support FUA");
      }
    }
  }
  uint64_t span = (uint64_t)size;
  if (cfg.size_limit && cfg.size_limit < span)
    span = cfg.size_limit;
  uint64_t nblocks = span / cfg.bs;
  if (nblocks == 0) die("export (or --size-limit) smaller than --bs");
  uint64_t nalign = cfg.align ? (span - cfg.bs) / cfg.align + 1 : 0;

  /* Buffers: one per slot.  Write data is pseudo-random, not zeros. */
  for (unsigned i = 0; i < cfg.conns; i++) {
    struct conn *c = &conns[i];
    c->nblocks = nblocks;
    c->nalign = nalign;
    c->seq_next = (uint64_t)i * nblocks / cfg.conns;
    c->rng = cfg.seed ^ (0x9e3779b97f4a7c15ull * (i + 1));
    c->slots = calloc(cfg.qd, sizeof *c->slots);
    c->ready = calloc(cfg.qd, sizeof *c->ready);
    if (!c->slots || !c->ready) die("out of memory");
    for (unsigned k = 0; k < cfg.qd; k++) {
      struct slot *s = &c->slots[k];
      s->c = c;
      if (posix_memalign((void **)&s->buf, 4096, cfg.bs)) die("out of memory");
      if (cfg.op == OP_WRITE) {
        uint64_t st = cfg.seed + i * 1000003u + k;
        for (uint64_t p = 0; p + 8 <= cfg.bs; p += 8) {
          uint64_t v = splitmix64(&st);
          memcpy(s->buf + p, &v, 8);
        }
      } else {
        memset(s->buf, 0, cfg.bs);
      }
      /* push in reverse so slot 0 is used first */
      c->ready[cfg.qd - 1 - k] = s;
    }
    c->nready = cfg.qd;
  }

  /* Workers. */
  struct worker *workers = calloc(cfg.threads, sizeof *workers);
  if (!workers) die("out of memory");
  for (unsigned t = 0; t < cfg.threads; t++) {
    workers[t].id = t;
    workers[t].conns = calloc(cfg.conns, sizeof(struct conn *));
    if (!workers[t].conns) die("out of memory");
  }
  for (unsigned i = 0; i < cfg.conns; i++) {
    struct worker *w = &workers[i % cfg.threads];
    w->conns[w->nconns++] = &conns[i];
    conns[i].w = w;
  }
  if (cfg.ops) {
    for (unsigned t = 0; t < cfg.threads; t++)
      workers[t].quota = cfg.ops / cfg.threads + (t < cfg.ops % cfg.threads ? 1 : 0);
  }

  struct rusage ru0, ru1;
  getrusage(RUSAGE_SELF, &ru0);
  uint64_t t_start = now_ns();
  uint64_t t_count_from = t_start + (uint64_t)(cfg.warmup * 1e9);
  uint64_t t_stop = t_count_from + (uint64_t)(cfg.seconds * 1e9);
  uint64_t t_hard = t_start + (uint64_t)(cfg.timeout * 1e9);
  for (unsigned t = 0; t < cfg.threads; t++) {
    struct worker *w = &workers[t];
    w->t_start = t_start;
    w->t_count_from = cfg.ops ? 0 : t_count_from;
    w->t_stop = cfg.ops ? UINT64_MAX : t_stop;
    w->t_hard = t_hard;
    if (cfg.threads == 1) {
      worker_main(w);
    } else {
      int e = pthread_create(&w->tid, NULL, worker_main, w);
      if (e) die("pthread_create: %s", strerror(e));
    }
  }
  if (cfg.threads > 1)
    for (unsigned t = 0; t < cfg.threads; t++)
      pthread_join(workers[t].tid, NULL);
  uint64_t t_end = now_ns();
  getrusage(RUSAGE_SELF, &ru1);

  /* Merge. */
  struct hist *h = calloc(1, sizeof *h);
  if (!h) die("out of memory");
  uint64_t flushes = 0;
  uint64_t ops = 0, ops_all = 0, bytes = 0, errors = 0, last_done = 0, first_t0 = UINT64_MAX;
  int first_error = 0;
  const char *fatal = NULL;
  for (unsigned t = 0; t < cfg.threads; t++) {
    struct worker *w = &workers[t];
    h_merge(h, &w->hist);
    ops += w->ops;
    ops_all += w->ops_all;
    flushes += w->flushes;
    bytes += w->bytes;
    if (w->errors && !errors) first_error = w->first_error;
    errors += w->errors;
    if (w->last_done > last_done) last_done = w->last_done;
    if (w->first_t0 && w->first_t0 < first_t0) first_t0 = w->first_t0;
    if (w->fatal && !fatal) fatal = w->fatal;
  }
  double secs;
  if (cfg.ops)
    secs = (last_done > first_t0 && first_t0 != UINT64_MAX) ? (double)(last_done - first_t0) / 1e9 : 0;
  else
    secs = (double)((t_end < t_stop ? t_end : t_stop) - t_count_from) / 1e9;

  /* Disconnect cleanly (only if the connections are still healthy). */
  if (!fatal) {
    for (unsigned i = 0; i < cfg.conns; i++)
      if (nbd_shutdown(conns[i].h, 0) == -1) {
        fprintf(stderr, "nbdload: warning: nbd_shutdown: %s\n", nbd_get_error());
      }
  }
  for (unsigned i = 0; i < cfg.conns; i++)
    nbd_close(conns[i].h);

  double cpu = (double)(ru1.ru_utime.tv_sec - ru0.ru_utime.tv_sec) +
               (double)(ru1.ru_utime.tv_usec - ru0.ru_utime.tv_usec) / 1e6 +
               (double)(ru1.ru_stime.tv_sec - ru0.ru_stime.tv_sec) +
               (double)(ru1.ru_stime.tv_usec - ru0.ru_stime.tv_usec) / 1e6;

  printf("{\"uri\":");
  json_str(stdout, cfg.uri);
  printf(",\"op\":\"%s\",\"pattern\":\"%s\",\"bs\":%" PRIu64
         ",\"qd\":%u,\"conns\":%u,\"threads\":%u,\"export_size\":%" PRId64
         ",\"multi_conn\":%s,\"ops\":%" PRIu64 ",\"ops_all\":%" PRIu64 ",\"bytes\":%" PRIu64
         ",\"seconds\":%.6f,\"iops\":%.1f,\"mb_s\":%.2f,\"mib_s\":%.2f"
         ",\"lat_mean_us\":%.2f,\"lat_p50_us\":%.2f,\"lat_p90_us\":%.2f"
         ",\"lat_p99_us\":%.2f,\"lat_p999_us\":%.2f,\"lat_max_us\":%.2f"
         ",\"client_cpu_s\":%.3f,\"errors\":%" PRIu64 ",\"first_error\":",
         cfg.op == OP_READ ? "read" : "write",
         cfg.pattern == PAT_RAND ? "rand" : "seq", cfg.bs, cfg.qd, cfg.conns, cfg.threads,
         size, multi_conn ? "true" : "false", ops, ops_all, bytes, secs,
         secs > 0 ? (double)ops / secs : 0, secs > 0 ? (double)bytes / secs / 1e6 : 0,
         secs > 0 ? (double)bytes / secs / 1048576.0 : 0,
         h->count ? (double)(h->sum / h->count) / 1e3 : 0, h_pct(h, 50) / 1e3,
         h_pct(h, 90) / 1e3, h_pct(h, 99) / 1e3, h_pct(h, 99.9) / 1e3,
         (double)h->max / 1e3, cpu, errors);
  json_str(stdout, first_error ? strerror(first_error) : "");
  if (cfg.flush_every)
    printf(",\"flushes\":%" PRIu64, flushes);
  if (cfg.align)
    printf(",\"align\":%" PRIu64, cfg.align);
  printf(",\"fatal\":");
  if (fatal) json_str(stdout, fatal);
  else printf("null");
  printf("}\n");
  fflush(stdout);

  if (fatal) {
    fprintf(stderr, "nbdload: %s\n", fatal);
    return 1;
  }
  if (errors) {
    fprintf(stderr, "nbdload: %" PRIu64 " request(s) failed, first error: %s\n", errors,
            strerror(first_error));
    return 1;
  }
  if (ops == 0) {
    fprintf(stderr, "nbdload: no request completed\n");
    return 1;
  }
  return 0;
}
