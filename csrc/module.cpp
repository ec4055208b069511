// The Python module cudnn_flex._C: bridge types, graph cache control, versions. Importing it also
// registers the torch ops defined in ops.cpp.
#include <cudnn.h>
#include <cudnn_frontend_version.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "copied_views.h"
#include "ops.h"
#include "plan_cache.h"
#include "score_mod_bridge.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "cudnn_flex native extension";
  cudnn_flex::bridge::bind(m);
  cudnn_flex::bind_eager_fwd(m);
  cudnn_flex::bind_copied_views(m);

  m.def("cache_stats", [] {
    auto s = cudnn_flex::graph_cache_stats();
    py::dict d;
    d["hits"] = s.hits;
    d["misses"] = s.misses;
    d["builds"] = s.builds;
    d["evictions"] = s.evictions;
    d["size"] = s.size;
    d["capacity"] = s.capacity;
    auto plans = cudnn_flex::plan_store_stats();
    d["plan_loads"] = plans.loads;
    d["plan_stores"] = plans.stores;
    d["plan_rejected"] = plans.rejected;
    return d;
  }, "Counters of the graph cache (hits, misses, builds, evictions, size, capacity; a build is a "
     "plan loaded or built) and of the plan store (plan_loads, plan_stores, plan_rejected).");
  m.def("plan_store_directory", &cudnn_flex::plan_store_directory,
        "Where built plans are stored for later processes, or None when the store is off: "
        "CUDNN_FLEX_CACHE_DIR, else $XDG_CACHE_HOME/cudnn_flex, else ~/.cache/cudnn_flex; "
        "CUDNN_FLEX_CACHE_DIR=off turns it off.");
  m.def("_set_plan_salt", &cudnn_flex::set_plan_salt, py::arg("salt"),
        "A digest of cudnn_flex's lowering code: part of every stored plan's key.");
  m.def("clear_cache", [] {
    cudnn_flex::clear_graph_cache();
    cudnn_flex::reset_plan_store_stats();
  }, "Drops every cached graph (plans on disk stay) and zeroes the counters.");
  m.def("set_cache_capacity", [](int64_t capacity) {
    if (capacity < 0) throw py::value_error("cudnn_flex: cache capacity must be >= 0");
    cudnn_flex::set_graph_cache_capacity(static_cast<size_t>(capacity));
  }, py::arg("capacity"), "Bounds the graph cache (LRU); 0 disables caching.");
  m.def("_set_broadcast_repr", [](int64_t repr) {
    if (repr < 0 || repr > 2) throw py::value_error("cudnn_flex: broadcast repr must be 0, 1 or 2");
    cudnn_flex::set_broadcast_repr(repr);
  }, py::arg("repr"), "Diagnostics only: how broadcast dims of score_mod tensors are described.");
  m.def("versions", [] {
    py::dict d;
    d["cudnn_runtime"] = static_cast<int64_t>(cudnnGetVersion());
    d["cudnn_headers"] = static_cast<int64_t>(CUDNN_VERSION);
    d["cudnn_frontend"] = static_cast<int64_t>(CUDNN_FRONTEND_VERSION);
    return d;
  }, "cuDNN runtime, cuDNN headers and cuDNN frontend versions (as integers, e.g. 91900).");
}
