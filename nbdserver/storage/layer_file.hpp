// A layer: blocks written over a base image, kept as two files.
//
//   <name>.diff    sparse; block i of the view at offset i * block_size, then
//                  one trailer block at offset size (the view's size) that
//                  names the layer (magic, version, geometry, base, layer id)
//   <name>.bitmap  the layer's block map, in two slots (A/B)
//
// Both node views (nodes/<node>/<image>.<gen>.*) and delta generations
// written by imagebuilder (generations/<gen>/layer.*) use this format.
//
// Block map states, per block of the view:
//   in `dirty`  the diff holds the block
//   in `zero`   the block reads as zeros (trimmed or zeroed); never in both
//   neither     the block comes from the base (clean)
//
// The bitmap file holds two slots at offsets 0 (A) and slot_stride() (B),
// both allocated when the layer is created (the first map, sequence 1, goes
// to B; sequence n goes to slot n % 2). Each slot
// is a 64-byte header (magic, version, geometry, base and layer ids,
// sequence number, payload lengths, CRC-32 over header and payload) followed
// by the two bitmaps in CRoaring's portable format. A new map is written to
// the slot the newest valid one does not occupy, with a higher sequence, and
// then made durable with one fdatasync: no rename, no directory fsync. A
// slot torn by a crash fails its CRC, and the other slot, the previous
// durable map, is used. Loading reads both slots, checks the header against
// what the caller expects, verifies the CRC, deserialises with
// Roaring::readSafe and checks every block number against the geometry.
//
// The diff trailer's sequence field (0 in layers written before it existed)
// names a map that was durable when the trailer was written: it is updated
// after each map's fdatasync and not synced itself, so it never names a map
// newer than the newest durable one. A bitmap whose newest valid map is
// older than that has lost a map (node_view.cpp refuses it); a slot torn by
// a crash never has, since the trailer still names the map before it.
#pragma once

#include <roaring/roaring.hh>

#include <cstdint>
#include <string>

#include "storage/chunk_digests.hpp"  // generation_tag()

namespace storage {

// What a layer is: geometry and identity, the same in diff and bitmap.
struct LayerId {
  uint32_t block_size = 4096;
  uint64_t size = 0;      // bytes in the view; a multiple of block_size
  uint64_t base_tag = 0;  // identifies the base image (generation_tag())
  uint64_t layer_tag = 0; // random, chosen when the layer is created
  uint64_t blocks() const { return size / block_size; }
  bool operator==(const LayerId&) const = default;
};

// A layer's block map (see the top of this file).
struct BlockMap {
  Roaring dirty;
  Roaring zero;
  uint64_t seq = 0;  // sequence number of the slot it came from
};

// What load_map saw in the slot it did not serve.
struct OtherSlot {
  char served = 'A', name = 'B';  // slot letters
  bool written = false;  // false: never written (a new layer's first map)
  bool valid = false;
  std::string why;  // why it was rejected, when written and not valid
};

// A random non-zero layer tag.
uint64_t new_layer_tag();

inline constexpr uint32_t kMapHeaderSize = 64;
inline constexpr uint32_t kDiffTrailerSize = 4096;

// Distance between the two slots: room for the largest possible pair of maps.
uint64_t slot_stride(uint64_t blocks);
// Serialises one slot. Pure.
std::string encode_map_slot(const LayerId& id, uint64_t seq, const Roaring& dirty,
                            const Roaring& zero);
// Parses one slot. Returns false and sets *why when it is not a valid map
// for `expect` (unwritten, torn, foreign or corrupt). Pure.
bool decode_map_slot(const uint8_t* p, size_t n, const LayerId& expect, BlockMap* out,
                     std::string* why);
// The diff trailer for `id`, naming map `durable_seq` as durable (0: none).
// Pure.
std::string encode_diff_trailer(const LayerId& id, uint64_t durable_seq = 0);
bool decode_diff_trailer(const uint8_t* p, size_t n, const LayerId& expect, std::string* why,
                         uint64_t* durable_seq = nullptr);
// Where the trailer's header goes in the diff, and its bytes for map `seq`.
inline uint64_t trailer_offset(const LayerId& id) { return id.size; }
std::string trailer_header(const LayerId& id, uint64_t durable_seq);

// Synchronous helpers for attach, admin commands and imagebuilder; never on
// a loop's data path. All return false and set *err with the path and cause.
//
// Creates an empty layer: diff sized size + trailer, bitmap with both slots
// allocated and one empty map, both fsynced, and the directory too.
// Replaces existing files.
bool create_layer(const std::string& diff_path, const std::string& map_path, const LayerId& id,
                  std::string* err);
// Reads the newest valid map from `map_fd` and checks the diff's size and
// trailer, whose durable sequence goes to *durable_seq. On failure the
// layer must not be served.
bool load_layer(int diff_fd, int map_fd, const LayerId& expect, BlockMap* out, std::string* err,
                uint64_t* durable_seq = nullptr);
// Reads only the bitmap file. `expect` must carry geometry and base_tag;
// layer_tag 0 accepts any layer tag and returns it in *found. *other says
// what the slot not served held.
bool load_map(int map_fd, const LayerId& expect, BlockMap* out, LayerId* found, std::string* err,
              OtherSlot* other = nullptr);
// Records in the diff's trailer that map `seq` is durable; call only after
// the bitmap's fdatasync. Not synced: the diff's next fdatasync carries it.
bool note_durable_map(int diff_fd, const LayerId& id, uint64_t seq);
// Writes `map` with sequence map.seq + 1 into the slot it does not occupy,
// then fdatasyncs. On success map->seq is the new sequence.
bool store_map(int map_fd, const LayerId& id, BlockMap* map, std::string* err);

}  // namespace storage
