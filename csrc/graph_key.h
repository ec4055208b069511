// Cache key for a built cuDNN graph: everything that changes the graph, flattened to 64-bit words.
// Pure C++ (no torch, no cuDNN) so that it is unit-tested by gtest on any machine.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>
#include <vector>

namespace cudnn_flex {

class GraphKey {
 public:
  GraphKey& add(int64_t value);
  GraphKey& add(bool value) { return add(static_cast<int64_t>(value ? 1 : 0)); }
  GraphKey& add(int value) { return add(static_cast<int64_t>(value)); }
  // Doubles are keyed by bit pattern: two scales that differ in the last bit build two graphs.
  GraphKey& add(double value);
  // Variable-length fields are length-prefixed so that ({1,2},{3}) and ({1},{2,3}) differ.
  GraphKey& add(const std::vector<int64_t>& values);
  GraphKey& add(std::string_view text);

  size_t hash() const { return static_cast<size_t>(hash_); }
  // The key's words, for a key that outlives the process (the plan store's).
  const std::vector<int64_t>& words() const { return words_; }
  size_t size() const { return words_.size(); }
  bool operator==(const GraphKey& other) const {
    return hash_ == other.hash_ && words_ == other.words_;
  }
  bool operator!=(const GraphKey& other) const { return !(*this == other); }

 private:
  std::vector<int64_t> words_;
  uint64_t hash_ = 0x9e3779b97f4a7c15ULL;
};

struct GraphKeyHash {
  size_t operator()(const GraphKey& key) const { return key.hash(); }
};

}  // namespace cudnn_flex
