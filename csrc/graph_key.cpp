#include "graph_key.h"

#include <algorithm>
#include <cstring>

namespace cudnn_flex {

namespace {
// splitmix64 finalizer: cheap, and every input bit affects every output bit.
uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}
}  // namespace

GraphKey& GraphKey::add(int64_t value) {
  words_.push_back(value);
  hash_ = mix(hash_ ^ mix(static_cast<uint64_t>(value)));
  return *this;
}

GraphKey& GraphKey::add(double value) {
  int64_t bits = 0;
  static_assert(sizeof(bits) == sizeof(value));
  std::memcpy(&bits, &value, sizeof(bits));
  return add(bits);
}

GraphKey& GraphKey::add(const std::vector<int64_t>& values) {
  add(static_cast<int64_t>(values.size()));
  for (int64_t v : values) add(v);
  return *this;
}

GraphKey& GraphKey::add(std::string_view text) {
  add(static_cast<int64_t>(text.size()));
  // Pack 8 characters per word.
  for (size_t i = 0; i < text.size(); i += 8) {
    int64_t word = 0;
    std::memcpy(&word, text.data() + i, std::min<size_t>(8, text.size() - i));
    add(word);
  }
  return *this;
}

}  // namespace cudnn_flex
