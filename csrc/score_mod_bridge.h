// The pybind11 view of a cuDNN frontend graph that a Python score_mod receives while a graph is
// being built, and the call into Python that hands it over.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace cudnn_frontend::graph {
class Graph;
class Tensor_attributes;
}  // namespace cudnn_frontend::graph

namespace pybind11 {
class module_;
}

namespace cudnn_flex::bridge {

using TensorPtr = std::shared_ptr<cudnn_frontend::graph::Tensor_attributes>;
using GraphPtr = std::shared_ptr<cudnn_frontend::graph::Graph>;
using TensorList = std::vector<TensorPtr>;

// Which part of a graph a callback lowers: the score_mod of a forward graph, the score_mod of a
// backward graph whose bprop follows, or that bprop.
enum class Role : int64_t { ScoreMod = 0, BackwardScoreMod = 1, Bprop = 2 };

// Calls the Python dispatcher with (callable_id, graph, input, [tensors], role) with the GIL
// held; it lowers that part of the recorded program with that id. Returns the graph tensor
// produced. Python exceptions propagate as pybind11::error_already_set.
TensorPtr call_python(int64_t callable_id, Role role, const GraphPtr& graph, const TensorPtr& input,
                      const TensorList& tensors);

// The padding of a partial tile. When Sq or Skv is not a multiple of cuDNN's tile and a backward
// graph has a bprop, cuDNN 9.19 computed NaN dV for every bprop but a plain pass-through of dP
// (`1 - s/2`, softcap-free `s * s`, sin, sqrt(|s| + 1), ...; right at Sq = Skv = 128, NaN at 129;
// measured on the H100, scripts/gpu_backward_probe.py), unless the backward's score_mod masks the
// padding itself, as the frontend's own padding mask does. So a backward graph with a bprop gets
// its score_mod's result with -inf outside the [s_q, s_kv] scores, and its bprop's result with 0
// there (garbage dP times P = 0 would be NaN otherwise). A score_mod whose values grow with q_idx
// needs it too, bprop or not: the padding rows of the last query tile (q_idx >= Sq) are scored
// like the others, and cuDNN's backward takes exp of them; `score + 0.5 * (q_idx - kv_idx)` at
// Sq = 129, Skv = 64 reached exp(127) = inf there, and inf * 0 made dK and dV NaN (right at 127
// x 127, where the padding's largest value is 63; measured on the H100, test_gpu_correctness).
// Masked whenever Sq or Skv is not a multiple of kWholeTile (no padding then: the mask would
// cost pointwise ops for nothing).
constexpr int64_t kWholeTile = 128;
TensorPtr minus_inf_outside_the_scores(const GraphPtr& g, TensorPtr value, int64_t s_q, int64_t s_kv);
TensorPtr zero_outside_the_scores(const GraphPtr& g, TensorPtr value, int64_t s_q, int64_t s_kv);

// The padding mask of a padded batch (seq_len tensors [B,1,1,1] int32), in the frontend's own
// pattern (attn::score_modifiers::padding_mask: INT32 indices, CMP_LT against the lengths,
// LOGICAL_AND, select -inf): a plain compare against the lengths was wrong on the H100, and with
// this pattern cuDNN masks the last partial tile right (../shared/reference/cudnn_masks.md §2).
// It goes where the frontend puts it: after the user's ops, before a diagonal band.
// expect_padding arms it for the score_mod about to be lowered (nullptrs: no padding); a band
// applies it to its input; apply_pending_padding applies it when nothing has yet.
void expect_padding(TensorPtr seq_len_q, TensorPtr seq_len_kv);
TensorPtr apply_pending_padding(const GraphPtr& g, TensorPtr value);

// Starts a new graph build on this thread: tensors kept from earlier builds become invalid, and
// the op log is emptied.
void begin_build();

// The pointwise ops the score_mods added on this thread since begin_build(), in order, e.g.
// "GEN_INDEX", "CMP_GE": what cuDNN fuses into the attention kernel.
std::vector<std::string>& op_log();

// The ops the score_mods of this build added but whose results reach no callback's result, by
// op name. cuDNN 9.19 computes wrong dV for graphs with such dangling ops, so they are refused.
std::vector<std::string> unused_ops();

// Registers the Graph, Tensor and data_type classes and the dispatcher setter on `m`.
void bind(pybind11::module_& m);

}  // namespace cudnn_flex::bridge
