// The graph cache shared by the torch ops and the forward's Python binding, as module.cpp exposes them.
#pragma once

#include <cstddef>

#include <pybind11/pybind11.h>

#include "graph_cache.h"

namespace cudnn_flex {

CacheStats graph_cache_stats();
void clear_graph_cache();
void set_graph_cache_capacity(size_t capacity);
// Diagnostics only: how broadcast dims of score_mod tensors are described (see ops.cpp).
void set_broadcast_repr(int64_t repr);
// _C.fwd: the forward op called from Python without torch.ops' boxing (autograd.cpp).
void bind_eager_fwd(pybind11::module& m);

}  // namespace cudnn_flex
