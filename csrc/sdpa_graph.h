// Builds the forward and backward cuDNN SDPA graphs with a score_mod, and runs them.
// This header is free of cuDNN frontend and torch includes so that ops.cpp stays quick to compile.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "graph_key.h"

typedef struct cudnnContext* cudnnHandle_t;

namespace cudnn_flex {

enum class DType : int64_t { Half = 0, BFloat16, Float, Double, Int32, Int64, Bool, UInt8 };

// Shape and layout of one graph tensor. `by_value` marks a host scalar passed at execution time.
struct TensorDesc {
  std::vector<int64_t> dims;
  std::vector<int64_t> strides;
  DType dtype = DType::Half;
  bool by_value = false;
};

enum class Pass : int64_t { Forward = 0, Backward = 1 };

// Everything that determines one graph. All tensors are BHSD views (any strides, last dim dense).
struct SdpaProblem {
  Pass pass = Pass::Forward;
  int64_t device = 0;
  TensorDesc q, k, v, o, lse;
  TensorDesc d_o, dq, dk, dv;  // backward only
  std::vector<TensorDesc> mod_tensors;    // by position; their names live with mod_id in Python
  std::vector<TensorDesc> bprop_tensors;  // backward only
  double scale = 1.0;
  bool deterministic = false;  // backward only
  int64_t mod_id = 0;          // 0: no score_mod
  int64_t bprop_id = 0;        // 0: no score_mod_bprop (dP passes through)
  // > 0: build for this SM version without a GPU, up to the operation graph (validation only).
  int64_t sm_version = 0;

  GraphKey key() const;
};

// Fixed uids of the variant pack; score_mod tensors follow from kModTensorUid / kBpropTensorUid.
enum Uid : int64_t {
  kQ = 1, kK, kV, kO, kLse, kDO, kDQ, kDK, kDV,
  kModTensorUid = 1000,
  kBpropTensorUid = 2000,
};

class BuiltGraph;  // a cuDNN frontend graph with its plans

// Builds the graph of `problem`; with `handle` == nullptr (validation) stops after the
// operation graph. Throws c10-free std exceptions: std::invalid_argument when cuDNN refuses the
// problem, std::runtime_error otherwise; Python exceptions from a score_mod pass through.
std::shared_ptr<const BuiltGraph> build_graph(const SdpaProblem& problem, cudnnHandle_t handle);

int64_t workspace_size(const BuiltGraph& graph);

// Human-readable summary of a built graph (node count, json), for tests and debugging.
std::string describe(const BuiltGraph& graph);

void execute(const BuiltGraph& graph, cudnnHandle_t handle,
             const std::vector<std::pair<int64_t, void*>>& uid_to_pointer, void* workspace);

}  // namespace cudnn_flex
