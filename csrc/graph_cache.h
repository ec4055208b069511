// Thread-safe bounded LRU cache of built graphs, with counters that Python can read.
// Header-only template so that gtest exercises the same code with plain values.
#pragma once

#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <utility>

#include "graph_key.h"

namespace cudnn_flex {

struct CacheStats {
  int64_t hits = 0;
  int64_t misses = 0;
  int64_t builds = 0;
  int64_t evictions = 0;
  int64_t size = 0;
  int64_t capacity = 0;
};

template <class Value>
class LruCache {
 public:
  using ValuePtr = std::shared_ptr<const Value>;

  explicit LruCache(size_t capacity) : capacity_(capacity) {}

  // Returns the cached value, or builds it with `build` outside the lock (a build may call back
  // into Python and take the GIL, so holding the cache lock there could deadlock). When
  // `cacheable` is false the value is built and returned but never stored.
  ValuePtr get_or_build(const GraphKey& key, bool cacheable, const std::function<ValuePtr()>& build) {
    if (cacheable) {
      if (ValuePtr hit = find(key)) return hit;
    } else {
      std::lock_guard<std::mutex> lock(mutex_);
      ++stats_.misses;
    }
    ValuePtr built = build();  // throws: nothing stored, counters say a miss without a build
    {
      std::lock_guard<std::mutex> lock(mutex_);
      ++stats_.builds;
    }
    if (cacheable) insert(key, built);
    return built;
  }

  ValuePtr find(const GraphKey& key) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = index_.find(key);
    if (it == index_.end()) {
      ++stats_.misses;
      return nullptr;
    }
    ++stats_.hits;
    order_.splice(order_.begin(), order_, it->second);  // most recently used first
    return it->second->second;
  }

  void insert(const GraphKey& key, ValuePtr value) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = index_.find(key);
    if (it != index_.end()) {
      // Another thread built the same graph concurrently: keep the one already shared.
      order_.splice(order_.begin(), order_, it->second);
      return;
    }
    order_.emplace_front(key, std::move(value));
    index_.emplace(key, order_.begin());
    evict_beyond_capacity_locked();
  }

  void set_capacity(size_t capacity) {
    std::lock_guard<std::mutex> lock(mutex_);
    capacity_ = capacity;
    evict_beyond_capacity_locked();
  }

  // Drops every entry and zeroes the counters (the capacity stays).
  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    index_.clear();
    order_.clear();
    stats_ = CacheStats{};
  }

  CacheStats stats() const {
    std::lock_guard<std::mutex> lock(mutex_);
    CacheStats out = stats_;
    out.size = static_cast<int64_t>(order_.size());
    out.capacity = static_cast<int64_t>(capacity_);
    return out;
  }

 private:
  void evict_beyond_capacity_locked() {
    while (order_.size() > capacity_) {
      index_.erase(order_.back().first);
      order_.pop_back();  // the graph (and its cuDNN plans) is released here unless still in use
      ++stats_.evictions;
    }
  }

  using Entry = std::pair<GraphKey, ValuePtr>;
  mutable std::mutex mutex_;
  size_t capacity_;
  std::list<Entry> order_;
  std::unordered_map<GraphKey, typename std::list<Entry>::iterator, GraphKeyHash> index_;
  CacheStats stats_;
};

}  // namespace cudnn_flex
