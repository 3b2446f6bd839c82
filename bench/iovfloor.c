/* iovfloor: what the kernel alone costs to copy a node view's reads.
 *
 * A node view answers a read of blocks it changed from its diff and of the
 * others from the image, as one iovec list straight from the two mappings
 * (no assembly copy).  The kernel then copies those pieces into the socket.
 * This tool measures that copy with no server, no NBD and no network: it
 * maps IMAGE and DIFF as the server does, takes the diff's data extents as
 * the changed blocks (SEEK_DATA; a view's diff holds data exactly where its
 * map says changed, zeroed blocks aside), and for each READ-sized window of
 * the image builds the iovec list a view would send.  It hands every list
 * to pwritev() on a memfd, which copies the user pages with the same
 * routine a TCP send uses, and times this thread's CPU per MiB for:
 *
 *   image   the window in one piece from the image (a plain export's read)
 *   view    the view's pieces, alternating between diff and image
 *   cuts    the view's piece boundaries, every piece from the image
 *   prefetch  the view's pieces, with the first 512 bytes of every piece
 *           prefetched (__builtin_prefetch) just before the pwritev: what
 *           a server could win by warming the starts the hardware
 *           prefetcher misses
 *
 * Rounds alternate the variants; medians are printed as one JSON line.
 * cuts - image is what the number of pieces costs, view - cuts what
 * alternating between the two mappings adds.
 *
 *   iovfloor IMAGE DIFF [--read BYTES] [--block BYTES] [--rounds N]
 *
 * Run it on the CPU the server would use, with both files in the page cache.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "loadgen.h"

enum { IMAGE, VIEW, CUTS, PREFETCH, VARIANTS };
static const char *const variant_name[VARIANTS] = { "image", "view", "cuts", "prefetch" };

static double thread_cpu_s(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int cmp_double(const void *a, const void *b)
{
  const double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

static const uint8_t *map_file(const char *path, uint64_t size)
{
  const int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    die("%s: %s", path, strerror(errno));
  void *p = mmap(NULL, size, PROT_READ, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED)
    die("%s: %s", path, strerror(errno));
  close(fd);
  return p;
}

int main(int argc, char **argv)
{
  uint64_t read_size = 1 << 20, block = 4096;
  unsigned rounds = 5;
  static const struct option longopts[] = {
    { "read", required_argument, 0, 'r' },
    { "block", required_argument, 0, 'b' },
    { "rounds", required_argument, 0, 'n' },
    { 0, 0, 0, 0 },
  };
  int c;
  while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
    if (c == 'r')
      read_size = strtoull(optarg, NULL, 0);
    else if (c == 'b')
      block = strtoull(optarg, NULL, 0);
    else if (c == 'n')
      rounds = (unsigned)atoi(optarg);
    else
      return 2;
  }
  if (argc - optind != 2 || !block || !read_size || read_size % block || !rounds) {
    fputs("usage: iovfloor IMAGE DIFF [--read BYTES] [--block BYTES] [--rounds N]\n", stderr);
    return 2;
  }
  const char *image_path = argv[optind], *diff_path = argv[optind + 1];
  struct stat st;
  if (stat(image_path, &st) != 0)
    die("%s: %s", image_path, strerror(errno));
  const uint64_t size = (uint64_t)st.st_size / read_size * read_size;
  if (!size) {
    fputs("iovfloor: the image is smaller than one read\n", stderr);
    return 2;
  }

  /* Changed blocks: the diff's data extents inside the image's size. */
  const uint64_t blocks = size / block;
  uint8_t *changed = calloc(blocks, 1);
  const int dfd = open(diff_path, O_RDONLY | O_CLOEXEC);
  if (!changed || dfd < 0)
    die("%s: %s", diff_path, strerror(errno));
  const uint64_t nchanged = mark_data_blocks(dfd, size, block, changed);
  close(dfd);
  const uint8_t *image = map_file(image_path, size), *diff = map_file(diff_path, size);

  const int out = memfd_create("iovfloor", MFD_CLOEXEC);
  if (out < 0 || ftruncate(out, (off_t)read_size) != 0)
    die("memfd: %s", strerror(errno));
  const size_t max_pieces = read_size / block;
  struct iovec *iov = malloc(max_pieces * sizeof *iov);
  double *cpu = calloc((size_t)VARIANTS * rounds, sizeof *cpu);
  uint64_t pieces = 0;
  /* Round 0 faults the mappings in and is not counted. */
  for (unsigned round = 0; round <= rounds; round++) {
    for (unsigned k = 0; k < VARIANTS; k++) {
      const unsigned v = (k + round) % VARIANTS; /* the order rotates */
      const double t0 = thread_cpu_s();
      for (uint64_t w = 0; w < size; w += read_size) {
        size_t n = 0;
        for (uint64_t b = w / block; b < (w + read_size) / block; b++) {
          const bool from_diff = changed[b];
          const uint8_t *src = ((v == VIEW || v == PREFETCH) && from_diff ? diff : image) + b * block;
          const bool same = n && (v == IMAGE || from_diff == changed[b - 1]);
          if (same) {
            iov[n - 1].iov_len += block;
          } else {
            iov[n].iov_base = (void *)src;
            iov[n++].iov_len = block;
          }
        }
        if (round == 1 && v == VIEW)
          pieces += n;
        if (v == PREFETCH)
          for (size_t i = 0; i < n; i++)
            for (size_t at = 0; at < 512 && at < iov[i].iov_len; at += 64)
              __builtin_prefetch((const char *)iov[i].iov_base + at);
        for (size_t done = 0, i = 0; i < n;) {
          /* IOV_MAX per call, as the server's sends are split. */
          const int cnt = n - i > 1024 ? 1024 : (int)(n - i);
          const ssize_t r = pwritev(out, iov + i, cnt, (off_t)done);
          if (r < 0)
            die("pwritev: %s", strerror(errno));
          done += (size_t)r;
          i += (size_t)cnt; /* a memfd takes whole writes */
        }
      }
      if (round)
        cpu[(size_t)v * rounds + round - 1] = thread_cpu_s() - t0;
    }
  }
  const double mib = (double)size / (1 << 20);
  double med[VARIANTS];
  for (unsigned v = 0; v < VARIANTS; v++) {
    qsort(cpu + (size_t)v * rounds, rounds, sizeof *cpu, cmp_double);
    med[v] = cpu[(size_t)v * rounds + rounds / 2] / mib * 1e6;
  }
  printf("{\"read_bytes\": %" PRIu64 ", \"block\": %" PRIu64 ", \"changed_share\": %.4f, "
         "\"pieces_per_read\": %.1f, \"rounds\": %u",
         read_size, block, (double)nchanged / (double)blocks,
         (double)pieces / (double)(size / read_size), rounds);
  for (unsigned v = 0; v < VARIANTS; v++)
    printf(", \"%s_us_per_mib\": %.2f", variant_name[v], med[v]);
  printf(", \"view_extra_us_per_mib\": %.2f, \"cuts_extra_us_per_mib\": %.2f, "
         "\"prefetch_extra_us_per_mib\": %.2f}\n",
         med[VIEW] - med[IMAGE], med[CUTS] - med[IMAGE], med[PREFETCH] - med[IMAGE]);
  return 0;
}
