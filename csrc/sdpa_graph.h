// Builds the forward and backward cuDNN SDPA graphs with a score_mod, and runs them.
// This header is free of cuDNN frontend and torch includes so that ops.cpp stays quick to compile.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "problem.h"  // SdpaProblem, TensorDesc, DType, Pass and the graph key

typedef struct cudnnContext* cudnnHandle_t;

namespace cudnn_flex {

// Fixed uids of the variant pack; score_mod tensors follow from kModTensorUid / kBpropTensorUid.
enum Uid : int64_t {
  kQ = 1, kK, kV, kO, kLse, kDO, kDQ, kDK, kDV, kSeqLenQ, kSeqLenKV,
  kRaggedQ, kRaggedO, kRaggedK, kRaggedV,  // ragged offsets: q and dq, o and dO, k and dk, v and dv
  kModTensorUid = 1000,
  kBpropTensorUid = 2000,
};

class BuiltGraph;  // a cuDNN frontend graph with its plans

// Builds the graph of `problem`; with `handle` == nullptr (validation) stops after the
// operation graph. Throws c10-free std exceptions: std::invalid_argument when cuDNN refuses the
// problem, std::runtime_error otherwise; Python exceptions from a score_mod pass through.
std::shared_ptr<const BuiltGraph> build_graph(const SdpaProblem& problem, cudnnHandle_t handle);

int64_t workspace_size(const BuiltGraph& graph);

// A built graph with its plans as the frontend serialises it (structure and plan), for the plan
// store; and a graph with plans loaded from such a blob (no score_mod runs, no kernel is
// compiled). load_plans throws std::runtime_error when cuDNN cannot load the blob.
std::vector<uint8_t> serialize_plans(const BuiltGraph& graph);
std::shared_ptr<const BuiltGraph> load_plans(const std::vector<uint8_t>& blob, cudnnHandle_t handle);

// Human-readable summary of a built graph (node count, json), for tests and debugging.
std::string describe(const BuiltGraph& graph);

void execute(const BuiltGraph& graph, cudnnHandle_t handle,
             const std::vector<std::pair<int64_t, void*>>& uid_to_pointer, void* workspace);

}  // namespace cudnn_flex
