// The description of one attention graph (SdpaProblem) and its cache key: which fields decide
// which graph is built. Free of torch and the cuDNN frontend so that gtest covers it on any
// machine (tests/cpp/test_problem_key.cpp).
#pragma once

#include <cstdint>
#include <vector>

#include "graph_key.h"

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
  // A padded batch: int32 [B] valid lengths of q and kv (seq_len tensors, read at execution), and
  // the padding mask inside the score_mod; cuDNN skips the tiles past the lengths.
  bool padded = false;
  // Packed sequences (THD): q, k, v, o and the gradients are [n, H, max_s, D] views of token-major
  // storage located by ragged offsets (cu_seqlens times the token stride, read at execution).
  // Always padded too (the seq_len tensors are the sequence lengths).
  bool ragged = false;
  // > 0: build for this SM version without a GPU, up to the operation graph (validation only).
  int64_t sm_version = 0;

  // Every field that changes the graph; the backward-only fields count in the backward only.
  GraphKey key() const;
};

}  // namespace cudnn_flex
