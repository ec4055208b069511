#include "plan_store.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <sstream>

namespace cudnn_flex {
namespace {

namespace fs = std::filesystem;

// File: magic, key length, payload length, payload checksum, then the payload: the key itself
// (compared on load, so a hash collision of file names never loads another problem's plan)
// followed by the blob.
constexpr char kMagic[8] = {'C', 'F', 'P', 'L', 'A', 'N', '0', '2'};
constexpr size_t kHeader = sizeof(kMagic) + 3 * sizeof(uint64_t);
constexpr const char* kSuffix = ".plan";

// FNV-1a, 64 bit: cheap, and any truncation or flipped byte changes it.
uint64_t checksum(const uint8_t* data, size_t size) {
  uint64_t h = 0xcbf29ce484222325ULL;
  for (size_t i = 0; i < size; ++i) h = (h ^ data[i]) * 0x100000001b3ULL;
  return h;
}

std::string hex(uint64_t value) {
  char buf[17];
  std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(value));
  return buf;
}

// Only files this user owns and no one else may write are loaded into cuDNN.
bool trusted(const struct stat& st) {
  return st.st_uid == geteuid() && (st.st_mode & (S_IWGRP | S_IWOTH)) == 0 && S_ISREG(st.st_mode);
}

}  // namespace

std::optional<std::string> PlanStore::directory_from_environment() {
  const char* dir = std::getenv("CUDNN_FLEX_CACHE_DIR");
  if (dir != nullptr && std::string(dir) == "off") return std::nullopt;
  if (dir != nullptr && *dir != '\0') return std::string(dir);
  // The user's cache directory, as the XDG base directory spec places it.
  const char* xdg = std::getenv("XDG_CACHE_HOME");
  if (xdg != nullptr && *xdg == '/') return std::string(xdg) + "/cudnn_flex";
  const char* home = std::getenv("HOME");
  if (home != nullptr && *home == '/') return std::string(home) + "/.cache/cudnn_flex";
  return std::nullopt;  // nowhere to put it: no store
}

PlanStore::PlanStore(std::string directory, uint64_t max_bytes)
    : directory_(std::move(directory)), max_bytes_(max_bytes) {}

std::string PlanStore::path_of(const std::string& key) const {
  return directory_ + "/" + hex(checksum(reinterpret_cast<const uint8_t*>(key.data()), key.size())) + kSuffix;
}

bool PlanStore::ready() {
  std::error_code ec;
  fs::create_directories(directory_, ec);
  struct stat st {};
  if (::stat(directory_.c_str(), &st) != 0 || !S_ISDIR(st.st_mode) || st.st_uid != geteuid()) return false;
  if ((st.st_mode & 0777) != 0700) ::chmod(directory_.c_str(), 0700);
  return true;
}

std::optional<std::vector<uint8_t>> PlanStore::load(const std::string& key) {
  const std::string path = path_of(key);
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return std::nullopt;
  if (!trusted(st)) return std::nullopt;  // never loaded, never removed: not ours to touch
  std::ifstream in(path, std::ios::binary);
  std::vector<uint8_t> file((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  uint64_t key_length = 0, length = 0, sum = 0;
  bool ok = file.size() >= kHeader && std::memcmp(file.data(), kMagic, sizeof(kMagic)) == 0;
  if (ok) {
    std::memcpy(&key_length, file.data() + sizeof(kMagic), sizeof(uint64_t));
    std::memcpy(&length, file.data() + sizeof(kMagic) + sizeof(uint64_t), sizeof(uint64_t));
    std::memcpy(&sum, file.data() + sizeof(kMagic) + 2 * sizeof(uint64_t), sizeof(uint64_t));
    ok = length == file.size() - kHeader && key_length <= length &&
         checksum(file.data() + kHeader, length) == sum;
  }
  if (!ok) {
    ::unlink(path.c_str());  // truncated, corrupt or foreign: rebuilt and replaced by the caller
    return std::nullopt;
  }
  if (std::string(file.begin() + kHeader, file.begin() + kHeader + key_length) != key) {
    return std::nullopt;  // another key with the same file name: not ours, left as it is
  }
  ::utimensat(AT_FDCWD, path.c_str(), nullptr, 0);  // recently used
  return std::vector<uint8_t>(file.begin() + kHeader + key_length, file.end());
}

bool PlanStore::store(const std::string& key, const std::vector<uint8_t>& blob) {
  if (!ready()) return false;
  static std::atomic<uint64_t> counter{0};
  const std::string path = path_of(key);
  const std::string tmp = path + ".tmp." + std::to_string(::getpid()) + "." + std::to_string(counter++);
  {
    const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL, 0600);
    if (fd < 0) return false;
    const uint64_t key_length = key.size(), length = key.size() + blob.size();
    std::vector<uint8_t> file(kHeader + length);
    uint8_t* payload = file.data() + kHeader;
    if (!key.empty()) std::memcpy(payload, key.data(), key.size());
    if (!blob.empty()) std::memcpy(payload + key.size(), blob.data(), blob.size());
    const uint64_t sum = checksum(payload, length);
    std::memcpy(file.data(), kMagic, sizeof(kMagic));
    std::memcpy(file.data() + sizeof(kMagic), &key_length, sizeof(uint64_t));
    std::memcpy(file.data() + sizeof(kMagic) + sizeof(uint64_t), &length, sizeof(uint64_t));
    std::memcpy(file.data() + sizeof(kMagic) + 2 * sizeof(uint64_t), &sum, sizeof(uint64_t));
    size_t written = 0;
    while (written < file.size()) {
      const ssize_t n = ::write(fd, file.data() + written, file.size() - written);
      if (n <= 0) break;
      written += static_cast<size_t>(n);
    }
    const bool ok = written == file.size() && ::fsync(fd) == 0;
    ::close(fd);
    if (!ok) {
      ::unlink(tmp.c_str());
      return false;
    }
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {  // atomic: readers see the old or the new file
    ::unlink(tmp.c_str());
    return false;
  }
  enforce_bound();
  return true;
}

void PlanStore::enforce_bound() {
  struct Entry {
    fs::path path;
    fs::file_time_type used;
    uint64_t size;
  };
  std::vector<Entry> entries;
  uint64_t total = 0;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(directory_, ec)) {
    if (e.path().extension() != kSuffix || !e.is_regular_file(ec)) continue;
    entries.push_back({e.path(), e.last_write_time(ec), static_cast<uint64_t>(e.file_size(ec))});
    total += entries.back().size;
  }
  std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) { return a.used < b.used; });
  for (const auto& e : entries) {
    if (total <= max_bytes_) break;
    fs::remove(e.path, ec);
    total -= e.size;
  }
}

}  // namespace cudnn_flex
