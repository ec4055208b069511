#include <gtest/gtest.h>

#include <atomic>
#include <stdexcept>
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
