/* nbdstorm: a boot storm.  N simulated nodes each replay one recorded
 * request trace (bench/boot-trace.txt.gz) at once, each over its own
 * connection, and the time every node takes is reported.
 *
 * Every node connects at the same moment (libnbd's asynchronous connect, so
 * the handshakes overlap as they would when a rack powers on), then issues
 * the trace's requests in order with at most --qd in flight.  The order is
 * kept where it matters, as a block layer keeps it:
 *   - a FLUSH is issued once everything before it has completed, and
 *     nothing after it is issued until it completes;
 *   - a request that overlaps an earlier one still in flight, where either
 *     of them writes (WRITE, TRIM, WRITE_ZEROES), waits for it.
 * Otherwise requests go out as fast as the server answers them (the trace's
 * times are not replayed).
 *
 * With --netns, each node's connection is made from its own network
 * namespace (the worker thread enters it around nbd_aio_connect_uri, which
 * creates the socket; a socket stays in the namespace it was made in), so a
 * node's traffic crosses that namespace's links: bench/netstorm.py's
 * emulated network.  A URI may also name a Unix socket
 * (nbd+unix:///EXPORT?socket=PATH), one per node with "%d" in PATH.
 *
 * A node's time runs from the common start (before any connect) to the
 * completion of its last request.  Nodes stay connected until every node is
 * done, then disconnect.  Output: one JSON line on stdout with the wall time
 * (the slowest node), p50/p99/min/max over the nodes, request and byte
 * counts, and the client's CPU time.  --per-node FILE writes every node's
 * connect and finish times.  Exit status: 0 ok, 1 on any error (a refused
 * export, a failed request), 3 if the watchdog fires.
 *
 * With --files DIR instead of --uri there is no NBD, no network and no
 * server: each node is a thread that replays the trace's mutations into a
 * file of its own, DIR/node-N.diff (created sparse if absent, left in
 * place): WRITE as pwrite, FLUSH (and a FUA write's flush) as fdatasync,
 * TRIM and WRITE_ZEROES as a punched hole; reads are skipped.  This is what
 * the kernel alone costs to keep N distinct diffs, as node views do;
 * --no-flush leaves the fdatasyncs out, so the difference between the two
 * runs is the cost of making them durable (bench/storm.py --floor).  With
 * --maps each node also keeps a block map as a node view does: at a flush
 * (a FLUSH, or a FUA write's) that follows writes to blocks its diff did
 * not hold yet, after the diff's fdatasync, it writes a 4 KiB map slot into
 * DIR/node-N.bitmap (two slots, allocated when the file is made, written
 * in turn) and fdatasyncs that.
 * Its JSON line has the wall time, the process's CPU time and the counts.
 *
 * Trace format (text, optionally gzip'd): '#' comment lines, then one
 * request per line, "T_MS OP OFFSET LENGTH [fua]", OP one of R W F T Z.
 *
 * Build: see CMakeLists.txt (libnbd, zlib).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <sched.h>
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
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <libnbd.h>
#include <zlib.h>

#include "loadgen.h"

/* ------------------------------------------------------------------ */
/* The trace                                                           */

enum op { OP_READ, OP_WRITE, OP_FLUSH, OP_TRIM, OP_ZERO };

struct req {
  uint64_t offset;
  uint32_t length;
  uint8_t op;
  bool fua;
};

static struct req *trace;
static size_t ntrace;
static uint32_t max_length;
static uint64_t trace_end; /* highest offset + length */

static void load_trace(const char *path)
{
  gzFile f = gzopen(path, "rb");
  if (!f)
    die("%s: cannot open: %s", path, strerror(errno));
  size_t cap = 4096;
  trace = malloc(cap * sizeof *trace);
  char line[256];
  unsigned lineno = 0;
  while (gzgets(f, line, sizeof line)) {
    lineno++;
    if (line[0] == '#' || line[0] == '\n')
      continue;
    double t;
    char op[4], flag[8] = "";
    uint64_t off;
    uint32_t len;
    int n = sscanf(line, "%lf %3s %" SCNu64 " %" SCNu32 " %7s", &t, op, &off, &len, flag);
    if (n < 4 || op[1] != '\0' || strchr("RWFTZ", op[0]) == NULL ||
        (n == 5 && strcmp(flag, "fua") != 0))
      die("%s:%u: expected \"T_MS R|W|F|T|Z OFFSET LENGTH [fua]\"", path, lineno);
    if (ntrace == cap)
      trace = realloc(trace, (cap *= 2) * sizeof *trace);
    struct req *r = &trace[ntrace++];
    r->op = (uint8_t)(strchr("RWFTZ", op[0]) - "RWFTZ");
    r->offset = off;
    r->length = len;
    r->fua = n == 5;
    if ((r->op == OP_READ || r->op == OP_WRITE) && len > max_length)
      max_length = len;
    if (off + len > trace_end)
      trace_end = off + len;
  }
  gzclose(f);
  if (ntrace == 0)
    die("%s: no requests", path);
}

/* ------------------------------------------------------------------ */
/* Nodes                                                               */

struct node {
  unsigned index;
  struct nbd_handle *h;
  char uri[256];
  size_t next;       /* next trace entry to issue */
  size_t completed;
  unsigned inflight;
  bool flushing;     /* a FLUSH is in flight */
  bool connected;
  uint64_t t_connected, t_done;
  size_t slot_of[64]; /* trace index of each in-flight request, by slot */
  bool slot_used[64];
  uint64_t bytes_read, bytes_written;
  unsigned flushes;
};

struct completion {
  struct node *node;
  unsigned slot;
};

static struct {
  const char *trace;
  const char *uri;
  unsigned nodes;
  unsigned qd;
  unsigned threads;
  unsigned timeout;
  const char *per_node;
  const char *netns; /* namespace of node %d: a path, or a name under /run/netns */
  const char *files; /* --files DIR: no NBD, the mutations into DIR/node-N.diff */
  bool flush;        /* --files: fdatasync at flushes (off with --no-flush) */
  bool maps;         /* --files: a block map per node, persisted after the diff */
} cfg = { .nodes = 1, .qd = 4, .threads = 1, .timeout = 600, .flush = true };

static uint8_t *write_buf;
static uint64_t t_start;
static int home_netns = -1; /* the namespace the workers return to after a connect */

/* Writes `fmt` to out with every "%d" replaced by i. */
static void format_index(char *out, size_t size, const char *fmt, unsigned i)
{
  size_t o = 0;
  for (const char *p = fmt; *p;) {
    if (o + 1 >= size)
      die("too long after expanding %%d: %s", fmt);
    if (p[0] == '%' && p[1] == 'd') {
      int k = snprintf(out + o, size - o, "%u", i);
      if (k < 0 || (size_t)k >= size - o)
        die("too long after expanding %%d: %s", fmt);
      o += (size_t)k;
      p += 2;
    } else {
      out[o++] = *p++;
    }
  }
  out[o] = '\0';
}

struct worker {
  pthread_t tid;
  struct node **nodes;
  unsigned nnodes;
  uint8_t *read_buf; /* shared by all of this worker's reads: never checked */
  const char *fatal;
  char fatal_msg[1024];
};

static void worker_fail(struct worker *w, struct node *n, const char *what)
{
  const char *e = nbd_get_error();
  snprintf(w->fatal_msg, sizeof w->fatal_msg, "node %u (%s): %s: %s (errno %d)", n->index,
           n->uri, what, e ? e : "(no message)", nbd_get_errno());
  w->fatal = w->fatal_msg;
}

/* Starts node n's connect, from its network namespace if --netns is given.
 * setns(CLONE_NEWNET) acts on the calling thread only. */
static bool start_connect(struct worker *w, struct node *n)
{
  if (!cfg.netns)
    return nbd_aio_connect_uri(n->h, n->uri) != -1;
  char path[512], name[256];
  format_index(name, sizeof name, cfg.netns, n->index);
  snprintf(path, sizeof path, "%s%s", strchr(name, '/') ? "" : "/run/netns/", name);
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd == -1 || setns(fd, CLONE_NEWNET) == -1) {
    snprintf(w->fatal_msg, sizeof w->fatal_msg, "node %u: entering network namespace %s: %s",
             n->index, path, strerror(errno));
    w->fatal = w->fatal_msg;
    if (fd != -1)
      close(fd);
    return false;
  }
  close(fd);
  const bool ok = nbd_aio_connect_uri(n->h, n->uri) != -1;
  if (setns(home_netns, CLONE_NEWNET) == -1)
    die("returning to the first network namespace: %s", strerror(errno));
  if (!ok)
    worker_fail(w, n, "nbd_aio_connect_uri");
  return ok;
}

static bool writes(uint8_t op) { return op == OP_WRITE || op == OP_TRIM || op == OP_ZERO; }

/* May trace entry `i` be issued on node `n` now? */
static bool may_issue(const struct node *n, size_t i)
{
  const struct req *r = &trace[i];
  if (n->inflight >= cfg.qd || n->flushing)
    return false;
  if (r->op == OP_FLUSH)
    return n->inflight == 0;
  for (unsigned s = 0; s < cfg.qd; s++) {
    if (!n->slot_used[s])
      continue;
    const struct req *o = &trace[n->slot_of[s]];
    if ((writes(r->op) || writes(o->op)) && r->offset < o->offset + o->length &&
        o->offset < r->offset + r->length)
      return false;
  }
  return true;
}

static int completion_cb(void *user_data, int *error)
{
  struct completion *c = user_data;
  struct node *n = c->node;
  if (*error) {
    fprintf(stderr, "nbdstorm: node %u: request %zu (%c %" PRIu64 "+%u) failed: %s\n", n->index,
            n->slot_of[c->slot], "RWFTZ"[trace[n->slot_of[c->slot]].op],
            trace[n->slot_of[c->slot]].offset, trace[n->slot_of[c->slot]].length,
            strerror(*error));
    exit(1);
  }
  if (trace[n->slot_of[c->slot]].op == OP_FLUSH)
    n->flushing = false;
  n->slot_used[c->slot] = false;
  n->inflight--;
  if (++n->completed == ntrace)
    n->t_done = now_ns();
  free(c);
  return 1;
}

static bool issue(struct worker *w, struct node *n)
{
  const struct req *r = &trace[n->next];
  unsigned slot = 0;
  while (n->slot_used[slot])
    slot++;
  struct completion *c = malloc(sizeof *c);
  c->node = n;
  c->slot = slot;
  nbd_completion_callback cb = { .callback = completion_cb, .user_data = c, .free = NULL };
  uint32_t flags = r->fua ? LIBNBD_CMD_FLAG_FUA : 0;
  int64_t cookie = -1;
  switch (r->op) {
  case OP_READ:
    cookie = nbd_aio_pread(n->h, w->read_buf, r->length, r->offset, cb, 0);
    n->bytes_read += r->length;
    break;
  case OP_WRITE:
    cookie = nbd_aio_pwrite(n->h, write_buf, r->length, r->offset, cb, flags);
    n->bytes_written += r->length;
    break;
  case OP_FLUSH:
    cookie = nbd_aio_flush(n->h, cb, 0);
    n->flushing = true;
    n->flushes++;
    break;
  case OP_TRIM:
    cookie = nbd_aio_trim(n->h, r->length, r->offset, cb, flags);
    break;
  case OP_ZERO:
    cookie = nbd_aio_zero(n->h, r->length, r->offset, cb, flags);
    break;
  }
  if (cookie == -1) {
    free(c);
    worker_fail(w, n, "issuing a request");
    return false;
  }
  n->slot_of[slot] = n->next++;
  n->slot_used[slot] = true;
  n->inflight++;
  return true;
}

static void *worker_main(void *arg)
{
  struct worker *w = arg;
  struct pollfd *pfd = calloc(w->nnodes, sizeof *pfd);
  const uint64_t t_hard = t_start + (uint64_t)cfg.timeout * 1000000000ull;

  for (unsigned i = 0; i < w->nnodes; i++) {
    struct node *n = w->nodes[i];
    if (!start_connect(w, n)) {
      if (!w->fatal)
        worker_fail(w, n, "nbd_aio_connect_uri");
      goto out;
    }
  }
  for (;;) {
    if (now_ns() >= t_hard) {
      w->fatal = "timed out (server not answering?)";
      break;
    }
    unsigned busy = 0;
    for (unsigned i = 0; i < w->nnodes; i++) {
      struct node *n = w->nodes[i];
      if (!n->connected) {
        if (nbd_aio_is_ready(n->h)) {
          n->connected = true;
          n->t_connected = now_ns();
          int64_t size = nbd_get_size(n->h);
          if (size < 0 || (uint64_t)size < trace_end) {
            snprintf(w->fatal_msg, sizeof w->fatal_msg,
                     "node %u (%s): the export has %" PRId64 " bytes, the trace needs %" PRIu64,
                     n->index, n->uri, size, trace_end);
            w->fatal = w->fatal_msg;
            goto out;
          }
        } else if (nbd_aio_is_dead(n->h) || nbd_aio_is_closed(n->h)) {
          worker_fail(w, n, "connect");
          goto out;
        }
      }
      if (n->connected)
        while (n->next < ntrace && may_issue(n, n->next))
          if (!issue(w, n))
            goto out;
      if (n->completed < ntrace)
        busy++;
    }
    if (busy == 0)
      break;
    for (unsigned i = 0; i < w->nnodes; i++) {
      struct nbd_handle *h = w->nodes[i]->h;
      unsigned dir = nbd_aio_get_direction(h);
      pfd[i].fd = w->nodes[i]->completed < ntrace ? nbd_aio_get_fd(h) : -1;
      pfd[i].events = ((dir & LIBNBD_AIO_DIRECTION_READ) ? POLLIN : 0) |
                      ((dir & LIBNBD_AIO_DIRECTION_WRITE) ? POLLOUT : 0);
      pfd[i].revents = 0;
    }
    int r = poll(pfd, w->nnodes, 100);
    if (r == -1) {
      if (errno == EINTR)
        continue;
      snprintf(w->fatal_msg, sizeof w->fatal_msg, "poll: %s", strerror(errno));
      w->fatal = w->fatal_msg;
      break;
    }
    for (unsigned i = 0; i < w->nnodes && r > 0; i++) {
      struct node *n = w->nodes[i];
      short rev = pfd[i].revents;
      if (rev & POLLNVAL) {
        w->fatal = "poll: POLLNVAL";
        goto out;
      }
      if ((rev & (POLLIN | POLLHUP | POLLERR)) && nbd_aio_notify_read(n->h) == -1) {
        worker_fail(w, n, "connection lost");
        goto out;
      }
      if (!(rev & (POLLIN | POLLHUP | POLLERR)) && (rev & POLLOUT) &&
          nbd_aio_notify_write(n->h) == -1) {
        worker_fail(w, n, "connection lost");
        goto out;
      }
    }
  }
out:
  free(pfd);
  return NULL;
}

/* ------------------------------------------------------------------ */

static int cmp_u64(const void *a, const void *b)
{
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return x < y ? -1 : x > y;
}

/* Nearest-rank percentile of sorted v[0..n). */
static uint64_t percentile(const uint64_t *v, unsigned n, double p)
{
  unsigned rank = (unsigned)(p / 100.0 * n + 0.999999);
  if (rank < 1)
    rank = 1;
  if (rank > n)
    rank = n;
  return v[rank - 1];
}

/* ------------------------------------------------------------------ */
/* --files: the trace's mutations straight into files, no NBD          */

static bool files_failed;

/* A request that --files ends with an fdatasync: a FLUSH, or a FUA mutation. */
static bool file_syncs(const struct req *r)
{
  return cfg.flush && (r->op == OP_FLUSH || (r->fua && r->op != OP_READ));
}

enum { MAP_BLOCK = 4096, MAP_SLOT = 4096, MAP_STRIDE = 65536 };
static uint64_t map_writes; /* map slots written and synced, all nodes */

/* --maps: the node's bitmap file (both slots allocated when it is made, as
 * a view's are), and which blocks its diff already holds (from the diff's
 * data extents: a file left by an earlier run holds that run's blocks). */
static int open_map(const char *path, int diff_fd, uint8_t *held)
{
  const int mfd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (mfd < 0)
    return -1;
  struct stat st;
  if (fstat(mfd, &st) != 0 || (st.st_size == 0 && fallocate(mfd, 0, 0, 2 * MAP_STRIDE) != 0)) {
    close(mfd);
    return -1;
  }
  mark_data_blocks(diff_fd, trace_end, MAP_BLOCK, held);
  return mfd;
}

/* Marks the blocks of [off, off + len) held; true if one was not yet. */
static bool hold_blocks(uint8_t *held, uint64_t off, uint64_t len)
{
  bool grew = false;
  for (uint64_t b = off / MAP_BLOCK; b < (off + len + MAP_BLOCK - 1) / MAP_BLOCK; b++) {
    grew |= !held[b];
    held[b] = 1;
  }
  return grew;
}

static void *file_node_main(void *arg)
{
  const unsigned i = (unsigned)(uintptr_t)arg;
  char path[4096], map_path[4096];
  snprintf(path, sizeof path, "%s/node-%u.diff", cfg.files, i);
  snprintf(map_path, sizeof map_path, "%s/node-%u.bitmap", cfg.files, i);
  const int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  uint8_t *held = cfg.maps ? calloc(trace_end / MAP_BLOCK + 1, 1) : NULL;
  int mfd = -1;
  const char *failed = fd < 0 || ftruncate(fd, (off_t)trace_end) != 0 ? path
                       : cfg.maps && (!held || (mfd = open_map(map_path, fd, held)) < 0) ? map_path
                       : NULL;
  if (failed) {
    fprintf(stderr, "nbdstorm: %s: %s\n", failed, strerror(errno));
    __atomic_store_n(&files_failed, true, __ATOMIC_RELAXED);
    if (fd >= 0)
      close(fd);
    free(held);
    return NULL;
  }
  bool map_changed = false;
  uint64_t seq = 0, maps = 0;
  static const uint8_t slot[MAP_SLOT];
  for (size_t k = 0; k < ntrace; k++) {
    const struct req *r = &trace[k];
    int rc = 0;
    if (r->op == OP_WRITE)
      rc = pwrite(fd, write_buf, r->length, (off_t)r->offset) == (ssize_t)r->length ? 0 : -1;
    else if (r->op == OP_TRIM || r->op == OP_ZERO)
      rc = fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)r->offset,
                     (off_t)r->length);
    if (held && r->op != OP_READ && r->op != OP_FLUSH)
      map_changed |= hold_blocks(held, r->offset, r->length);
    const bool syncs = file_syncs(r);
    if (rc == 0 && syncs)
      rc = fdatasync(fd);
    if (rc == 0 && syncs && map_changed) {
      /* The map only after the data it names is durable, as a view's flush. */
      rc = pwrite(mfd, slot, sizeof slot, (off_t)(seq++ % 2 * MAP_STRIDE)) == sizeof slot
               ? fdatasync(mfd) : -1;
      map_changed = false;
      maps++;
    }
    if (rc != 0) {
      fprintf(stderr, "nbdstorm: %s: request %zu: %s\n", path, k, strerror(errno));
      __atomic_store_n(&files_failed, true, __ATOMIC_RELAXED);
      break;
    }
  }
  __atomic_add_fetch(&map_writes, maps, __ATOMIC_RELAXED);
  close(fd);
  if (mfd >= 0)
    close(mfd);
  free(held);
  return NULL;
}

static int run_files(void)
{
  pthread_t *tids = calloc(cfg.nodes, sizeof *tids);
  uint64_t writes = 0, bytes = 0, flushes = 0;
  for (size_t k = 0; k < ntrace; k++) {
    writes += trace[k].op == OP_WRITE;
    bytes += trace[k].op == OP_WRITE ? trace[k].length : 0;
    flushes += file_syncs(&trace[k]);
  }
  const uint64_t t0 = now_ns();
  for (unsigned i = 0; i < cfg.nodes; i++)
    if (pthread_create(&tids[i], NULL, file_node_main, (void *)(uintptr_t)i) != 0)
      die("pthread_create failed");
  for (unsigned i = 0; i < cfg.nodes; i++)
    pthread_join(tids[i], NULL);
  const uint64_t t1 = now_ns();
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  printf("{\"nodes\": %u, \"flush\": %s, \"wall_s\": %.4f, \"cpu_s\": %.3f, "
         "\"user_s\": %.3f, \"sys_s\": %.3f, \"writes\": %" PRIu64 ", \"bytes\": %" PRIu64
         ", \"flushes\": %" PRIu64 ", \"map_writes\": %" PRIu64 "}\n",
         cfg.nodes, cfg.flush ? "true" : "false", (t1 - t0) / 1e9,
         ru.ru_utime.tv_sec + ru.ru_stime.tv_sec + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6,
         ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6, ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6,
         writes * cfg.nodes, bytes * cfg.nodes, flushes * cfg.nodes, map_writes);
  free(tids);
  return files_failed ? 1 : 0;
}

static void usage(FILE *f)
{
  fputs("Usage: nbdstorm --trace FILE --uri URI [options]\n"
        "Replays a request trace for N nodes at once, each on its own connection.\n"
        "  --trace FILE      the trace (text or gzip'd: T_MS OP OFFSET LENGTH [fua])\n"
        "  --uri URI         NBD URI; every \"%d\" in it becomes the node's number (0..N-1);\n"
        "                    nbd+unix:///EXPORT?socket=PATH for a Unix socket; over TLS\n"
        "                    nbds://node-%d@HOST:PORT/EXPORT?tls-psk-file=FILE\n"
        "  --netns NS        connect node %d from network namespace NS (a path, or a name\n"
        "                    under /run/netns; \"%d\" becomes the node's number)\n"
        "  --nodes N         nodes (default 1)\n"
        "  --qd N            requests in flight per node (default 4, at most 64)\n"
        "  --threads N       client threads; nodes are dealt round-robin (default 1)\n"
        "  --timeout S       give up after S seconds (default 600)\n"
        "  --per-node FILE   write \"node connect_s done_s\" lines to FILE\n"
        "Or, with no NBD: nbdstorm --trace FILE --files DIR [--nodes N] [--no-flush] [--maps]\n"
        "  --files DIR       node N's writes and flushes go to DIR/node-N.diff\n"
        "                    (pwrite, fdatasync), one thread per node; reads are skipped\n"
        "  --no-flush        with --files: leave the fdatasyncs out\n"
        "  --maps            with --files: at a flush (or FUA) after writes to new blocks, also\n"
        "                    write a 4 KiB map slot to DIR/node-N.bitmap and fdatasync it\n",
        f);
}

int main(int argc, char **argv)
{
  static const struct option longopts[] = {
    { "trace", required_argument, 0, 't' },    { "uri", required_argument, 0, 'u' },
    { "nodes", required_argument, 0, 'n' },    { "qd", required_argument, 0, 'q' },
    { "threads", required_argument, 0, 'j' },  { "timeout", required_argument, 0, 'T' },
    { "per-node", required_argument, 0, 'p' }, { "netns", required_argument, 0, 'N' },
    { "files", required_argument, 0, 'F' },    { "no-flush", no_argument, 0, 'X' },
    { "maps", no_argument, 0, 'M' },           { "help", no_argument, 0, 'h' },
    { 0, 0, 0, 0 },
  };
  int c;
  while ((c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
    switch (c) {
    case 't': cfg.trace = optarg; break;
    case 'u': cfg.uri = optarg; break;
    case 'n': cfg.nodes = (unsigned)atoi(optarg); break;
    case 'q': cfg.qd = (unsigned)atoi(optarg); break;
    case 'j': cfg.threads = (unsigned)atoi(optarg); break;
    case 'T': cfg.timeout = (unsigned)atoi(optarg); break;
    case 'p': cfg.per_node = optarg; break;
    case 'N': cfg.netns = optarg; break;
    case 'F': cfg.files = optarg; break;
    case 'X': cfg.flush = false; break;
    case 'M': cfg.maps = true; break;
    case 'h': usage(stdout); return 0;
    default: usage(stderr); return 2;
    }
  }
  if (!cfg.trace || !cfg.uri == !cfg.files || optind != argc || ((!cfg.flush || cfg.maps) && !cfg.files)) {
    usage(stderr);
    return 2;
  }
  if (cfg.nodes < 1 || cfg.qd < 1 || cfg.qd > 64 || cfg.threads < 1 || cfg.timeout < 1)
    die("--nodes, --threads and --timeout must be at least 1, --qd from 1 to 64");
  if (cfg.threads > cfg.nodes)
    cfg.threads = cfg.nodes;
  load_trace(cfg.trace);

  write_buf = malloc(max_length ? max_length : 1);
  uint64_t seed = 0x5eed;
  for (uint32_t i = 0; i < max_length; i++) {
    seed = seed * 6364136223846793005ull + 1442695040888963407ull;
    write_buf[i] = (uint8_t)(seed >> 56);
  }
  if (cfg.files)
    return run_files();

  struct node *nodes = calloc(cfg.nodes, sizeof *nodes);
  for (unsigned i = 0; i < cfg.nodes; i++) {
    struct node *n = &nodes[i];
    n->index = i;
    format_index(n->uri, sizeof n->uri, cfg.uri, i);
    n->h = nbd_create();
    if (!n->h)
      die("nbd_create: %s", nbd_get_error());
    nbd_set_pread_initialize(n->h, false);
    /* The URI is ours to trust: let nbds:// URIs name a tls-psk-file. */
    if (nbd_set_uri_allow_local_file(n->h, true) == -1)
      die("nbd_set_uri_allow_local_file: %s", nbd_get_error());
  }

  struct worker *workers = calloc(cfg.threads, sizeof *workers);
  for (unsigned t = 0; t < cfg.threads; t++) {
    workers[t].nodes = calloc(cfg.nodes, sizeof(struct node *));
    workers[t].read_buf = malloc(max_length ? max_length : 1);
  }
  for (unsigned i = 0; i < cfg.nodes; i++) {
    struct worker *w = &workers[i % cfg.threads];
    w->nodes[w->nnodes++] = &nodes[i];
  }

  if (cfg.netns) {
    home_netns = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
    if (home_netns == -1)
      die("/proc/thread-self/ns/net: %s", strerror(errno));
  }

  signal(SIGALRM, watchdog_alarm);
  alarm(cfg.timeout + 30);
  t_start = now_ns();
  for (unsigned t = 0; t < cfg.threads; t++)
    if (pthread_create(&workers[t].tid, NULL, worker_main, &workers[t]) != 0)
      die("pthread_create failed");
  for (unsigned t = 0; t < cfg.threads; t++)
    pthread_join(workers[t].tid, NULL);
  const uint64_t t_end = now_ns();
  for (unsigned t = 0; t < cfg.threads; t++)
    if (workers[t].fatal)
      die("%s", workers[t].fatal);

  for (unsigned i = 0; i < cfg.nodes; i++) {
    nbd_shutdown(nodes[i].h, 0);
    nbd_close(nodes[i].h);
  }

  uint64_t *done = malloc(cfg.nodes * sizeof *done);
  uint64_t *conn = malloc(cfg.nodes * sizeof *conn);
  uint64_t bytes_r = 0, bytes_w = 0, flushes = 0;
  for (unsigned i = 0; i < cfg.nodes; i++) {
    done[i] = nodes[i].t_done - t_start;
    conn[i] = nodes[i].t_connected - t_start;
    bytes_r += nodes[i].bytes_read;
    bytes_w += nodes[i].bytes_written;
    flushes += nodes[i].flushes;
  }
  if (cfg.per_node) {
    FILE *f = fopen(cfg.per_node, "w");
    if (!f)
      die("%s: %s", cfg.per_node, strerror(errno));
    for (unsigned i = 0; i < cfg.nodes; i++)
      fprintf(f, "%u %.6f %.6f\n", i, conn[i] / 1e9, done[i] / 1e9);
    fclose(f);
  }
  qsort(done, cfg.nodes, sizeof *done, cmp_u64);
  qsort(conn, cfg.nodes, sizeof *conn, cmp_u64);

  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  double cpu = ru.ru_utime.tv_sec + ru.ru_stime.tv_sec +
               (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
  printf("{\"nodes\": %u, \"qd\": %u, \"requests_per_node\": %zu, \"wall_s\": %.4f, "
         "\"p50_s\": %.4f, \"p99_s\": %.4f, \"min_s\": %.4f, \"max_s\": %.4f, "
         "\"connect_p50_s\": %.4f, \"connect_max_s\": %.4f, \"run_s\": %.4f, "
         "\"bytes_read\": %" PRIu64 ", \"bytes_written\": %" PRIu64 ", \"flushes\": %" PRIu64
         ", \"client_cpu_s\": %.3f}\n",
         cfg.nodes, cfg.qd, ntrace, done[cfg.nodes - 1] / 1e9,
         percentile(done, cfg.nodes, 50) / 1e9, percentile(done, cfg.nodes, 99) / 1e9,
         done[0] / 1e9, done[cfg.nodes - 1] / 1e9, percentile(conn, cfg.nodes, 50) / 1e9,
         conn[cfg.nodes - 1] / 1e9, (t_end - t_start) / 1e9, bytes_r, bytes_w, flushes, cpu);
  return 0;
}
