// libFuzzer target: the client side (protocol/client.*) fed by a lying server.
//
// Input layout:
//   byte 0   bit 0: 0 = ClientHandshake, 1 = ReplyReader; bit 1: structured
//            replies (reader) or asking for them (handshake); bits 2-7: the
//            size of the pieces the input is fed in (1..64 bytes)
//   rest     what the server sends
//
// Invariants: feed() never consumes more than it is given, and nothing once
// failed or broken; a ready handshake has sane block sizes and only contexts
// that were asked for, with distinct non-zero ids. Every piece of data or
// hole the reader reports lies inside its read and overlaps nothing reported
// before; a read completing without error was covered in full; extents name
// a negotiated context and begin inside the request; each request completes
// at most once.
#include <algorithm>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "protocol/client.hpp"
#include "check.hpp"

namespace {

const std::vector<std::string> kContexts = {"base:allocation", "nbdroot:dirty"};

void fuzz_handshake(bool structured, size_t step, const uint8_t* p, size_t n) {
  nbd::ClientHandshake c({"disk", structured, kContexts});
  size_t off = 0;
  while (off < n) {
    size_t len = std::min(step, n - off);
    size_t used = c.feed(p + off, len);
    CHECK(used <= len);
    if (c.status() != nbd::ClientHandshake::Status::kContinue) {
      CHECK(c.feed(p + off + used, len - used) == 0);
      break;
    }
    CHECK(used == len);
    off += used;
    c.out().clear();
  }
  if (c.status() == nbd::ClientHandshake::Status::kFailed) CHECK(!c.error().empty());
  if (c.status() != nbd::ClientHandshake::Status::kReady) return;
  const nbd::ClientSession& s = c.session();
  CHECK(s.flags & nbd::kFlagHasFlags);
  CHECK(s.min_block && (s.min_block & (s.min_block - 1)) == 0 && s.min_block <= 65536);
  CHECK(s.preferred_block >= s.min_block && s.max_block >= s.min_block);
  if (!s.structured) CHECK(s.contexts.empty());
  std::set<uint32_t> ids;
  for (const auto& m : s.contexts) {
    CHECK(m.id != 0 && ids.insert(m.id).second);
    CHECK(std::find(kContexts.begin(), kContexts.end(), m.name) != kContexts.end());
    CHECK(s.context_id(m.name) == m.id);
  }
}

struct Checker : nbd::ReplySink {
  std::map<uint64_t, nbd::Request> reqs;
  std::map<uint64_t, std::vector<bool>> seen;  // read bytes reported
  std::set<uint64_t> done;

  void mark(uint64_t c, uint64_t off, uint64_t n) {
    const nbd::Request& r = reqs.at(c);
    CHECK(r.type == nbd::kCmdRead && !done.count(c));
    CHECK(off >= r.offset && n <= r.length && off - r.offset <= r.length - n);
    auto& bits = seen[c];
    bits.resize(r.length);
    for (uint64_t i = off - r.offset; i < off - r.offset + n; ++i) {
      CHECK(!bits[i]);
      bits[i] = true;
    }
  }
  void on_data(uint64_t c, uint64_t off, const uint8_t*, size_t n) override {
    CHECK(n > 0);
    mark(c, off, n);
  }
  void on_hole(uint64_t c, uint64_t off, uint64_t n) override { mark(c, off, n); }
  void on_extents(uint64_t c, uint32_t ctx, std::span<const nbd::Extent> ext) override {
    CHECK(reqs.at(c).type == nbd::kCmdBlockStatus && !done.count(c));
    CHECK(ctx == 1 || ctx == 2);
    CHECK(!ext.empty());
    for (const auto& x : ext) CHECK(x.length > 0);
  }
  void on_error(uint64_t c, uint32_t err, std::string_view msg) override {
    CHECK(reqs.count(c) && !done.count(c));
    CHECK(err != 0 && msg.size() <= nbd::kMaxErrorMessage);
  }
  void on_done(uint64_t c, uint32_t err) override {
    const nbd::Request& r = reqs.at(c);
    CHECK(done.insert(c).second);
    if (r.type == nbd::kCmdRead && err == 0) {
      auto& bits = seen[c];
      bits.resize(r.length);
      CHECK(std::all_of(bits.begin(), bits.end(), [](bool b) { return b; }));
    }
  }
};

void fuzz_reader(bool structured, size_t step, const uint8_t* p, size_t n) {
  nbd::ReplyReader r(structured, {1, 2});
  Checker ck;
  const std::vector<nbd::Request> reqs = {
      {.type = nbd::kCmdRead, .cookie = 1, .offset = 0, .length = 64},
      {.type = nbd::kCmdRead, .cookie = 2, .offset = 4096, .length = 16},
      {.flags = nbd::kCmdFlagReqOne, .type = nbd::kCmdBlockStatus, .cookie = 3, .offset = 0,
       .length = 4096},
      {.type = nbd::kCmdBlockStatus, .cookie = 4, .offset = 0, .length = 1 << 20},
      {.type = nbd::kCmdFlush, .cookie = 5},
      {.type = nbd::kCmdWrite, .cookie = 6, .offset = 0, .length = 512},
  };
  for (const auto& q : reqs) {
    CHECK(r.expect(q));
    ck.reqs[q.cookie] = q;
  }
  size_t off = 0;
  while (off < n) {
    size_t len = std::min(step, n - off);
    size_t used = r.feed(p + off, len, ck);
    CHECK(used <= len);
    if (r.broken()) {
      CHECK(!r.why().empty());
      CHECK(r.feed(p + off, len, ck) == 0);
      break;
    }
    CHECK(used == len);
    off += used;
  }
  CHECK(r.in_flight() + ck.done.size() == reqs.size());
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const bool reader = data[0] & 1;
  const bool structured = data[0] & 2;
  const size_t step = size_t(data[0] >> 2) + 1;
  if (reader) {
    fuzz_reader(structured, step, data + 1, size - 1);
  } else {
    fuzz_handshake(structured, step, data + 1, size - 1);
  }
  return 0;
}
