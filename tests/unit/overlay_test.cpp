// Overlay and BlockLocks against a reference model (STYLE.md: CRoaring's
// roaring_checked.hh). The loop's execution of plans is simulated in memory:
// the generation's base and delta layers and the view's diff are byte
// arrays, and a plain byte array holds what the view must read as. Many
// mutations are in flight at once, each a small state machine (lock, plan,
// fill, write, punch, commit, unlock) whose steps are interleaved at random
// with those of the others and with reads.
//
// Replay one seed: NBDROOT_OVERLAY_SEED=<seed> (with the block size the
// failure names); more seeds: NBDROOT_OVERLAY_SEEDS=<n>.
#include "storage/overlay.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace storage {
namespace {

using Bytes = std::vector<uint8_t>;

// ---------------------------------------------------------------------------
// The generation below the view: base bytes and delta layers with bytes.

struct Generation {
  uint32_t bs = 4096;
  uint64_t blocks = 0;
  Bytes base;
  std::vector<Bytes> delta_data;  // newest first, like LayerStack
  std::vector<BlockMap> delta_maps;
  std::shared_ptr<const LayerStack> stack;

  uint64_t size() const { return blocks * bs; }
  LayerId id() const { return LayerId{bs, size(), 1, 2}; }

  // The layer below the view that holds `block`, computed independently of
  // LayerStack::source.
  int below(uint64_t block) const {
    for (size_t k = 0; k < delta_maps.size(); ++k) {
      if (delta_maps[k].dirty.contains(uint32_t(block))) return int(k);
      if (delta_maps[k].zero.contains(uint32_t(block))) return kFromZero;
    }
    return int(delta_maps.size());
  }
};

// Random bytes from a fast generator seeded by `rng` (bulk data is most of
// what the simulation generates).
Bytes random_bytes(std::mt19937_64& rng, size_t n) {
  Bytes b(n);
  uint64_t x = rng() | 1;
  for (size_t i = 0; i < n; i += 8) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    std::memcpy(b.data() + i, &x, std::min<size_t>(8, n - i));
  }
  return b;
}

// Random disjoint dirty/zero maps over `blocks`, sometimes built from ranges
// (run containers), sometimes block by block.
BlockMap random_map(std::mt19937_64& rng, uint64_t blocks, double p_dirty, double p_zero) {
  BlockMap m;
  std::uniform_real_distribution<double> u(0, 1);
  for (uint64_t b = 0; b < blocks;) {
    uint64_t run = (rng() % 4 == 0) ? 1 + rng() % 6 : 1;
    run = std::min(run, blocks - b);
    double r = u(rng);
    if (r < p_dirty) {
      m.dirty.addRange(b, b + run);
    } else if (r < p_dirty + p_zero) {
      m.zero.addRange(b, b + run);
    }
    b += run;
  }
  return m;
}

Generation make_generation(std::mt19937_64& rng, uint32_t bs, uint64_t blocks, int deltas) {
  Generation g;
  g.bs = bs;
  g.blocks = blocks;
  g.base = random_bytes(rng, g.size());
  for (int k = 0; k < deltas; ++k) {
    g.delta_data.push_back(random_bytes(rng, g.size()));
    g.delta_maps.push_back(random_map(rng, blocks, 0.25, 0.12));
  }
  g.stack = std::make_shared<const LayerStack>(g.delta_maps);
  return g;
}

// ---------------------------------------------------------------------------
// The simulated view.

enum class BlockState { kClean, kDirty, kZero };
enum class Kind { kWrite, kZeroes, kTrim };
enum class Stage { kWaiting, kLocked, kPlanned, kFilled1, kWrote1, kFilled2, kWrote2, kPunched,
                   kCommitted };

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::kWrite: return "WRITE";
    case Kind::kZeroes: return "WRITE_ZEROES";
    case Kind::kTrim: return "TRIM";
  }
  return "?";
}

struct Op {
  uint64_t owner = 0;
  Kind kind = Kind::kWrite;
  uint64_t off = 0, len = 0;
  Bytes data;  // WRITE payload
  uint64_t first = 0, last = 0;
  Stage stage = Stage::kWaiting;
  MutationPlan plan;
  Bytes buf;  // the diff write being prepared
};

struct SimConfig {
  uint64_t seed = 0;
  uint32_t bs = 4096;
  uint64_t blocks = 64;
  int deltas = 0;
  int ops = 60;
  size_t max_in_flight = 8;
  bool prepopulated = false;  // the view starts with a non-empty map (reattach)
  int full_compare_every = 1; // full read at every k-th quiet point
};

class ViewSim {
 public:
  explicit ViewSim(const SimConfig& c) : c_(c), rng_(c.seed * 0x9e3779b97f4a7c15ull + c.bs) {
    gen_ = make_generation(rng_, c.bs, c.blocks, c.deltas);
    bs_ = c.bs;
    size_ = gen_.size();
    diff_ = random_bytes(rng_, size_);  // garbage wherever the map says nothing
    model_.assign(c.blocks, BlockState::kClean);
    BlockMap own;
    if (c.prepopulated) {
      own = random_map(rng_, c.blocks, 0.3, 0.15);
      for (uint32_t b : own.dirty) model_[b] = BlockState::kDirty;
      for (uint32_t b : own.zero) model_[b] = BlockState::kZero;
    }
    persisted_ = own;  // what the view was attached from
    ov_ = std::make_unique<Overlay>(gen_.id(), std::move(own), gen_.stack, true);
    ref_.resize(size_);
    for (uint64_t b = 0; b < c.blocks; ++b) {
      uint8_t* dst = ref_.data() + b * bs_;
      int src = model_[b] == BlockState::kDirty  ? kFromDiff
                : model_[b] == BlockState::kZero ? kFromZero
                                                  : gen_.below(b);
      read_source(src, b * bs_, bs_, dst);
    }
  }

  // Runs the whole random sequence; returns "" or what went wrong.
  std::string run() {
    int issued = 0;
    while (err_.empty() && (issued < c_.ops || !inflight_.empty())) {
      ++step_;
      const uint64_t r = rng_() % 100;
      if (issued < c_.ops && inflight_.size() < c_.max_in_flight && r < 35) {
        ++issued;
        issue();
      } else if (r < 50) {
        random_read();
      } else if (r < 52) {
        drain();
      } else {
        advance_random();
      }
      if (inflight_.empty() && err_.empty()) quiet_point();
    }
    if (err_.empty()) quiet_point(true);
    return err_;
  }

 private:
  // --- failure reporting -------------------------------------------------
  bool fail(const std::string& what) {
    if (!err_.empty()) return false;
    std::ostringstream s;
    s << "seed " << c_.seed << " (block size " << c_.bs << ", " << c_.blocks << " blocks, "
      << c_.deltas << " delta layers, " << c_.max_in_flight << " in flight max"
      << (c_.prepopulated ? ", prepopulated map" : "") << ") step " << step_ << ": " << what
      << "\nlast events:\n";
    for (const auto& e : trace_) s << "  " << e << "\n";
    s << "replay: NBDROOT_OVERLAY_SEED=" << c_.seed;
    err_ = s.str();
    return false;
  }
  void note(const std::string& e) {
    trace_.push_back("step " + std::to_string(step_) + ": " + e);
    if (trace_.size() > 40) trace_.pop_front();
  }
  static std::string describe(const Op& op) {
    std::ostringstream s;
    s << "#" << op.owner << " " << kind_name(op.kind) << " [" << op.off << ", "
      << op.off + op.len << ")";
    return s.str();
  }

  // --- sources -------------------------------------------------------------
  bool read_source(int from, uint64_t off, uint64_t len, uint8_t* dst) {
    if (off + len > size_) return fail("piece beyond the view: " + std::to_string(off));
    if (from == kFromZero) {
      std::memset(dst, 0, len);
    } else if (from == kFromDiff) {
      std::memcpy(dst, diff_.data() + off, len);
    } else if (from >= 0 && size_t(from) < gen_.delta_data.size()) {
      std::memcpy(dst, gen_.delta_data[size_t(from)].data() + off, len);
    } else if (from >= 0 && size_t(from) == gen_.delta_data.size()) {
      std::memcpy(dst, gen_.base.data() + off, len);
    } else {
      return fail("piece names source " + std::to_string(from));
    }
    return true;
  }

  int expected_source(uint64_t block) const {
    switch (model_[block]) {
      case BlockState::kDirty: return kFromDiff;
      case BlockState::kZero: return kFromZero;
      case BlockState::kClean: return gen_.below(block);
    }
    return kFromZero;
  }

  // --- request generation --------------------------------------------------
  void random_range(uint64_t* off, uint64_t* len) {
    // Half the requests go to a hot spot of a few blocks, to contend.
    const uint64_t lo = (rng_() % 2) ? 0 : (rng_() % c_.blocks);
    const uint64_t span = (rng_() % 2) ? 4 : c_.blocks;
    const uint64_t block = std::min(c_.blocks - 1, lo + rng_() % span);
    switch (rng_() % 4) {
      case 0: *off = block * bs_; break;
      case 1: *off = block * bs_ + rng_() % bs_; break;
      case 2: *off = block * bs_ + bs_ - 1 - rng_() % 8; break;
      default: *off = block * bs_ + (rng_() % 8) * 512 % bs_; break;
    }
    switch (rng_() % 12) {
      case 0: case 1: *len = 1 + rng_() % 64; break;
      case 2: case 3: *len = bs_ - 1 + rng_() % 3; break;
      case 4: case 5: *len = (1 + rng_() % 3) * bs_; break;
      case 6: case 7: *len = 1 + rng_() % (3 * bs_); break;
      case 8: case 9: case 10: *len = 1 + rng_() % (8 * bs_); break;
      default: *len = size_; break;
    }
    *len = std::max<uint64_t>(1, std::min(*len, size_ - *off));
  }

  void issue() {
    if (rng_() % 20 == 0) return flush();
    Op op;
    op.owner = ++owners_;
    const uint64_t r = rng_() % 100;
    op.kind = r < 55 ? Kind::kWrite : r < 78 ? Kind::kZeroes : Kind::kTrim;
    random_range(&op.off, &op.len);
    if (op.kind == Kind::kWrite) op.data = random_bytes(rng_, op.len);
    op.first = op.off / bs_;
    op.last = (op.off + op.len - 1) / bs_;
    note("issue " + describe(op));
    const bool granted = locks_.lock(op.first, op.last, op.owner);
    inflight_.push_back(std::move(op));
    if (granted) on_granted(inflight_.back());
    check_lock_counts();
  }

  // FLUSH: what the loop persists. The map must survive a round trip
  // through the bitmap slot format unchanged.
  void flush() {
    note("FLUSH");
    if (ov_->version() == persisted_version_) return;
    const LayerId id = gen_.id();
    std::string slot = encode_map_slot(id, ++seq_, ov_->map().dirty, ov_->map().zero);
    if (slot.size() > slot_stride(id.blocks()))
      return void(fail("encoded map is larger than its slot"));
    BlockMap back;
    std::string why;
    if (!decode_map_slot(reinterpret_cast<const uint8_t*>(slot.data()), slot.size(), id, &back,
                         &why))
      return void(fail("persisted map does not decode: " + why));
    if (!(back.dirty == ov_->map().dirty) || !(back.zero == ov_->map().zero) || back.seq != seq_)
      return void(fail("persisted map decodes differently"));
    persisted_ = std::move(back);
    persisted_version_ = ov_->version();
  }

  // --- stepping ------------------------------------------------------------
  void advance_random() {
    std::vector<size_t> ready;
    for (size_t i = 0; i < inflight_.size(); ++i)
      if (inflight_[i].stage != Stage::kWaiting) ready.push_back(i);
    if (ready.empty()) {
      if (!inflight_.empty()) fail("deadlock: every request in flight waits for a lock");
      return;
    }
    advance(ready[rng_() % ready.size()]);
  }

  void drain() {
    note("drain");
    for (int guard = 0; !inflight_.empty() && err_.empty(); ++guard) {
      if (guard > 100000) return void(fail("drain does not finish"));
      if (rng_() % 4 == 0) random_read();
      advance_random();
    }
  }

  void advance(size_t i) {
    Op& op = inflight_[i];
    switch (op.stage) {
      case Stage::kWaiting: fail("advanced a waiting request"); return;
      case Stage::kLocked: plan(op); return;
      case Stage::kPlanned: prepare(op, op.plan.start, op.plan.end, op.plan.fill, Stage::kFilled1); return;
      case Stage::kFilled1: write_diff(op, op.plan.start, Stage::kWrote1); return;
      case Stage::kWrote1: prepare(op, op.plan.start2, op.plan.end2, op.plan.fill2, Stage::kFilled2); return;
      case Stage::kFilled2: write_diff(op, op.plan.start2, Stage::kWrote2); return;
      case Stage::kWrote2: punch(op); return;
      case Stage::kPunched: commit(op); return;
      case Stage::kCommitted: unlock(i); return;
    }
  }

  void on_granted(Op& op) {
    note("granted " + describe(op));
    op.stage = Stage::kLocked;
    for (const Op& o : inflight_) {
      if (o.owner == op.owner) continue;
      const bool overlap = o.first <= op.last && op.first <= o.last;
      if (!overlap) continue;
      if (o.stage != Stage::kWaiting)
        return void(fail("lock granted to " + describe(op) + " while " + describe(o) +
                         " holds an overlapping range"));
      if (o.owner < op.owner)
        return void(fail("lock granted to " + describe(op) + " ahead of earlier waiter " +
                         describe(o)));
    }
  }

  void check_lock_counts() {
    size_t held = 0, waiting = 0;
    for (const Op& o : inflight_) (o.stage == Stage::kWaiting ? waiting : held)++;
    if (locks_.held() != held || locks_.waiting() != waiting)
      fail("BlockLocks counts " + std::to_string(locks_.held()) + " held, " +
           std::to_string(locks_.waiting()) + " waiting; model " + std::to_string(held) + ", " +
           std::to_string(waiting));
  }

  // Checks that `fill` covers exactly [s, e) minus the request's bytes.
  void check_fill(const Op& op, uint64_t s, uint64_t e, const std::vector<Piece>& fill,
                  const char* which) {
    std::vector<std::pair<uint64_t, uint64_t>> want;
    const uint64_t rs = std::max(s, op.off), re = std::min(e, op.off + op.len);
    if (rs >= re) return void(fail(describe(op) + ": " + which + " holds none of the request"));
    if (s < rs) want.push_back({s, rs});
    if (re < e) want.push_back({re, e});
    std::vector<std::pair<uint64_t, uint64_t>> got;
    for (const Piece& p : fill) {
      if (p.len == 0) return void(fail(describe(op) + ": empty fill piece"));
      if (!got.empty() && got.back().second == p.off) {
        got.back().second += p.len;
      } else {
        got.push_back({p.off, p.off + p.len});
      }
    }
    if (got != want)
      fail(describe(op) + ": " + which + " fill does not cover exactly the rest of [" +
           std::to_string(s) + ", " + std::to_string(e) + ")");
  }

  void plan(Op& op) {
    if (op.kind == Kind::kWrite) {
      op.plan = ov_->plan_write(op.off, op.len);
    } else {
      op.plan = ov_->plan_zero(op.off, op.len, op.kind == Kind::kTrim);
    }
    const MutationPlan& p = op.plan;
    std::ostringstream s;
    s << "plan " << describe(op) << ": write [" << p.start << ", " << p.end << ") fill "
      << p.fill.size() << ", [" << p.start2 << ", " << p.end2 << ") fill " << p.fill2.size()
      << ", zero blocks [" << p.zero_first << ", " << p.zero_end << ")" << (p.punch ? " punch" : "");
    note(s.str());
    op.stage = Stage::kPlanned;
    if (p.first != op.first || p.last != op.last)
      return void(fail(describe(op) + ": plan locks blocks other than the request's"));
    const uint64_t lo = op.first * bs_, hi = (op.last + 1) * bs_;
    for (auto [a, b] : {std::pair{p.start, p.end}, std::pair{p.start2, p.end2}}) {
      if (a > b || (a < b && (a < lo || b > hi)))
        return void(fail(describe(op) + ": diff write outside the locked blocks"));
    }
    if (p.start < p.end) check_fill(op, p.start, p.end, p.fill, "first");
    else if (!p.fill.empty()) fail(describe(op) + ": fill without a write");
    if (p.start2 < p.end2) check_fill(op, p.start2, p.end2, p.fill2, "second");
    else if (!p.fill2.empty()) fail(describe(op) + ": fill2 without a write");
    // Whole blocks inside the range for zeroing requests.
    uint64_t zf = 0, ze = 0;
    if (op.kind != Kind::kWrite) {
      zf = (op.off + bs_ - 1) / bs_;
      ze = (op.off + op.len) / bs_;
      if (ze <= zf) zf = ze = 0;
    }
    if (p.zero_end > p.zero_first || ze > zf) {
      if (p.zero_first != zf || p.zero_end != ze)
        return void(fail(describe(op) + ": plan zeroes blocks [" + std::to_string(p.zero_first) +
                         ", " + std::to_string(p.zero_end) + "), expected [" + std::to_string(zf) +
                         ", " + std::to_string(ze) + ")"));
    }
    bool any_dirty = false;
    for (uint64_t b = zf; b < ze; ++b) any_dirty |= model_[b] == BlockState::kDirty;
    if (p.punch != any_dirty)
      return void(fail(describe(op) + ": punch is " + std::to_string(p.punch) +
                       " but dirty blocks in the zeroed range: " + std::to_string(any_dirty)));
    if (op.kind == Kind::kWrite && (p.start2 != p.end2 || p.zero_end != p.zero_first))
      return void(fail(describe(op) + ": a write plans a second write or zeroing"));
    if (op.kind == Kind::kTrim && (p.start != p.end || p.start2 != p.end2))
      return void(fail(describe(op) + ": a trim plans a diff write"));
  }

  // Builds the buffer for the diff write [s, e): fill pieces read now, the
  // request's bytes (or zeros) at their place.
  void prepare(Op& op, uint64_t s, uint64_t e, const std::vector<Piece>& fill, Stage next) {
    op.stage = next;
    op.buf.assign(e - s, 0);
    if (s >= e) return;
    for (const Piece& p : fill) {
      if (p.off < s || p.off + p.len > e) return void(fail(describe(op) + ": fill piece outside the write"));
      if (!read_source(p.from, p.off, p.len, op.buf.data() + (p.off - s))) return;
    }
    const uint64_t rs = std::max(s, op.off), re = std::min(e, op.off + op.len);
    if (op.kind == Kind::kWrite) {
      std::memcpy(op.buf.data() + (rs - s), op.data.data() + (rs - op.off), re - rs);
    } else {
      std::memset(op.buf.data() + (rs - s), 0, re - rs);
    }
  }

  void write_diff(Op& op, uint64_t s, Stage next) {
    op.stage = next;
    if (!op.buf.empty()) std::memcpy(diff_.data() + s, op.buf.data(), op.buf.size());
    op.buf.clear();
  }

  void punch(Op& op) {
    op.stage = Stage::kPunched;
    if (!op.plan.punch) return;
    std::memset(diff_.data() + op.plan.zero_first * bs_, 0,
                (op.plan.zero_end - op.plan.zero_first) * bs_);
  }

  void commit(Op& op) {
    op.stage = Stage::kCommitted;
    const uint64_t before = ov_->version();
    ov_->commit(op.plan);
    note("commit " + describe(op));
    if (ov_->version() <= before) return void(fail("commit did not bump version()"));
    // The reference and the per-block model, atomically at commit.
    const uint64_t end = op.off + op.len;
    const uint64_t zf = (op.off + bs_ - 1) / bs_, ze = end / bs_;
    switch (op.kind) {
      case Kind::kWrite:
        std::memcpy(ref_.data() + op.off, op.data.data(), op.len);
        for (uint64_t b = op.first; b <= op.last; ++b) model_[b] = BlockState::kDirty;
        break;
      case Kind::kZeroes:
        std::memset(ref_.data() + op.off, 0, op.len);
        for (uint64_t b = op.first; b <= op.last; ++b) {
          if (b >= zf && b < ze) model_[b] = BlockState::kZero;
          else if (model_[b] != BlockState::kZero) model_[b] = BlockState::kDirty;
        }
        break;
      case Kind::kTrim:
        for (uint64_t b = zf; b < ze; ++b) {
          std::memset(ref_.data() + b * bs_, 0, bs_);
          model_[b] = BlockState::kZero;
        }
        break;
    }
    check_map();
  }

  void unlock(size_t i) {
    const uint64_t owner = inflight_[i].owner;
    note("unlock #" + std::to_string(owner));
    inflight_.erase(inflight_.begin() + long(i));
    std::vector<uint64_t> granted = locks_.unlock(owner);
    for (uint64_t g : granted) {
      auto it = std::find_if(inflight_.begin(), inflight_.end(),
                             [&](const Op& o) { return o.owner == g; });
      if (it == inflight_.end() || it->stage != Stage::kWaiting)
        return void(fail("unlock granted #" + std::to_string(g) + ", which was not waiting"));
      on_granted(*it);
    }
    // Nobody waits who could run: each waiter overlaps a holder or an
    // earlier waiter.
    for (const Op& w : inflight_) {
      if (w.stage != Stage::kWaiting) continue;
      bool blocked = false;
      for (const Op& o : inflight_) {
        if (&o == &w || !(o.first <= w.last && w.first <= o.last)) continue;
        if (o.stage != Stage::kWaiting || o.owner < w.owner) blocked = true;
      }
      if (!blocked) return void(fail(describe(w) + " still waits though nothing blocks it"));
    }
    check_lock_counts();
  }

  // --- checks --------------------------------------------------------------
  void check_map() {
    const BlockMap& m = ov_->map();
    if (m.dirty.and_cardinality(m.zero) != 0) return void(fail("dirty and zero intersect"));
    if (!m.dirty.isEmpty() && m.dirty.maximum() >= c_.blocks)
      return void(fail("dirty bit beyond the view"));
    if (!m.zero.isEmpty() && m.zero.maximum() >= c_.blocks)
      return void(fail("zero bit beyond the view"));
    for (uint64_t b = 0; b < c_.blocks; ++b) {
      const bool d = m.dirty.contains(uint32_t(b)), z = m.zero.contains(uint32_t(b));
      const BlockState got = d ? BlockState::kDirty : z ? BlockState::kZero : BlockState::kClean;
      if (got != model_[b])
        return void(fail("block " + std::to_string(b) + " is in state " + std::to_string(int(got)) +
                         ", model says " + std::to_string(int(model_[b]))));
      if (ov_->source(b) != expected_source(b))
        return void(fail("source(" + std::to_string(b) + ") = " + std::to_string(ov_->source(b)) +
                         ", expected " + std::to_string(expected_source(b))));
    }
    check_changed_runs(0, size_, 1000000);
    uint64_t off = rng_() % size_;
    uint64_t len = 1 + rng_() % (size_ - off);
    check_changed_runs(off, len, 1 + rng_() % 5);
  }

  void check_changed_runs(uint64_t off, uint64_t len, size_t max) {
    std::vector<std::pair<uint64_t, bool>> want;
    for (uint64_t pos = off; pos < off + len;) {
      const uint64_t b = pos / bs_, next = std::min(off + len, (b + 1) * bs_);
      const bool changed = model_[b] != BlockState::kClean;
      if (!want.empty() && want.back().second == changed) want.back().first += next - pos;
      else want.push_back({next - pos, changed});
      pos = next;
    }
    if (want.size() > max) want.resize(max);
    auto got = ov_->changed_runs(off, len, max);
    if (got != want)
      fail("changed_runs(" + std::to_string(off) + ", " + std::to_string(len) + ", " +
           std::to_string(max) + ") gives " + std::to_string(got.size()) + " runs, model " +
           std::to_string(want.size()));
  }

  // Reads [off, off + len) through plan_read. Bytes under a mutation that
  // holds its lock may be old or new; all others must match the reference.
  void check_read(uint64_t off, uint64_t len, bool quiet) {
    ov_->plan_read(off, len, &pieces_);
    uint64_t pos = off;
    for (size_t i = 0; i < pieces_.size(); ++i) {
      const Piece& p = pieces_[i];
      if (p.off != pos || p.len == 0)
        return void(fail("plan_read(" + std::to_string(off) + ", " + std::to_string(len) +
                         "): piece " + std::to_string(i) + " does not continue the previous"));
      if (i > 0 && pieces_[i - 1].from == p.from)
        return void(fail("plan_read: neighbouring pieces from one source are not merged"));
      for (uint64_t b = p.off / bs_; b * bs_ < p.off + p.len; ++b)
        if (expected_source(b) != p.from)
          return void(fail("plan_read: block " + std::to_string(b) + " read from " +
                           std::to_string(p.from) + ", expected " +
                           std::to_string(expected_source(b))));
      pos += p.len;
    }
    if (pos != off + len) return void(fail("plan_read does not cover the request"));
    readbuf_.resize(len);
    for (const Piece& p : pieces_)
      if (!read_source(p.from, p.off, p.len, readbuf_.data() + (p.off - off))) return;
    if (std::memcmp(readbuf_.data(), ref_.data() + off, len) == 0) return;
    const Op* last = nullptr;  // the mutation that explained the previous byte
    for (uint64_t i = 0; i < len; ++i) {
      const uint64_t at = off + i;
      const uint8_t got = readbuf_[i];
      if (got == ref_[at]) continue;
      bool ok = false;
      if (!quiet) {
        if (last && explains(*last, at, got)) continue;
        for (const Op& o : inflight_) {
          if (explains(o, at, got)) {
            ok = true;
            last = &o;
            break;
          }
        }
      }
      if (!ok) {
        std::ostringstream s;
        s << "read [" << off << ", " << off + len << ") byte " << at << " (block " << at / bs_
          << ", offset " << at % bs_ << ") is " << int(got) << ", reference " << int(ref_[at])
          << (quiet ? " (nothing in flight)" : "");
        return void(fail(s.str()));
      }
    }
  }

  // Whether `got` at `at` is the new value of mutation `o`, which holds its
  // lock and has not committed yet.
  bool explains(const Op& o, uint64_t at, uint8_t got) const {
    if (o.stage == Stage::kWaiting || at < o.off || at >= o.off + o.len) return false;
    if (o.kind == Kind::kWrite) return got == o.data[at - o.off];
    if (o.kind == Kind::kZeroes) return got == 0;
    return got == 0 && at / bs_ >= (o.off + bs_ - 1) / bs_ && at / bs_ < (o.off + o.len) / bs_;
  }

  void random_read() {
    uint64_t off, len;
    random_range(&off, &len);
    note("read [" + std::to_string(off) + ", " + std::to_string(off + len) + ")");
    check_read(off, len, inflight_.empty());
  }

  void quiet_point(bool final = false) {
    if (!final && ++quiet_points_ % c_.full_compare_every != 0) return;
    if (!final && ov_->version() == compared_version_) return;
    compared_version_ = ov_->version();
    check_read(0, size_, true);
    if (!err_.empty()) return;
    // Now and then, reattach from the persisted map, as after a restart.
    if (final || rng_() % 4 == 0) {
      flush();
      if (!err_.empty()) return;
      note("reattach");
      BlockMap m = persisted_;
      ov_ = std::make_unique<Overlay>(gen_.id(), std::move(m), gen_.stack, true);
      persisted_version_ = compared_version_ = ov_->version();
      check_map();
      check_read(0, size_, true);
    }
  }

  SimConfig c_;
  std::mt19937_64 rng_;
  Generation gen_;
  uint64_t bs_ = 0, size_ = 0;
  Bytes diff_, ref_, readbuf_;
  std::vector<BlockState> model_;
  std::unique_ptr<Overlay> ov_;
  BlockLocks locks_;
  std::vector<Op> inflight_;
  std::vector<Piece> pieces_;
  uint64_t owners_ = 0, step_ = 0, quiet_points_ = 0;
  uint64_t persisted_version_ = 0, compared_version_ = ~0ull, seq_ = 0;
  BlockMap persisted_;
  std::deque<std::string> trace_;
  std::string err_;
};

uint64_t env_u64(const char* name, uint64_t dflt) {
  const char* v = std::getenv(name);
  return v && *v ? std::strtoull(v, nullptr, 10) : dflt;
}

#if defined(__has_feature)
#if __has_feature(address_sanitizer) && !defined(__SANITIZE_ADDRESS__)
#define __SANITIZE_ADDRESS__ 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__)
constexpr uint64_t kSeedDivisor = 3;  // ASan is about 3x slower: keep the run near 10 s
#else
constexpr uint64_t kSeedDivisor = 1;
#endif

// Runs `seeds` seeds (or the one in NBDROOT_OVERLAY_SEED) at block size bs.
void run_seeds(uint32_t bs, uint64_t blocks, uint64_t seeds, int ops, int full_compare_every) {
  const char* one = std::getenv("NBDROOT_OVERLAY_SEED");
  uint64_t from = 0, to = env_u64("NBDROOT_OVERLAY_SEEDS", seeds / kSeedDivisor);
  if (one && *one) {
    from = std::strtoull(one, nullptr, 10);
    to = from + 1;
  }
  static const int kDeltas[] = {0, 1, 3};
  for (uint64_t seed = from; seed < to; ++seed) {
    SimConfig c;
    c.seed = seed;
    c.bs = bs;
    c.blocks = blocks;
    c.deltas = kDeltas[seed % 3];
    c.ops = ops;
    c.max_in_flight = 1 + seed % 12;
    c.prepopulated = seed % 5 == 4;
    c.full_compare_every = full_compare_every;
    const std::string err = ViewSim(c).run();
    ASSERT_TRUE(err.empty()) << err;
  }
}

TEST(OverlayModel, RandomSequences512) { run_seeds(512, 64, 2000, 60, 1); }
TEST(OverlayModel, RandomSequences4096) { run_seeds(4096, 64, 1000, 60, 2); }
TEST(OverlayModel, RandomSequences65536) { run_seeds(65536, 16, 60, 60, 4); }

// ---------------------------------------------------------------------------
// Regression cases, driven step by step.

// A small fixture: one view with its own diff and helpers to run a mutation
// through plan, fill, write, punch and commit.
class OverlayTest : public ::testing::Test {
 protected:
  static constexpr uint32_t kBs = 512;
  static constexpr uint64_t kBlocks = 8;
  static constexpr uint64_t kSize = kBs * kBlocks;

  void SetUp() override { reset(0); }

  void reset(int deltas, BlockMap own = {}) {
    std::mt19937_64 rng(7);
    gen_ = make_generation(rng, kBs, kBlocks, deltas);
    diff_ = random_bytes(rng, kSize);
    ov_ = std::make_unique<Overlay>(gen_.id(), std::move(own), gen_.stack, true);
  }

  Bytes source(int from, uint64_t off, uint64_t len) const {
    const uint8_t* p = from == kFromDiff ? diff_.data()
                       : from == kFromZero ? nullptr
                       : size_t(from) == gen_.delta_data.size() ? gen_.base.data()
                                                                : gen_.delta_data[size_t(from)].data();
    return p ? Bytes(p + off, p + off + len) : Bytes(len, 0);
  }

  // Fills and writes one part of a plan into the diff.
  void execute_part(uint64_t s, uint64_t e, const std::vector<Piece>& fill, uint64_t off,
                    const Bytes& data) {
    if (s >= e) return;
    Bytes buf(e - s, 0);
    for (const Piece& p : fill) {
      Bytes b = source(p.from, p.off, p.len);
      std::copy(b.begin(), b.end(), buf.begin() + long(p.off - s));
    }
    for (uint64_t i = std::max(s, off); i < std::min(e, off + data.size()); ++i)
      buf[i - s] = data[i - off];
    std::copy(buf.begin(), buf.end(), diff_.begin() + long(s));
  }

  void execute(const MutationPlan& p, uint64_t off, const Bytes& data) {
    execute_part(p.start, p.end, p.fill, off, data);
    execute_part(p.start2, p.end2, p.fill2, off, data);
    if (p.punch)
      std::fill(diff_.begin() + long(p.zero_first * kBs), diff_.begin() + long(p.zero_end * kBs), 0);
    ov_->commit(p);
  }

  void write(uint64_t off, const Bytes& data) { execute(ov_->plan_write(off, data.size()), off, data); }
  void zero(uint64_t off, uint64_t len, bool trim) {
    execute(ov_->plan_zero(off, len, trim), off, Bytes(len, 0));
  }

  Bytes read(uint64_t off, uint64_t len) {
    std::vector<Piece> pieces;
    ov_->plan_read(off, len, &pieces);
    Bytes out;
    for (const Piece& p : pieces) {
      Bytes b = source(p.from, p.off, p.len);
      out.insert(out.end(), b.begin(), b.end());
    }
    EXPECT_EQ(out.size(), len);
    return out;
  }

  Bytes base(uint64_t off, uint64_t len) const { return source(0, off, len); }

  Generation gen_;
  Bytes diff_;
  std::unique_ptr<Overlay> ov_;
};

Bytes pattern(uint64_t n, uint8_t v) { return Bytes(n, v); }

TEST_F(OverlayTest, TwoUnalignedWritesIntoOneCleanBlockLoseNeither) {
  BlockLocks locks;
  const Bytes a = pattern(100, 0xaa), b = pattern(100, 0xbb);
  const uint64_t block = 3, off_a = block * kBs + 10, off_b = block * kBs + 300;
  ASSERT_TRUE(locks.lock(block, block, 1));
  EXPECT_FALSE(locks.lock(block, block, 2));  // B waits for A
  MutationPlan pa = ov_->plan_write(off_a, a.size());
  EXPECT_EQ(pa.start, block * kBs);
  EXPECT_EQ(pa.end, (block + 1) * kBs);
  execute(pa, off_a, a);
  EXPECT_EQ(locks.unlock(1), std::vector<uint64_t>{2});
  MutationPlan pb = ov_->plan_write(off_b, b.size());
  EXPECT_EQ(pb.start, off_b) << "B's block is dirty now: no copy-up";
  EXPECT_EQ(pb.end, off_b + b.size());
  EXPECT_TRUE(pb.fill.empty());
  execute(pb, off_b, b);
  EXPECT_TRUE(locks.unlock(2).empty());

  Bytes want = base(block * kBs, kBs);
  std::copy(a.begin(), a.end(), want.begin() + 10);
  std::copy(b.begin(), b.end(), want.begin() + 300);
  EXPECT_EQ(read(block * kBs, kBs), want);
}

TEST_F(OverlayTest, PartialWriteIntoZeroBlockReadsZerosAround) {
  write(2 * kBs, pattern(kBs, 0x11));  // dirty first, so the trim punches
  zero(2 * kBs, kBs, /*trim=*/true);
  EXPECT_EQ(read(2 * kBs, kBs), Bytes(kBs, 0));
  MutationPlan p = ov_->plan_write(2 * kBs + 100, 50);
  EXPECT_EQ(p.start, 2 * kBs);
  EXPECT_EQ(p.end, 3 * kBs);
  for (const Piece& piece : p.fill) EXPECT_EQ(piece.from, kFromZero);
  execute(p, 2 * kBs + 100, pattern(50, 0x22));
  Bytes want(kBs, 0);
  std::fill(want.begin() + 100, want.begin() + 150, 0x22);
  EXPECT_EQ(read(2 * kBs, kBs), want);
  EXPECT_TRUE(ov_->map().dirty.contains(2));
  EXPECT_FALSE(ov_->map().zero.contains(2));
}

TEST_F(OverlayTest, WriteZeroesWithEdgesInTwoBlocks) {
  const Bytes before = read(0, kSize);
  // No whole block: [1.5, 2.5) blocks.
  MutationPlan p = ov_->plan_zero(kBs + kBs / 2, kBs, false);
  EXPECT_EQ(p.zero_first, p.zero_end);
  EXPECT_EQ(p.start, kBs);
  EXPECT_EQ(p.end, 2 * kBs);
  EXPECT_EQ(p.start2, 2 * kBs);
  EXPECT_EQ(p.end2, 3 * kBs);
  execute(p, kBs + kBs / 2, Bytes(kBs, 0));
  // With whole blocks between: [4.25, 6.75).
  MutationPlan q = ov_->plan_zero(4 * kBs + kBs / 4, 2 * kBs + kBs / 2, false);
  EXPECT_EQ(q.zero_first, 5u);
  EXPECT_EQ(q.zero_end, 6u);
  EXPECT_EQ(q.start, 4 * kBs);
  EXPECT_EQ(q.end, 5 * kBs);
  EXPECT_EQ(q.start2, 6 * kBs);
  EXPECT_EQ(q.end2, 7 * kBs);
  execute(q, 4 * kBs + kBs / 4, Bytes(2 * kBs + kBs / 2, 0));
  Bytes want = before;
  std::fill(want.begin() + kBs + kBs / 2, want.begin() + 2 * kBs + kBs / 2, 0);
  std::fill(want.begin() + 4 * kBs + kBs / 4, want.begin() + 6 * kBs + 3 * kBs / 4, 0);
  EXPECT_EQ(read(0, kSize), want);
}

TEST_F(OverlayTest, WriteZeroesWithBothEdgesInOneBlock) {
  const Bytes before = read(0, kSize);
  MutationPlan p = ov_->plan_zero(kBs + 100, 200, false);
  EXPECT_EQ(p.first, 1u);
  EXPECT_EQ(p.last, 1u);
  EXPECT_EQ(p.zero_first, p.zero_end);
  EXPECT_EQ(p.start, kBs);
  EXPECT_EQ(p.end, 2 * kBs);
  EXPECT_EQ(p.start2, p.end2);
  execute(p, kBs + 100, Bytes(200, 0));
  Bytes want = before;
  std::fill(want.begin() + kBs + 100, want.begin() + kBs + 300, 0);
  EXPECT_EQ(read(0, kSize), want);
}

TEST_F(OverlayTest, TrimOfRangeWithoutWholeBlockIsNoOp) {
  write(kBs, pattern(2 * kBs, 0x33));
  const Bytes before = read(0, kSize);
  const BlockMap m = ov_->map();
  for (auto [off, len] : {std::pair<uint64_t, uint64_t>{kBs + 1, kBs - 2}, {kBs + 10, kBs},
                          {0 + 5, 10}}) {
    MutationPlan p = ov_->plan_zero(off, len, true);
    EXPECT_EQ(p.zero_first, p.zero_end);
    EXPECT_EQ(p.start, p.end);
    EXPECT_EQ(p.start2, p.end2);
    EXPECT_FALSE(p.punch);
    execute(p, off, Bytes(len, 0));
  }
  EXPECT_TRUE(ov_->map().dirty == m.dirty);
  EXPECT_TRUE(ov_->map().zero == m.zero);
  EXPECT_EQ(read(0, kSize), before);
}

TEST_F(OverlayTest, WriteThenTrimThenUnalignedWrite) {
  Bytes want = read(0, kSize);
  const Bytes w1 = pattern(3 * kBs, 0x44);
  write(2 * kBs, w1);
  std::copy(w1.begin(), w1.end(), want.begin() + 2 * kBs);
  zero(2 * kBs + 7, 3 * kBs, true);  // whole blocks 3 and 4; edges stay
  std::fill(want.begin() + 3 * kBs, want.begin() + 5 * kBs, 0);
  EXPECT_EQ(read(0, kSize), want);
  const Bytes w2 = pattern(kBs, 0x55);
  write(3 * kBs + 200, w2);  // into zero block 3 and zero block 4
  std::copy(w2.begin(), w2.end(), want.begin() + 3 * kBs + 200);
  EXPECT_EQ(read(0, kSize), want);
  EXPECT_TRUE(ov_->map().dirty.contains(3) && ov_->map().dirty.contains(4));
  EXPECT_TRUE(ov_->map().zero.isEmpty());
}

TEST_F(OverlayTest, PlanReadMergesNeighboursOfOneSource) {
  BlockMap own;
  own.dirty.addRange(2, 4);  // 2, 3
  own.zero.addRange(5, 7);   // 5, 6
  reset(0, std::move(own));
  std::vector<Piece> pieces;
  ov_->plan_read(0, kSize, &pieces);
  ASSERT_EQ(pieces.size(), 5u);
  const int want[] = {0, kFromDiff, 0, kFromZero, 0};
  const uint64_t lens[] = {2, 2, 1, 2, 1};
  for (size_t i = 0; i < 5; ++i) {
    EXPECT_EQ(pieces[i].from, want[i]) << i;
    EXPECT_EQ(pieces[i].len, lens[i] * kBs) << i;
  }
  // Unaligned, inside two dirty blocks: one piece.
  ov_->plan_read(2 * kBs + 3, kBs + 5, &pieces);
  ASSERT_EQ(pieces.size(), 1u);
  EXPECT_EQ(pieces[0].from, kFromDiff);
  EXPECT_EQ(pieces[0].off, 2 * kBs + 3);
  EXPECT_EQ(pieces[0].len, kBs + 5);
}

TEST_F(OverlayTest, AllCleanFastPathIsOnePiece) {
  std::vector<Piece> pieces;
  ov_->plan_read(13, kSize - 20, &pieces);
  ASSERT_EQ(pieces.size(), 1u);
  EXPECT_EQ(pieces[0].from, 0);
  EXPECT_EQ(pieces[0].off, 13u);
  EXPECT_EQ(pieces[0].len, kSize - 20);
  write(kBs, pattern(kBs, 1));
  ov_->clear();
  ov_->plan_read(0, kSize, &pieces);
  ASSERT_EQ(pieces.size(), 1u);
  EXPECT_EQ(pieces[0].from, 0);
  // Over delta layers whose blocks the view does not touch: still one piece
  // when every block comes from the full image.
  reset(3);
  std::vector<BlockMap> empty(3);
  auto stack = std::make_shared<const LayerStack>(empty);
  Overlay view(gen_.id(), {}, stack, false);
  view.plan_read(1, kSize - 1, &pieces);
  ASSERT_EQ(pieces.size(), 1u);
  EXPECT_EQ(pieces[0].from, 3);
}

TEST_F(OverlayTest, ReadOnlyViewReadsTheGeneration) {
  reset(3);
  Overlay view(gen_.id(), {}, gen_.stack, false);
  EXPECT_FALSE(view.writable());
  std::vector<Piece> pieces;
  view.plan_read(0, kSize, &pieces);
  Bytes got;
  for (const Piece& p : pieces) {
    Bytes b = source(p.from, p.off, p.len);
    got.insert(got.end(), b.begin(), b.end());
  }
  Bytes want;
  for (uint64_t b = 0; b < kBlocks; ++b) {
    Bytes blk = source(gen_.below(b), b * kBs, kBs);
    want.insert(want.end(), blk.begin(), blk.end());
  }
  EXPECT_EQ(got, want);
}

TEST_F(OverlayTest, ChangedRunsStopsAtMax) {
  write(kBs, pattern(kBs, 1));      // block 1 dirty
  zero(3 * kBs, kBs, true);         // block 3 zero
  auto runs = ov_->changed_runs(0, kSize, 100);
  using R = std::vector<std::pair<uint64_t, bool>>;
  EXPECT_EQ(runs, (R{{kBs, false}, {kBs, true}, {kBs, false}, {kBs, true}, {4 * kBs, false}}));
  EXPECT_EQ(ov_->changed_runs(0, kSize, 2), (R{{kBs, false}, {kBs, true}}));
  EXPECT_EQ(ov_->changed_runs(kBs + 10, 20, 5), (R{{20, true}}));
  EXPECT_TRUE(ov_->changed_runs(0, kSize, 0).empty());
}

// ---------------------------------------------------------------------------
// BlockLocks.

TEST(BlockLocks, WaiterIsNotOvertakenByLaterOverlappingRequest) {
  BlockLocks l;
  EXPECT_TRUE(l.lock(0, 3, 1));
  EXPECT_FALSE(l.lock(2, 5, 2));   // overlaps 1
  EXPECT_FALSE(l.lock(5, 6, 3));   // free of holders, but overlaps waiter 2
  EXPECT_TRUE(l.lock(7, 8, 4));    // overlaps nobody
  EXPECT_EQ(l.held(), 2u);
  EXPECT_EQ(l.waiting(), 2u);
  EXPECT_EQ(l.unlock(4), std::vector<uint64_t>{});  // 3 still queued behind 2
  EXPECT_EQ(l.unlock(1), std::vector<uint64_t>{2});
  EXPECT_EQ(l.unlock(2), std::vector<uint64_t>{3});
  EXPECT_EQ(l.unlock(3), std::vector<uint64_t>{});
  EXPECT_EQ(l.held(), 0u);
  EXPECT_EQ(l.waiting(), 0u);
}

TEST(BlockLocks, UnlockGrantsEveryWaiterThatIsFreeInOrder) {
  BlockLocks l;
  EXPECT_TRUE(l.lock(0, 9, 1));
  EXPECT_FALSE(l.lock(0, 0, 2));
  EXPECT_FALSE(l.lock(5, 5, 3));
  EXPECT_FALSE(l.lock(0, 5, 4));  // behind 2 and 3
  EXPECT_FALSE(l.lock(9, 9, 5));
  EXPECT_EQ(l.unlock(1), (std::vector<uint64_t>{2, 3, 5}));
  EXPECT_EQ(l.unlock(3), std::vector<uint64_t>{});
  EXPECT_EQ(l.unlock(2), std::vector<uint64_t>{4});
}

TEST(BlockLocks, ForgetDropsAWaiter) {
  BlockLocks l;
  EXPECT_TRUE(l.lock(0, 0, 1));
  EXPECT_FALSE(l.lock(0, 1, 2));  // waits for 1
  EXPECT_FALSE(l.lock(1, 1, 3));  // waits behind 2
  l.forget(2);
  EXPECT_EQ(l.waiting(), 1u);
  l.forget(42);  // unknown owner: nothing happens
  l.forget(1);   // a holder is not a waiter: still held
  EXPECT_EQ(l.held(), 1u);
  EXPECT_EQ(l.waiting(), 1u);
  EXPECT_EQ(l.unlock(1), std::vector<uint64_t>{3});
  EXPECT_EQ(l.waiting(), 0u);
  // A forgotten waiter is never granted.
  EXPECT_TRUE(l.lock(4, 4, 10));
  EXPECT_FALSE(l.lock(4, 4, 11));
  l.forget(11);
  EXPECT_EQ(l.unlock(10), std::vector<uint64_t>{});
  EXPECT_TRUE(l.lock(4, 4, 12));
}

}  // namespace
}  // namespace storage
