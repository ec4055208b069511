// The on-disk plan store: keys, atomic writes, corrupt and foreign files, the size bound,
// permissions and the environment, in a temporary directory.
#include "plan_store.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <initializer_list>
#include <optional>
#include <fstream>
#include <thread>

namespace fs = std::filesystem;
using cudnn_flex::PlanStore;

namespace {

struct TempDir {
  fs::path path;
  TempDir() {
    char tmpl[] = "/tmp/cudnn_flex_plans_XXXXXX";
    path = mkdtemp(tmpl);
    fs::remove(path);  // the store must create it itself
  }
  ~TempDir() { fs::remove_all(path); }
};

std::vector<uint8_t> blob(size_t n, uint8_t seed) {
  std::vector<uint8_t> b(n);
  for (size_t i = 0; i < n; ++i) b[i] = static_cast<uint8_t>(seed + i * 7);
  return b;
}

std::vector<uint8_t> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void write_file(const std::string& path, const std::vector<uint8_t>& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

}  // namespace

TEST(PlanStore, StoresAndLoadsByKeyInAPrivateDirectory) {
  TempDir dir;
  PlanStore store(dir.path.string(), 1 << 20);
  EXPECT_FALSE(store.load("a").has_value());
  ASSERT_TRUE(store.store("a", blob(100, 1)));
  ASSERT_TRUE(store.store("b", blob(50, 2)));
  EXPECT_EQ(store.load("a"), blob(100, 1));
  EXPECT_EQ(store.load("b"), blob(50, 2));
  EXPECT_NE(store.path_of("a"), store.path_of("b"));
  struct stat st {};
  ASSERT_EQ(::stat(dir.path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0700u);
  ASSERT_EQ(::stat(store.path_of("a").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0077, 0u);
}

TEST(PlanStore, TruncatedCorruptAndForeignFilesAreMissingAndRemoved) {
  TempDir dir;
  PlanStore store(dir.path.string(), 1 << 20);
  const std::string path = store.path_of("k");
  for (int damage = 0; damage < 3; ++damage) {
    ASSERT_TRUE(store.store("k", blob(64, 3)));
    auto bytes = read_file(path);
    if (damage == 0) bytes.resize(bytes.size() - 5);          // truncated
    if (damage == 1) bytes[bytes.size() - 1] ^= 0x40;          // one flipped bit
    if (damage == 2) bytes = {'n', 'o', 't', ' ', 'a', ' ', 'p', 'l', 'a', 'n'};  // foreign
    write_file(path, bytes);
    EXPECT_FALSE(store.load("k").has_value()) << damage;
    EXPECT_FALSE(fs::exists(path)) << damage;
    ASSERT_TRUE(store.store("k", blob(64, 3)));               // rebuilt and replaced
    EXPECT_EQ(store.load("k"), blob(64, 3));
  }
}

TEST(PlanStore, AFileOthersCanWriteIsIgnored) {
  TempDir dir;
  PlanStore store(dir.path.string(), 1 << 20);
  ASSERT_TRUE(store.store("k", blob(10, 4)));
  ::chmod(store.path_of("k").c_str(), 0666);
  EXPECT_FALSE(store.load("k").has_value());
  EXPECT_TRUE(fs::exists(store.path_of("k")));  // not ours to remove either
  if (geteuid() == 0) {  // as root, a file another user owns
    ::chmod(store.path_of("k").c_str(), 0600);
    ASSERT_EQ(::chown(store.path_of("k").c_str(), 65534, 65534), 0);
    EXPECT_FALSE(store.load("k").has_value());
  }
}

TEST(PlanStore, TheDirectoryStaysUnderItsBoundDroppingTheLeastRecentlyUsed) {
  TempDir dir;
  PlanStore store(dir.path.string(), 3 * 1100);
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(store.store("k" + std::to_string(i), blob(1000, static_cast<uint8_t>(i))));
    std::this_thread::sleep_for(std::chrono::milliseconds(20));  // distinct modification times
  }
  ASSERT_TRUE(store.load("k0").has_value());  // k0 used again: k1 is now the oldest
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  ASSERT_TRUE(store.store("k3", blob(1000, 9)));
  EXPECT_TRUE(store.load("k0").has_value());
  EXPECT_FALSE(store.load("k1").has_value());
  EXPECT_TRUE(store.load("k2").has_value());
  EXPECT_TRUE(store.load("k3").has_value());
  uint64_t total = 0;
  for (const auto& e : fs::directory_iterator(dir.path)) total += fs::file_size(e.path());
  EXPECT_LE(total, 3u * 1100u);
}

TEST(PlanStore, ConcurrentWritersLeaveOneValidFile) {
  TempDir dir;
  PlanStore store(dir.path.string(), 1 << 24);
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&store, t] {
      for (int i = 0; i < 20; ++i) store.store("same", blob(4096, static_cast<uint8_t>(t)));
    });
  }
  for (auto& th : threads) th.join();
  auto loaded = store.load("same");
  ASSERT_TRUE(loaded.has_value());
  bool one_of_them = false;
  for (int t = 0; t < 8; ++t) one_of_them |= *loaded == blob(4096, static_cast<uint8_t>(t));
  EXPECT_TRUE(one_of_them);
  for (const auto& e : fs::directory_iterator(dir.path)) {
    EXPECT_EQ(e.path().extension(), ".plan") << e.path();  // no temporary file left behind
  }
}

// Restores an environment variable when it goes out of scope (other tests read HOME).
struct SavedVariable {
  explicit SavedVariable(const char* name) : name(name) {
    if (const char* v = std::getenv(name)) value = v;
  }
  ~SavedVariable() {
    if (value) ::setenv(name, value->c_str(), 1); else ::unsetenv(name);
  }
  const char* name;
  std::optional<std::string> value;
};

TEST(PlanStore, DirectoryFromTheEnvironment) {
  const SavedVariable saved[] = {SavedVariable("CUDNN_FLEX_CACHE_DIR"), SavedVariable("HOME"),
                                 SavedVariable("XDG_CACHE_HOME")};
  ::setenv("CUDNN_FLEX_CACHE_DIR", "off", 1);
  EXPECT_FALSE(PlanStore::directory_from_environment().has_value());
  ::setenv("CUDNN_FLEX_CACHE_DIR", "/somewhere/plans", 1);
  EXPECT_EQ(PlanStore::directory_from_environment(), "/somewhere/plans");
  // Unset or empty: the user's cache directory (XDG's, else ~/.cache).
  for (const char* unset : std::initializer_list<const char*>{"", nullptr}) {
    if (unset) ::setenv("CUDNN_FLEX_CACHE_DIR", unset, 1); else ::unsetenv("CUDNN_FLEX_CACHE_DIR");
    ::setenv("HOME", "/home/user", 1);
    ::setenv("XDG_CACHE_HOME", "/xdg", 1);
    EXPECT_EQ(PlanStore::directory_from_environment(), "/xdg/cudnn_flex");
    ::setenv("XDG_CACHE_HOME", "relative", 1);  // the spec says to ignore a relative path
    EXPECT_EQ(PlanStore::directory_from_environment(), "/home/user/.cache/cudnn_flex");
    ::unsetenv("XDG_CACHE_HOME");
    EXPECT_EQ(PlanStore::directory_from_environment(), "/home/user/.cache/cudnn_flex");
    ::unsetenv("HOME");
    EXPECT_FALSE(PlanStore::directory_from_environment().has_value());
  }
}

TEST(PlanStore, AnUnusableDirectoryIsNoError) {
  PlanStore store("/proc/cudnn_flex_cannot_be_here", 1 << 20);
  EXPECT_FALSE(store.store("k", blob(10, 1)));
  EXPECT_FALSE(store.load("k").has_value());
}
