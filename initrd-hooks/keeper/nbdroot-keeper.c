// nbdroot-keeper: keeps a node's /dev/nbdN alive across nbdserver restarts.
//
// nbd-client (netlink mode) attaches the root and exits; the kernel then
// owns the socket. When that socket dies (the server restarts, or the
// network drops), the kernel by itself fails every request at once. This
// small resident daemon, started by the node script right after the attach:
//
//   1. tells the kernel (NBD_CMD_RECONFIGURE) to hold I/O while no
//      connection is live (NBD_ATTR_DEAD_CONN_TIMEOUT) and to re-send a
//      request that stays unanswered for --timeout seconds on the next
//      connection (NBD_ATTR_TIMEOUT);
//   2. listens for the kernel's NBD_CMD_LINK_DEAD events;
//   3. on one, connects to the servers in turn, redoes the handshake for
//      the same export with the "resume" option (so that an ephemeral node
//      keeps its changes), checks that the size is unchanged, and hands the
//      new socket to the kernel (NBD_CMD_RECONFIGURE with NBD_ATTR_SOCKETS).
//
// It marks itself for systemd as a root storage daemon (argv[0] starts with
// '@') so that the shutdown killing spree spares it, opens every file it
// needs before it detaches (it outlives the initramfs), and logs to
// /dev/kmsg, so its lines are on the console and in dmesg.
//
// --probe only connects and negotiates, and prints what the server offers:
// the handshake, tested without a kernel.
//
// Plain C on raw generic netlink (no libnl), linked statically, so that it
// runs in any tree's initrd.
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/genetlink.h>
#include <linux/nbd-netlink.h>
#include <linux/netlink.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <time.h>
#include <unistd.h>

#define NBD_DEFAULT_PORT "10809"
#define MAX_SERVERS 16

// Wire constants of the NBD handshake (NetworkBlockDevice/nbd doc/proto.md).
#define NBDMAGIC 0x4e42444d41474943ULL
#define IHAVEOPT 0x49484156454f5054ULL
#define OLDSTYLE_MAGIC 0x0000420281861253ULL
#define REPLY_MAGIC 0x0003e889045565a9ULL
#define FLAG_FIXED_NEWSTYLE 1u
#define FLAG_NO_ZEROES 2u
#define OPT_GO 7u
#define REP_ACK 1u
#define REP_INFO 3u
#define REP_ERR_BIT 0x80000000u
#define INFO_EXPORT 0u
#define TFLAG_READ_ONLY 2u

struct server {
  char text[128];  // as given, for messages
  struct sockaddr_storage addr;
  socklen_t len;
};

static struct {
  const char* device;
  const char* export_name;
  char resume_name[4200];
  struct server servers[MAX_SERVERS];
  int nservers;
  unsigned timeout, dead_timeout;
  int foreground, probe;
  int detached;     // stderr is /dev/null now
  int index;        // nbd device index
  uint64_t size;    // the device's size in bytes
  char backend[256];
  int kmsg;         // /dev/kmsg, or -1
} g = {.device = "/dev/nbd0", .timeout = 15, .dead_timeout = 600, .kmsg = -1};

static void logmsg(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
static void logmsg(const char* fmt, ...) {
  char line[1024];
  va_list ap;
  va_start(ap, fmt);
  int n = snprintf(line, sizeof line, "<5>nbdroot-keeper: ");
  vsnprintf(line + n, sizeof line - (size_t)n, fmt, ap);
  va_end(ap);
  size_t len = strlen(line);
  if (g.kmsg >= 0 && write(g.kmsg, line, len) < 0) {
  }
  // stderr: without the kmsg level prefix, with a newline.
  if (!g.detached) dprintf(2, "%s\n", line + 3);
}

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

// ------------------------------------------------------------ servers

// HOST[:PORT] or [V6][:PORT]; numeric addresses only: after switch_root
// there is no resolver to ask (and a static binary has no NSS).
static int parse_server(const char* text, struct server* s, char* err, size_t errlen) {
  char host[128], port[16] = NBD_DEFAULT_PORT;
  if (strlen(text) >= sizeof host) {
    snprintf(err, errlen, "'%s': too long", text);
    return -1;
  }
  snprintf(s->text, sizeof s->text, "%s", text);
  if (text[0] == '[') {
    const char* end = strchr(text, ']');
    if (!end) {
      snprintf(err, errlen, "'%s': no closing ']'", text);
      return -1;
    }
    snprintf(host, sizeof host, "%.*s", (int)(end - text - 1), text + 1);
    if (end[1] == ':') snprintf(port, sizeof port, "%s", end + 2);
    else if (end[1]) {
      snprintf(err, errlen, "'%s': junk after ']'", text);
      return -1;
    }
  } else {
    const char* colon = strrchr(text, ':');
    if (colon && strchr(text, ':') != colon) colon = NULL;  // a bare IPv6 address
    if (colon) {
      snprintf(host, sizeof host, "%.*s", (int)(colon - text), text);
      snprintf(port, sizeof port, "%s", colon + 1);
    } else {
      snprintf(host, sizeof host, "%s", text);
    }
  }
  char* endp;
  errno = 0;
  unsigned long p = strtoul(port, &endp, 10);
  if (errno || *endp || !*port || p == 0 || p > 65535) {
    snprintf(err, errlen, "'%s': bad port '%s'", text, port);
    return -1;
  }
  memset(&s->addr, 0, sizeof s->addr);
  struct sockaddr_in* v4 = (struct sockaddr_in*)&s->addr;
  struct sockaddr_in6* v6 = (struct sockaddr_in6*)&s->addr;
  if (inet_pton(AF_INET, host, &v4->sin_addr) == 1) {
    v4->sin_family = AF_INET;
    v4->sin_port = htons((uint16_t)p);
    s->len = sizeof *v4;
  } else if (inet_pton(AF_INET6, host, &v6->sin6_addr) == 1) {
    v6->sin6_family = AF_INET6;
    v6->sin6_port = htons((uint16_t)p);
    s->len = sizeof *v6;
  } else {
    snprintf(err, errlen, "'%s': '%s' is not a numeric IPv4 or IPv6 address", text, host);
    return -1;
  }
  return 0;
}

// ------------------------------------------------------------ handshake

// Reads or writes exactly `len` bytes (the socket has SO_RCVTIMEO/SNDTIMEO).
static int io_full(int fd, void* buf, size_t len, int writing) {
  uint8_t* p = buf;
  while (len) {
    ssize_t n = writing ? send(fd, p, len, MSG_NOSIGNAL) : recv(fd, p, len, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return -1;
    if (n == 0) {
      errno = ECONNRESET;
      return -1;
    }
    p += n;
    len -= (size_t)n;
  }
  return 0;
}

static uint64_t be64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v = v << 8 | p[i];
  return v;
}
static uint32_t be32(const uint8_t* p) {
  return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static uint8_t* put64(uint8_t* p, uint64_t v) {
  for (int i = 7; i >= 0; --i) *p++ = (uint8_t)(v >> (8 * i));
  return p;
}
static uint8_t* put32(uint8_t* p, uint32_t v) {
  for (int i = 3; i >= 0; --i) *p++ = (uint8_t)(v >> (8 * i));
  return p;
}

static const char* rep_err_name(uint32_t t) {
  switch (t) {
    case 0x80000001: return "NBD_REP_ERR_UNSUP";
    case 0x80000002: return "NBD_REP_ERR_POLICY";
    case 0x80000003: return "NBD_REP_ERR_INVALID";
    case 0x80000004: return "NBD_REP_ERR_PLATFORM";
    case 0x80000005: return "NBD_REP_ERR_TLS_REQD";
    case 0x80000006: return "NBD_REP_ERR_UNKNOWN";
    case 0x80000007: return "NBD_REP_ERR_SHUTDOWN";
    case 0x80000008: return "NBD_REP_ERR_BLOCK_SIZE_REQD";
    case 0x80000009: return "NBD_REP_ERR_TOO_BIG";
    default: return "an error";
  }
}

// Fixed newstyle negotiation with NBD_OPT_GO for `name`; no structured
// replies (the kernel takes simple replies only). Sets *size and *tflags.
static int handshake(int fd, const char* name, uint64_t* size, uint16_t* tflags, char* err,
                     size_t errlen) {
#define FAIL(...) do { snprintf(err, errlen, __VA_ARGS__); return -1; } while (0)
  uint8_t b[20];
  if (io_full(fd, b, 18, 0)) FAIL("no greeting: %s", strerror(errno));
  if (be64(b) != NBDMAGIC) FAIL("not an NBD server (bad greeting magic)");
  if (be64(b + 8) == OLDSTYLE_MAGIC) FAIL("oldstyle NBD server: no export names");
  if (be64(b + 8) != IHAVEOPT) FAIL("bad greeting (not newstyle)");
  uint16_t hflags = (uint16_t)(b[16] << 8 | b[17]);
  if (!(hflags & FLAG_FIXED_NEWSTYLE)) FAIL("the server does not do fixed newstyle negotiation");
  uint32_t cflags = FLAG_FIXED_NEWSTYLE | (hflags & FLAG_NO_ZEROES);
  put32(b, cflags);
  if (io_full(fd, b, 4, 1)) FAIL("sending client flags: %s", strerror(errno));

  size_t nlen = strlen(name);
  uint8_t opt[16 + 4 + 4096 + 2];
  if (nlen > 4096) FAIL("export name longer than 4096 bytes");
  uint8_t* p = put64(opt, IHAVEOPT);
  p = put32(p, OPT_GO);
  p = put32(p, (uint32_t)(4 + nlen + 2));
  p = put32(p, (uint32_t)nlen);
  memcpy(p, name, nlen);
  p += nlen;
  *p++ = 0;
  *p++ = 0;  // no information requests: NBD_INFO_EXPORT always comes
  if (io_full(fd, opt, (size_t)(p - opt), 1)) FAIL("sending NBD_OPT_GO: %s", strerror(errno));

  int have_export = 0;
  for (int replies = 0; replies < 64; ++replies) {
    if (io_full(fd, b, 20, 0)) FAIL("no reply to NBD_OPT_GO: %s", strerror(errno));
    if (be64(b) != REPLY_MAGIC) FAIL("bad option reply magic");
    uint32_t o = be32(b + 8), type = be32(b + 12), len = be32(b + 16);
    if (o != OPT_GO) FAIL("reply for option %u, not NBD_OPT_GO", o);
    if (len > 65536) FAIL("option reply of %u bytes", len);
    static uint8_t data[65537];
    if (len && io_full(fd, data, len, 0)) FAIL("short option reply: %s", strerror(errno));
    data[len] = 0;
    if (type & REP_ERR_BIT) {
      for (uint32_t i = 0; i < len; ++i)
        if (data[i] < 0x20 || data[i] == 0x7f) data[i] = '?';
      FAIL("the server refused export '%s' (%s)%s%s", name, rep_err_name(type), len ? ": " : "",
           len ? (char*)data : "");
    }
    if (type == REP_INFO && len >= 12 && data[0] == 0 && data[1] == INFO_EXPORT) {
      *size = be64(data + 2);
      *tflags = (uint16_t)(data[10] << 8 | data[11]);
      have_export = 1;
    } else if (type == REP_ACK) {
      if (!have_export) FAIL("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT");
      return 0;
    }
  }
  FAIL("too many option replies");
#undef FAIL
}

// Connects (5 s) and negotiates (10 s); returns the socket, ready for the
// kernel, or -1 with *err set.
static int open_export(const struct server* s, const char* name, uint64_t* size,
                       uint16_t* tflags, char* err, size_t errlen) {
  int fd = socket(s->addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) {
    snprintf(err, errlen, "socket: %s", strerror(errno));
    return -1;
  }
  if (connect(fd, (const struct sockaddr*)&s->addr, s->len) < 0 && errno != EINPROGRESS) {
    snprintf(err, errlen, "connect: %s", strerror(errno));
    close(fd);
    return -1;
  }
  struct pollfd pfd = {.fd = fd, .events = POLLOUT};
  int soerr = 0;
  socklen_t sl = sizeof soerr;
  int r = poll(&pfd, 1, 5000);
  if (r == 0) {
    snprintf(err, errlen, "connect: no answer within 5 s");
    close(fd);
    return -1;
  }
  if (r < 0 || getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) < 0 || soerr) {
    snprintf(err, errlen, "connect: %s", strerror(soerr ? soerr : errno));
    close(fd);
    return -1;
  }
  fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
  struct timeval tv = {.tv_sec = 10};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  if (handshake(fd, name, size, tflags, err, errlen) < 0) {
    close(fd);
    return -1;
  }
  // The kernel's receive thread blocks on this socket: no timeouts on it.
  struct timeval zero = {0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &zero, sizeof zero);
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &zero, sizeof zero);
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  return fd;
}

// ------------------------------------------------------------ netlink

struct nlmsg {
  struct nlmsghdr n;
  struct genlmsghdr g;
  uint8_t buf[1024];
};

static void nl_init(struct nlmsg* m, uint16_t family, uint8_t cmd, int ack) {
  memset(m, 0, sizeof *m);
  m->n.nlmsg_len = NLMSG_LENGTH(GENL_HDRLEN);
  m->n.nlmsg_type = family;
  m->n.nlmsg_flags = NLM_F_REQUEST | (ack ? NLM_F_ACK : 0);
  m->g.cmd = cmd;
  m->g.version = family == GENL_ID_CTRL ? 1 : NBD_GENL_VERSION;
}

static struct nlattr* nl_put(struct nlmsg* m, uint16_t type, const void* data, size_t len) {
  struct nlattr* a = (struct nlattr*)((uint8_t*)m + NLMSG_ALIGN(m->n.nlmsg_len));
  a->nla_type = type;
  a->nla_len = (uint16_t)(NLA_HDRLEN + len);
  if (len) memcpy((uint8_t*)a + NLA_HDRLEN, data, len);
  m->n.nlmsg_len = NLMSG_ALIGN(m->n.nlmsg_len) + NLA_ALIGN(a->nla_len);
  return a;
}
static void nl_put_u32(struct nlmsg* m, uint16_t type, uint32_t v) { nl_put(m, type, &v, 4); }
static void nl_put_u64(struct nlmsg* m, uint16_t type, uint64_t v) { nl_put(m, type, &v, 8); }
static void nl_end(struct nlmsg* m, struct nlattr* nest) {
  nest->nla_len = (uint16_t)((uint8_t*)m + m->n.nlmsg_len - (uint8_t*)nest);
}

// Iterates the attributes in [p, p + len).
#define FOR_ATTRS(a, p, len)                                                         \
  for (struct nlattr* a = (struct nlattr*)(p); (uint8_t*)a + NLA_HDRLEN <= (uint8_t*)(p) + (len) && \
       a->nla_len >= NLA_HDRLEN && (uint8_t*)a + a->nla_len <= (uint8_t*)(p) + (len);              \
       a = (struct nlattr*)((uint8_t*)a + NLA_ALIGN(a->nla_len)))
#define ATTR_DATA(a) ((uint8_t*)(a) + NLA_HDRLEN)
#define ATTR_LEN(a) ((a)->nla_len - NLA_HDRLEN)

static int nl_open(void) {
  int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_GENERIC);
  if (fd < 0) return -1;
  struct sockaddr_nl sa = {.nl_family = AF_NETLINK};
  if (bind(fd, (struct sockaddr*)&sa, sizeof sa) < 0) {
    close(fd);
    return -1;
  }
  return fd;
}

static uint32_t nl_seq;

// Sends `m` and waits for its reply: the kernel's error code (0 = done),
// with the first non-error reply copied into `reply` if given.
static int nl_call(int fd, struct nlmsg* m, uint8_t* reply, size_t reply_len) {
  m->n.nlmsg_seq = ++nl_seq;
  if (send(fd, m, m->n.nlmsg_len, 0) < 0) return -errno;
  static uint8_t buf[16384];
  for (;;) {
    ssize_t n = recv(fd, buf, sizeof buf, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return -errno;
    for (struct nlmsghdr* h = (struct nlmsghdr*)buf; NLMSG_OK(h, (unsigned)n);
         h = NLMSG_NEXT(h, n)) {
      if (h->nlmsg_seq != m->n.nlmsg_seq) continue;
      if (h->nlmsg_type == NLMSG_ERROR) {
        struct nlmsgerr* e = NLMSG_DATA(h);
        return e->error;
      }
      if (reply) {
        size_t len = h->nlmsg_len < reply_len ? h->nlmsg_len : reply_len;
        memcpy(reply, h, len);
        reply = NULL;  // the ack follows
      }
    }
  }
}

// The "nbd" generic netlink family and its multicast group.
static int nbd_family(int fd, uint16_t* family, uint32_t* group) {
  struct nlmsg m;
  nl_init(&m, GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1);
  nl_put(&m, CTRL_ATTR_FAMILY_NAME, NBD_GENL_FAMILY_NAME, sizeof NBD_GENL_FAMILY_NAME);
  static uint8_t reply[8192];
  memset(reply, 0, sizeof reply);
  int r = nl_call(fd, &m, reply, sizeof reply);
  if (r < 0) return r;
  struct nlmsghdr* h = (struct nlmsghdr*)reply;
  if (h->nlmsg_len < NLMSG_LENGTH(GENL_HDRLEN)) return -ENOENT;
  uint8_t* attrs = (uint8_t*)NLMSG_DATA(h) + GENL_HDRLEN;
  size_t len = h->nlmsg_len - NLMSG_LENGTH(GENL_HDRLEN);
  *family = 0;
  *group = 0;
  FOR_ATTRS(a, attrs, len) {
    if (a->nla_type == CTRL_ATTR_FAMILY_ID && ATTR_LEN(a) >= 2)
      memcpy(family, ATTR_DATA(a), 2);
    if (a->nla_type == CTRL_ATTR_MCAST_GROUPS) {
      FOR_ATTRS(grp, ATTR_DATA(a), ATTR_LEN(a)) {
        uint32_t id = 0;
        const char* gname = NULL;
        FOR_ATTRS(f, ATTR_DATA(grp), ATTR_LEN(grp)) {
          if (f->nla_type == CTRL_ATTR_MCAST_GRP_ID && ATTR_LEN(f) >= 4)
            memcpy(&id, ATTR_DATA(f), 4);
          if (f->nla_type == CTRL_ATTR_MCAST_GRP_NAME) gname = (const char*)ATTR_DATA(f);
        }
        if (gname && strcmp(gname, NBD_GENL_MCAST_GROUP_NAME) == 0) *group = id;
      }
    }
  }
  return *family && *group ? 0 : -ENOENT;
}

static uint16_t nbd_fam;

// NBD_CMD_RECONFIGURE of our device: timeouts, and a new socket if sock >= 0.
static int reconfigure(int nl, int sock) {
  struct nlmsg m;
  nl_init(&m, nbd_fam, NBD_CMD_RECONFIGURE, 1);
  nl_put_u32(&m, NBD_ATTR_INDEX, (uint32_t)g.index);
  if (g.backend[0]) nl_put(&m, NBD_ATTR_BACKEND_IDENTIFIER, g.backend, strlen(g.backend) + 1);
  if (sock < 0) {
    nl_put_u64(&m, NBD_ATTR_TIMEOUT, g.timeout);
    nl_put_u64(&m, NBD_ATTR_DEAD_CONN_TIMEOUT, g.dead_timeout);
  } else {
    struct nlattr* socks = nl_put(&m, NBD_ATTR_SOCKETS, NULL, 0);
    struct nlattr* item = nl_put(&m, NBD_SOCK_ITEM, NULL, 0);
    nl_put_u32(&m, NBD_SOCK_FD, (uint32_t)sock);
    nl_end(&m, item);
    nl_end(&m, socks);
  }
  return nl_call(nl, &m, NULL, 0);
}

// ------------------------------------------------------------ the device

static int read_sys(const char* what, char* out, size_t len) {
  char path[128];
  snprintf(path, sizeof path, "/sys/block/nbd%d/%s", g.index, what);
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return -1;
  ssize_t n = read(fd, out, len - 1);
  close(fd);
  if (n < 0) return -1;
  out[n] = 0;
  while (n > 0 && (out[n - 1] == '\n' || out[n - 1] == ' ')) out[--n] = 0;
  return 0;
}

static int open_device(char* err, size_t errlen) {
  struct stat st;
  if (stat(g.device, &st) < 0) {
    snprintf(err, errlen, "%s: %s", g.device, strerror(errno));
    return -1;
  }
  if (!S_ISBLK(st.st_mode) || major(st.st_rdev) != 43) {
    snprintf(err, errlen, "%s is not an NBD device", g.device);
    return -1;
  }
  const char* base = strrchr(g.device, '/');
  base = base ? base + 1 : g.device;
  if (sscanf(base, "nbd%d", &g.index) != 1) {
    snprintf(err, errlen, "%s: cannot tell its index from the name", g.device);
    return -1;
  }
  char buf[256];
  if (read_sys("size", buf, sizeof buf) < 0) {
    snprintf(err, errlen, "/sys/block/nbd%d/size: %s", g.index, strerror(errno));
    return -1;
  }
  g.size = strtoull(buf, NULL, 10) * 512;
  if (g.size == 0) {
    snprintf(err, errlen, "%s is not connected (size 0); attach it with nbd-client first", g.device);
    return -1;
  }
  if (read_sys("backend", g.backend, sizeof g.backend) < 0) g.backend[0] = 0;
  return 0;
}

// ------------------------------------------------------------ main

static void sleep_s(double s) {
  struct timespec ts = {.tv_sec = (time_t)s, .tv_nsec = (long)((s - (double)(time_t)s) * 1e9)};
  while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
  }
}

// Connects to the servers in turn until one takes the export back and the
// kernel takes the socket. Tries the last good server first.
static void reconnect(int nl) {
  static int last_good = 0;
  const double t0 = now();
  double delay = 0.5;
  logmsg("the connection to the server is gone; reconnecting (I/O waits up to %u s)",
         g.dead_timeout);
  for (unsigned attempt = 1;; ++attempt) {
    for (int k = 0; k < g.nservers; ++k) {
      int i = (last_good + k) % g.nservers;
      const struct server* s = &g.servers[i];
      char err[600];
      uint64_t size = 0;
      uint16_t tflags = 0;
      int fd = open_export(s, g.resume_name, &size, &tflags, err, sizeof err);
      if (fd >= 0 && size >> 9 << 9 != g.size) {
        snprintf(err, sizeof err, "export '%s' is now %llu bytes, not %llu; refusing it",
                 g.resume_name, (unsigned long long)size, (unsigned long long)g.size);
        close(fd);
        fd = -1;
      }
      if (fd >= 0) {
        int r = reconfigure(nl, fd);
        close(fd);  // the kernel holds its own reference now
        if (r == 0) {
          last_good = i;
          logmsg("reconnected to %s after %.1f s (attempt %u)", s->text, now() - t0, attempt);
          return;
        }
        snprintf(err, sizeof err, "the kernel refused the new socket: %s", strerror(-r));
      }
      // One line per server for the first attempts, then every 10th.
      if (attempt <= 3 || attempt % 10 == 0)
        logmsg("%s: %s (attempt %u, %.0f s)", s->text, err, attempt, now() - t0);
    }
    sleep_s(delay);
    delay = delay * 2 > 5 ? 5 : delay * 2;
  }
}

static void usage(FILE* f) {
  fprintf(f,
          "usage: nbdroot-keeper [options] --export NAME SERVER[:PORT]...\n"
          "       nbdroot-keeper --probe --export NAME SERVER[:PORT]...\n"
          "Keeps DEVICE (attached by nbd-client in netlink mode) alive across server\n"
          "restarts: reconnects to the first SERVER that takes NAME?resume back.\n"
          "SERVER is a numeric IPv4 or [IPv6] address; PORT defaults to 10809.\n"
          "  --device DEV        the NBD device (default /dev/nbd0)\n"
          "  --timeout S         re-send a request unanswered for S s on a new\n"
          "                      connection (default 15)\n"
          "  --dead-timeout S    hold I/O up to S s while no server answers, then\n"
          "                      fail it (default 600)\n"
          "  --foreground        do not detach; log to stderr too\n"
          "  --probe             only connect, negotiate and print what the first\n"
          "                      server that answers offers; exit 1 if none does\n");
}

static int parse_uint(const char* s, unsigned* out) {
  char* end;
  errno = 0;
  unsigned long v = strtoul(s, &end, 10);
  if (errno || *end || !*s || v > 86400 * 365) return -1;
  *out = (unsigned)v;
  return 0;
}

int main(int argc, char** argv) {
  signal(SIGPIPE, SIG_IGN);
  signal(SIGHUP, SIG_IGN);
  int bad_servers = 0;
  for (int i = 1; i < argc; ++i) {
    const char* a = argv[i];
    const char* v = i + 1 < argc ? argv[i + 1] : NULL;
    char err[300];
    if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
      usage(stdout);
      return 0;
    } else if (!strcmp(a, "--foreground")) {
      g.foreground = 1;
    } else if (!strcmp(a, "--probe")) {
      g.probe = 1;
    } else if (!strcmp(a, "--device") && v) {
      g.device = v;
      ++i;
    } else if (!strcmp(a, "--export") && v) {
      g.export_name = v;
      ++i;
    } else if ((!strcmp(a, "--timeout") || !strcmp(a, "--dead-timeout")) && v) {
      unsigned* t = !strcmp(a, "--timeout") ? &g.timeout : &g.dead_timeout;
      if (parse_uint(v, t) < 0 || *t == 0) {
        fprintf(stderr, "nbdroot-keeper: %s '%s': expected seconds, at least 1\n", a, v);
        return 2;
      }
      ++i;
    } else if (a[0] == '-') {
      fprintf(stderr, "nbdroot-keeper: unknown option or missing value: %s\n", a);
      usage(stderr);
      return 2;
    } else {
      if (g.nservers == MAX_SERVERS) {
        fprintf(stderr, "nbdroot-keeper: more than %d servers\n", MAX_SERVERS);
        return 2;
      }
      // A server it cannot use is skipped, not fatal: the others may do.
      if (parse_server(a, &g.servers[g.nservers], err, sizeof err) < 0) {
        fprintf(stderr, "nbdroot-keeper: skipping server %s\n", err);
        ++bad_servers;
        continue;
      }
      ++g.nservers;
    }
  }
  if (!g.export_name || !g.nservers) {
    fprintf(stderr, "nbdroot-keeper: need --export NAME and at least one %sSERVER\n",
            bad_servers ? "usable " : "");
    usage(stderr);
    return 2;
  }
  snprintf(g.resume_name, sizeof g.resume_name, "%s%sresume", g.export_name,
           strchr(g.export_name, '?') ? "&" : "?");

  if (g.probe) {
    for (int i = 0; i < g.nservers; ++i) {
      char err[600];
      uint64_t size = 0;
      uint16_t tflags = 0;
      int fd = open_export(&g.servers[i], g.export_name, &size, &tflags, err, sizeof err);
      if (fd >= 0) {
        printf("%s: export '%s': %llu bytes, transmission flags 0x%04x%s\n", g.servers[i].text,
               g.export_name, (unsigned long long)size, tflags,
               tflags & TFLAG_READ_ONLY ? " (read-only)" : "");
        close(fd);
        return 0;
      }
      fprintf(stderr, "nbdroot-keeper: %s: %s\n", g.servers[i].text, err);
    }
    return 1;
  }

  g.kmsg = open("/dev/kmsg", O_WRONLY | O_CLOEXEC);
  char err[300];
  if (open_device(err, sizeof err) < 0) {
    logmsg("%s", err);
    return 1;
  }
  int nl = nl_open(), ev = nl_open();
  uint32_t group = 0;
  int r = nl < 0 || ev < 0 ? -errno : nbd_family(nl, &nbd_fam, &group);
  if (r < 0) {
    logmsg("no 'nbd' generic netlink family (is the nbd module loaded?): %s", strerror(-r));
    return 1;
  }
  if (setsockopt(ev, SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, &group, sizeof group) < 0) {
    logmsg("cannot listen to the nbd netlink events: %s", strerror(errno));
    return 1;
  }
  r = reconfigure(nl, -1);
  if (r < 0) {
    logmsg("NBD_CMD_RECONFIGURE of %s failed: %s (attached by nbd-client in netlink mode?)",
           g.device, strerror(-r));
    return 1;
  }
  logmsg("keeping %s (export %s, %llu bytes): re-sends after %u s, holds I/O up to %u s "
         "while reconnecting",
         g.device, g.export_name, (unsigned long long)g.size, g.timeout, g.dead_timeout);

  if (!g.foreground) {
    pid_t pid = fork();
    if (pid < 0) {
      logmsg("fork: %s", strerror(errno));
      return 1;
    }
    if (pid > 0) return 0;
    g.detached = 1;
    setsid();
    if (chdir("/") < 0) {
    }
    int null = open("/dev/null", O_RDWR);
    if (null >= 0) {
      dup2(null, 0);
      dup2(null, 1);
      dup2(null, 2);
      if (null > 2) close(null);
    }
  }
  // A root storage daemon for systemd: spared at shutdown
  // (https://systemd.io/ROOT_STORAGE_DAEMONS/).
  argv[0][0] = '@';

  static uint8_t buf[16384];
  for (;;) {
    ssize_t n = recv(ev, buf, sizeof buf, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == ENOBUFS) {
      // Events were lost: one may have been ours. A reconnect onto a live
      // device is harmless (the kernel finds no dead socket to replace).
      logmsg("netlink events were lost; checking the connection");
      reconnect(nl);
      continue;
    }
    if (n < 0) {
      logmsg("netlink: %s; exiting, reconnects are off", strerror(errno));
      return 1;
    }
    for (struct nlmsghdr* h = (struct nlmsghdr*)buf; NLMSG_OK(h, (unsigned)n);
         h = NLMSG_NEXT(h, n)) {
      if (h->nlmsg_type != nbd_fam || h->nlmsg_len < NLMSG_LENGTH(GENL_HDRLEN)) continue;
      struct genlmsghdr* gh = NLMSG_DATA(h);
      if (gh->cmd != NBD_CMD_LINK_DEAD) continue;
      uint8_t* attrs = (uint8_t*)gh + GENL_HDRLEN;
      size_t len = h->nlmsg_len - NLMSG_LENGTH(GENL_HDRLEN);
      int ours = 0;
      FOR_ATTRS(a, attrs, len) {
        uint32_t idx;
        if (a->nla_type == NBD_ATTR_INDEX && ATTR_LEN(a) >= 4) {
          memcpy(&idx, ATTR_DATA(a), 4);
          ours = (int)idx == g.index;
        }
      }
      if (ours) reconnect(nl);
    }
  }
}
