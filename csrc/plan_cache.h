// Built cuDNN plans kept across processes: a graph-cache miss loads the plan from the on-disk
// store (plan_store.h) when an earlier process stored it, else builds it and stores it. Loading a
// score_mod plan took 26-32 ms on the H100 against 0.4-1.5 s to build it
// (../shared/reference/cudnn_masks.md §3).
//
// A stored plan is only as right as its key: the graph key (shapes, strides, dtypes, flags, the
// recorded programs' digests), the cuDNN and frontend versions, the GPU and its SM, and a digest
// of this library's own lowering code (set from Python at import), so that a plan lowered by
// another version of cudnn-flex is never loaded.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "sdpa_graph.h"

namespace cudnn_flex {

struct PlanStoreStats {
  int64_t loads = 0;     // plans loaded instead of built
  int64_t stores = 0;    // plans written after a build
  int64_t rejected = 0;  // stored blobs cuDNN could not load (rebuilt and replaced)
};

// Python sets this once at import; until it is set nothing is loaded or stored.
void set_plan_salt(const std::string& salt);
// The store's directory in this process (PlanStore::directory_from_environment, read on first
// use), or nullopt when it is off.
std::optional<std::string> plan_store_directory();
PlanStoreStats plan_store_stats();
void reset_plan_store_stats();  // with the graph cache's counters (clear_cache)

// The key a plan is stored under.
std::string plan_key(const GraphKey& key, const std::string& device_name, int64_t sm);

// The graph of `p`: loaded from the store when it holds one for this key, else `build()`, then
// stored. Never fails because of the store: an unusable file or directory means a build.
std::shared_ptr<const BuiltGraph> load_or_build(const SdpaProblem& p, const std::string& device_name, int64_t sm,
                                                cudnnHandle_t handle,
                                                const std::function<std::shared_ptr<const BuiltGraph>()>& build);

}  // namespace cudnn_flex
