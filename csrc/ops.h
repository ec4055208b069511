// The graph cache shared by the torch ops, as module.cpp exposes it to Python.
#pragma once

#include <cstddef>

#include "graph_cache.h"

namespace cudnn_flex {

CacheStats graph_cache_stats();
void clear_graph_cache();
void set_graph_cache_capacity(size_t capacity);
// Diagnostics only: how broadcast dims of score_mod tensors are described (see ops.cpp).
void set_broadcast_repr(int64_t repr);

}  // namespace cudnn_flex
