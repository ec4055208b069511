// The on-disk store of built cuDNN plans, so that a new process loads a known graph in tens of
// milliseconds instead of building it (0.5-1.5 s). Torch- and cuDNN-free, tested by gtest; the
// blobs it holds are whatever the caller serialises (the frontend's Graph::serialize).
//
// Safety, since a blob is loaded into cuDNN: the directory is created private (0700); a file
// that another user owns or that others may write is ignored; every file carries a magic, its
// length and a checksum, and one that does not check out (truncated, corrupt, foreign) is
// removed and reported as missing, so the caller rebuilds. Writes go to a temporary file that is
// renamed into place, so concurrent writers leave one valid file. The directory is bounded:
// past `max_bytes` the least recently used files (by modification time, refreshed on load)
// are removed.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace cudnn_flex {

class PlanStore {
 public:
  // Where the store lives: CUDNN_FLEX_CACHE_DIR, else $XDG_CACHE_HOME/cudnn_flex, else
  // ~/.cache/cudnn_flex; nullopt (no store) for CUDNN_FLEX_CACHE_DIR=off or without a home.
  static std::optional<std::string> directory_from_environment();

  PlanStore(std::string directory, uint64_t max_bytes);

  // The blob stored under `key`, or nullopt (missing, unreadable, or refused as unsafe/corrupt).
  std::optional<std::vector<uint8_t>> load(const std::string& key);
  // Stores the blob atomically; false when the directory cannot be used (the caller goes on).
  bool store(const std::string& key, const std::vector<uint8_t>& blob);

  // The file a key maps to (a hash of the key: keys hold versions, devices and shapes).
  std::string path_of(const std::string& key) const;
  const std::string& directory() const { return directory_; }
  // Removes least recently used files until the directory holds at most max_bytes.
  void enforce_bound();

 private:
  bool ready();
  std::string directory_;
  uint64_t max_bytes_;
};

}  // namespace cudnn_flex
