// The map log: a node view's map changes since its last durable map, so
// that writes the server acknowledged survive the server being killed.
//
// A view's block map is made durable only at FLUSH (node_view.hpp). Until
// then, the diff holds the data of acknowledged writes in the page cache,
// but the map that says so lives only in the server's memory: a SIGKILL or
// crash of nbdserver used to revert those blocks to the generation's data
// under a node that was still running. The log closes that gap for the
// case where the host keeps running (its page cache survives the process):
//
//   - Every mutation that changes the map appends a record ("blocks
//     [first, end) are now dirty / zero", or "all clean") after its data is
//     in the diff and before it is acknowledged. Appends are plain buffered
//     writes, never synced: they only have to outlive the process.
//   - A record names the map slot it follows (seq), the layer (tag) and the
//     host's boot. Records after snapshot S carry seq S and go to region
//     S % 2 from its start, so the region of the durable map's
//     predecessor is reused once a newer map is durable.
//   - At open, the records for the durable map N (region N % 2) and then
//     for N + 1 (an unfinished flush's) are replayed in order, up to the
//     first record that is torn, from another layer, or from another boot.
//     After a host crash (another boot) nothing is replayed: only flushed
//     writes are promised then, as before, and the page cache that held
//     the rest is gone.
//
// Records are assignments, so replaying records already contained in the
// durable map (a flush that failed and was retried) changes nothing.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "storage/layer_file.hpp"

namespace storage {

// One map change: blocks [first, end) become dirty or zero, or (kClear)
// the whole map becomes clean.
struct MapChange {
  enum State : uint32_t { kDirty = 1, kZero = 2, kClear = 3 };
  State state = kDirty;
  uint64_t first = 0, end = 0;
};

// What one mutation changes: at most two written ranges and one zeroed.
struct MapChanges {
  MapChange items[3];
  size_t n = 0;
  const MapChange* begin() const { return items; }
  const MapChange* end() const { return items + n; }
  bool empty() const { return n == 0; }
};

inline constexpr size_t kLogRecordSize = 56;
inline constexpr uint64_t kLogRegionSize = 512 * 1024;  // two regions per file
inline constexpr uint64_t kLogRecordsPerRegion = kLogRegionSize / kLogRecordSize;

// A stable 64-bit id of the host's current boot (/proc/sys/kernel/random/boot_id).
uint64_t host_boot_id();

std::string encode_log_record(const MapChange& c, uint64_t seq, uint64_t layer_tag, uint64_t boot);
// False when the bytes are not a valid record (torn, zero, bad CRC).
bool decode_log_record(const uint8_t* p, MapChange* c, uint64_t* seq, uint64_t* layer_tag,
                       uint64_t* boot);

// Opens (creating it if needed) the log file at `path`. Returns the
// descriptor, or -1 with *err set.
int open_map_log(const std::string& path, std::string* err);
// Empties the log (after its records were replayed and made durable) and
// allocates its two regions.
bool reset_map_log(int fd, const std::string& path, std::string* err);
// Applies one change to `map` (of `blocks` blocks); false if it is out of
// range (a record that cannot be ours).
bool apply_change(BlockMap* map, const MapChange& c, uint64_t blocks);

// The highest seq of any valid record of layer `layer_tag` in the log,
// from any boot; 0 if none. A record with seq S was written after map S
// was snapshotted, which a view does only once map S - 1 is durable: so
// map S - 1 was durable once, whatever became of the log's other records.
uint64_t newest_log_seq(int fd, uint64_t layer_tag);

// The records to replay over durable map `seq` of layer `layer_tag`, in
// order (see above). A log that cannot be read yields none.
std::vector<MapChange> read_map_log(int fd, uint64_t seq, uint64_t layer_tag, uint64_t boot);

}  // namespace storage
