/* Shared by the bench tools (nbdload, nbdblast, nbdstorm, iovfloor):
 * error exit, a monotonic clock, a seeded PRNG, option parsers, a
 * log-linear latency histogram and a sparse file's data blocks.
 * Everything is static inline: include it in one translation unit per
 * program.  Needs _GNU_SOURCE (for
 * program_invocation_short_name) before the first system header. */
#ifndef NBDROOT_BENCH_LOADGEN_H
#define NBDROOT_BENCH_LOADGEN_H

#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static inline void die(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
static inline void die(const char *fmt, ...)
{
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "%s: ", program_invocation_short_name);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fputc('\n', stderr);
  exit(1);
}

static inline uint64_t now_ns(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline uint64_t splitmix64(uint64_t *s)
{
  uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

/* Parses "4096", "4k", "1M", "1G" (binary units). */
static inline uint64_t parse_size(const char *opt, const char *s)
{
  char *end;
  errno = 0;
  unsigned long long v = strtoull(s, &end, 10);
  if (errno || end == s)
    die("%s: not a number: '%s'", opt, s);
  uint64_t mul = 1;
  switch (*end) {
  case '\0': break;
  case 'k': case 'K': mul = 1ull << 10; end++; break;
  case 'm': case 'M': mul = 1ull << 20; end++; break;
  case 'g': case 'G': mul = 1ull << 30; end++; break;
  case 't': case 'T': mul = 1ull << 40; end++; break;
  default: die("%s: bad suffix in '%s'", opt, s);
  }
  if (*end == 'i' || *end == 'I') end++;
  if (*end == 'b' || *end == 'B') end++;
  if (*end != '\0')
    die("%s: trailing garbage in '%s'", opt, s);
  if (v > UINT64_MAX / mul)
    die("%s: too large: '%s'", opt, s);
  return v * mul;
}

static inline double parse_double(const char *opt, const char *s)
{
  char *end;
  errno = 0;
  double v = strtod(s, &end);
  if (errno || end == s || *end != '\0' || !(v >= 0))
    die("%s: not a non-negative number: '%s'", opt, s);
  return v;
}

/* ------------------------------------------------------------------ */
/* Log-linear latency histogram, values in ns.                          */
/* Values < 128 get their own bucket; above that every power of two is  */
/* split into 64 sub-buckets.                                           */

#define H_SUB 64u
#define H_LIN 128u
#define H_BUCKETS (H_LIN + 57u * H_SUB)

struct hist {
  uint64_t b[H_BUCKETS];
  uint64_t count;
  uint64_t max;
  long double sum;
};

static inline unsigned h_index(uint64_t v)
{
  if (v < H_LIN)
    return (unsigned)v;
  unsigned msb = 63u - (unsigned)__builtin_clzll(v); /* >= 7 */
  unsigned shift = msb - 6u;                          /* top in [64,127] */
  unsigned top = (unsigned)(v >> shift);
  return H_LIN + (msb - 7u) * H_SUB + (top - H_SUB);
}

/* Midpoint of a bucket in ns. */
static inline double h_value(unsigned idx)
{
  if (idx < H_LIN)
    return idx;
  unsigned k = idx - H_LIN;
  unsigned msb = k / H_SUB + 7u;
  uint64_t top = k % H_SUB + H_SUB;
  unsigned shift = msb - 6u;
  double lo = (double)(top << shift);
  double hi = (double)((top + 1) << shift);
  return (lo + hi) / 2;
}

static inline void h_add(struct hist *h, uint64_t v)
{
  h->b[h_index(v)]++;
  h->count++;
  h->sum += v;
  if (v > h->max)
    h->max = v;
}

static inline void h_merge(struct hist *dst, const struct hist *src)
{
  for (unsigned i = 0; i < H_BUCKETS; i++)
    dst->b[i] += src->b[i];
  dst->count += src->count;
  dst->sum += src->sum;
  if (src->max > dst->max)
    dst->max = src->max;
}

static inline double h_pct(const struct hist *h, double p)
{
  if (h->count == 0)
    return 0;
  uint64_t rank = (uint64_t)(p / 100.0 * (double)h->count + 0.5);
  if (rank < 1) rank = 1;
  if (rank > h->count) rank = h->count;
  uint64_t acc = 0;
  for (unsigned i = 0; i < H_BUCKETS; i++) {
    acc += h->b[i];
    if (acc >= rank) {
      double v = h_value(i);
      return v > (double)h->max ? (double)h->max : v;
    }
  }
  return (double)h->max;
}

/* SIGALRM handler of the run-time watchdog: says so and exits 3.  Only
 * async-signal-safe calls. */
static inline void watchdog_alarm(int sig)
{
  (void)sig;
  static const char msg[] = ": watchdog: run exceeded its time limit, aborting\n";
  ssize_t r = write(2, program_invocation_short_name, strlen(program_invocation_short_name));
  r = write(2, msg, sizeof msg - 1);
  (void)r;
  _exit(3);
}

/* Sets marks[b] for every `block`-sized block b of [0, end) that holds
 * part of fd's data extents (SEEK_DATA / SEEK_HOLE); returns how many of
 * them were not set before. */
static inline uint64_t mark_data_blocks(int fd, uint64_t end, uint64_t block, uint8_t *marks)
{
  uint64_t added = 0;
  for (off_t at = 0;;) {
    const off_t data = lseek(fd, at, SEEK_DATA);
    if (data < 0 || (uint64_t)data >= end)
      return added;
    off_t hole = lseek(fd, data, SEEK_HOLE);
    if (hole < 0 || (uint64_t)hole > end)
      hole = (off_t)end;
    for (uint64_t b = (uint64_t)data / block; b < ((uint64_t)hole + block - 1) / block; b++) {
      added += !marks[b];
      marks[b] = 1;
    }
    at = hole;
  }
}

#endif
