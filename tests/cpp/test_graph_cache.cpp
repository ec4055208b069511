#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <stdexcept>
#include <string_view>
#include <thread>
#include <vector>

#include "graph_cache.h"

using cudnn_flex::GraphKey;
using cudnn_flex::LruCache;

namespace {
GraphKey key_of(int64_t i) {
  GraphKey k;
  k.add(i);
  return k;
}
using Cache = LruCache<int>;
Cache::ValuePtr value(int v) { return std::make_shared<const int>(v); }
}  // namespace

TEST(LruCache, SecondLookupHitsWithoutBuilding) {
  Cache cache(4);
  int builds = 0;
  auto build = [&] { ++builds; return value(7); };
  EXPECT_EQ(*cache.get_or_build(key_of(1), true, build), 7);
  EXPECT_EQ(*cache.get_or_build(key_of(1), true, build), 7);
  EXPECT_EQ(builds, 1);
  auto s = cache.stats();
  EXPECT_EQ(s.hits, 1);
  EXPECT_EQ(s.misses, 1);
  EXPECT_EQ(s.builds, 1);
  EXPECT_EQ(s.size, 1);
}

TEST(LruCache, EvictsLeastRecentlyUsed) {
  Cache cache(2);
  cache.get_or_build(key_of(1), true, [] { return value(1); });
  cache.get_or_build(key_of(2), true, [] { return value(2); });
  cache.get_or_build(key_of(1), true, [] { return value(-1); });  // touch 1: 2 is now oldest
  cache.get_or_build(key_of(3), true, [] { return value(3); });
  EXPECT_NE(cache.find(key_of(1)), nullptr);
  EXPECT_EQ(cache.find(key_of(2)), nullptr);
  EXPECT_NE(cache.find(key_of(3)), nullptr);
  EXPECT_EQ(cache.stats().evictions, 1);
  EXPECT_EQ(cache.stats().size, 2);
}

TEST(LruCache, EvictedValueLivesWhileInUse) {
  Cache cache(1);
  auto held = cache.get_or_build(key_of(1), true, [] { return value(11); });
  cache.get_or_build(key_of(2), true, [] { return value(22); });
  EXPECT_EQ(cache.find(key_of(1)), nullptr);
  EXPECT_EQ(*held, 11);  // a caller still executing an evicted graph keeps it alive
  EXPECT_EQ(held.use_count(), 1);
}

TEST(LruCache, ShrinkingCapacityEvicts) {
  Cache cache(8);
  for (int i = 0; i < 8; ++i) cache.get_or_build(key_of(i), true, [i] { return value(i); });
  cache.set_capacity(3);
  EXPECT_EQ(cache.stats().size, 3);
  EXPECT_EQ(cache.stats().evictions, 5);
  EXPECT_NE(cache.find(key_of(7)), nullptr);
  EXPECT_EQ(cache.find(key_of(0)), nullptr);
}

TEST(LruCache, UncacheableIsBuiltEveryTimeAndNeverStored) {
  Cache cache(4);
  int builds = 0;
  for (int i = 0; i < 3; ++i) cache.get_or_build(key_of(1), false, [&] { ++builds; return value(1); });
  EXPECT_EQ(builds, 3);
  EXPECT_EQ(cache.stats().size, 0);
  EXPECT_EQ(cache.stats().builds, 3);
}

TEST(LruCache, FailedBuildStoresNothingAndNextCallBuilds) {
  Cache cache(4);
  EXPECT_THROW(cache.get_or_build(key_of(1), true, []() -> Cache::ValuePtr { throw std::runtime_error("no"); }),
               std::runtime_error);
  EXPECT_EQ(cache.stats().size, 0);
  EXPECT_EQ(cache.stats().builds, 0);
  EXPECT_EQ(*cache.get_or_build(key_of(1), true, [] { return value(5); }), 5);
  EXPECT_EQ(cache.stats().builds, 1);
}

TEST(LruCache, ClearDropsEntriesAndCounters) {
  Cache cache(4);
  cache.get_or_build(key_of(1), true, [] { return value(1); });
  cache.clear();
  auto s = cache.stats();
  EXPECT_EQ(s.size, 0);
  EXPECT_EQ(s.hits + s.misses + s.builds, 0);
  EXPECT_EQ(s.capacity, 4);
}

TEST(LruCache, ConcurrentCallersStayBoundedAndConsistent) {
  constexpr int kThreads = 8, kCalls = 2000, kKeys = 64, kCapacity = 16;
  Cache cache(kCapacity);
  std::atomic<int> wrong{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kCalls; ++i) {
        int k = (i * 7 + t * 13) % kKeys;
        auto v = cache.get_or_build(key_of(k), true, [k] { return value(k * 10); });
        if (*v != k * 10) ++wrong;
        if (cache.stats().size > kCapacity) ++wrong;
      }
    });
  }
  for (auto& th : threads) th.join();
  auto s = cache.stats();
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_LE(s.size, kCapacity);
  EXPECT_EQ(s.hits + s.misses, int64_t{kThreads} * kCalls);
  EXPECT_GE(s.builds, kKeys);
}

// The stress test below is meant for the ThreadSanitizer build (scripts/tsan.sh); it also runs, and
// checks its invariants, in the normal build.
namespace {
// A value that counts its live instances, so that the tests can see evicted entries released.
struct Tracked {
  static std::atomic<int> live;
  int v;
  explicit Tracked(int value) : v(value) { ++live; }
  ~Tracked() { --live; }
  Tracked(const Tracked&) = delete;
  Tracked& operator=(const Tracked&) = delete;
};
std::atomic<int> Tracked::live{0};
using TrackedCache = LruCache<Tracked>;

// Keys of every field kind (ints, vectors, doubles, strings, bools), as a graph key has.
GraphKey mixed_key(int k) {
  static constexpr std::string_view kNames[] = {"bias", "slopes", "a_much_longer_score_mod_name"};
  GraphKey key;
  key.add(int64_t{k % 5})
      .add(std::vector<int64_t>{k, 2, 128 + k, k % 3})
      .add(1.0 / (1.0 + k))
      .add(kNames[k % 3])
      .add((k & 1) != 0);
  return key;
}
bool throws(int k) { return k % 7 == 3; }      // these builds raise, like a failing score_mod
bool cacheable(int k) { return k % 5 != 1; }   // these are built every call, like a closure
}  // namespace

TEST(LruCache, StressMixedKeysThrowingBuildsClearAndResizeConcurrently) {
  constexpr int kWorkers = 6, kCalls = 20000, kKeys = 97;
  std::vector<GraphKey> serial_keys;
  for (int k = 0; k < kKeys; ++k) serial_keys.push_back(mixed_key(k));
  {
    TrackedCache cache(16);
    std::atomic<int> wrong{0}, unexpected_throw{0}, missing_throw{0}, oversize{0}, threw{0}, resizes{0};
    std::atomic<int> workers_left{kWorkers};
    std::vector<std::thread> threads;
    for (int t = 0; t < kWorkers; ++t) {
      threads.emplace_back([&, t] {
        for (int i = 0; i < kCalls; ++i) {
          const int k = (i * 31 + t * 17 + i / 7) % kKeys;
          const GraphKey key = mixed_key(k);  // built in this thread: equal to the serial one
          if (key != serial_keys[k] || key.hash() != serial_keys[k].hash()) ++wrong;
          try {
            auto v = cache.get_or_build(key, cacheable(k), [k]() -> TrackedCache::ValuePtr {
              if (throws(k)) throw std::runtime_error("score_mod raised");
              return std::make_shared<const Tracked>(k * 10);
            });
            if (throws(k)) ++missing_throw;
            if (!v || v->v != k * 10) ++wrong;
          } catch (const std::runtime_error&) {
            ++threw;
            if (!throws(k)) ++unexpected_throw;
          }
        }
        --workers_left;
      });
    }
    // Resizes (down to 0) and clears while the workers look up, insert and evict.
    threads.emplace_back([&] {
      for (int i = 0; workers_left.load() > 0; ++i) {
        if (i % 13 == 0) {
          cache.clear();
        } else {
          cache.set_capacity(i % 5 == 0 ? 0 : static_cast<size_t>(i % 24));
        }
        ++resizes;
        std::this_thread::yield();
      }
    });
    // Reads the counters concurrently: a snapshot never shows more entries than its capacity.
    threads.emplace_back([&] {
      while (workers_left.load() > 0) {
        auto s = cache.stats();
        if (s.size > s.capacity || s.size < 0 || s.hits < 0 || s.misses < 0) ++oversize;
        std::this_thread::yield();
      }
    });
    for (auto& th : threads) th.join();
    EXPECT_EQ(wrong.load(), 0);
    EXPECT_EQ(unexpected_throw.load(), 0);
    EXPECT_EQ(missing_throw.load(), 0);
    EXPECT_EQ(oversize.load(), 0);
    EXPECT_GT(threw.load(), 0);
    EXPECT_GT(resizes.load(), 0);

    // Afterwards the cache is consistent: right values, no entry for a failed or uncacheable build.
    cache.set_capacity(kKeys);
    for (int k = 0; k < kKeys; ++k) {
      auto hit = cache.find(serial_keys[k]);
      if (hit) {
        EXPECT_EQ(hit->v, k * 10) << k;
      }
      if (throws(k) || !cacheable(k)) {
        EXPECT_EQ(hit, nullptr) << k;
      }
    }
    EXPECT_EQ(Tracked::live.load(), cache.stats().size);  // evicted values were released
    cache.clear();
    EXPECT_EQ(Tracked::live.load(), 0);
  }
  EXPECT_EQ(Tracked::live.load(), 0);
}

TEST(LruCache, EvictedValuesAreReleasedAndLiveCountStaysBounded) {
  TrackedCache cache(2);
  int peak = 0;
  for (int k = 0; k < 40; ++k) {
    cache.get_or_build(mixed_key(k), true, [k] { return std::make_shared<const Tracked>(k); });
    peak = std::max(peak, Tracked::live.load());
  }
  EXPECT_EQ(peak, 2);  // 40 values built, never more than the capacity alive between calls
  EXPECT_EQ(Tracked::live.load(), 2);
  EXPECT_EQ(cache.stats().evictions, 38);
  cache.set_capacity(0);
  EXPECT_EQ(Tracked::live.load(), 0);
}
