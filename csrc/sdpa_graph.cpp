#include "sdpa_graph.h"

#include <cudnn_frontend.h>

#include <sstream>
#include <utility>
#include <stdexcept>

#include "score_mod_bridge.h"

namespace fe = cudnn_frontend;

namespace cudnn_flex {

class BuiltGraph {
 public:
  std::shared_ptr<fe::graph::Graph> graph;
  int64_t workspace = 0;
  bool has_plans = false;
  std::vector<std::string> score_mod_ops;  // what the score_mods added, for describe()
  std::string score_mod_tensors;           // JSON of the score_mod tensors handed to cuDNN
};

namespace {

fe::DataType_t to_fe(DType dtype) {
  switch (dtype) {
    case DType::Half: return fe::DataType_t::HALF;
    case DType::BFloat16: return fe::DataType_t::BFLOAT16;
    case DType::Float: return fe::DataType_t::FLOAT;
    case DType::Double: return fe::DataType_t::DOUBLE;
    case DType::Int32: return fe::DataType_t::INT32;
    case DType::Int64: return fe::DataType_t::INT64;
    case DType::Bool: return fe::DataType_t::BOOLEAN;
    case DType::UInt8: return fe::DataType_t::UINT8;
  }
  throw std::invalid_argument("cudnn_flex: unknown tensor dtype");
}

// One helper describes every graph tensor, fwd and bwd alike.
fe::graph::Tensor_attributes attributes(const std::string& name, int64_t uid, const TensorDesc& d) {
  auto a = fe::graph::Tensor_attributes()
               .set_name(name)
               .set_uid(uid)
               .set_dim(d.dims)
               .set_stride(d.strides)
               .set_data_type(to_fe(d.dtype));
  if (d.by_value) a.set_is_pass_by_value(true);
  return a;
}

void set_output(const std::shared_ptr<fe::graph::Tensor_attributes>& t, const std::string& name,
                int64_t uid, const TensorDesc& d) {
  t->set_output(true).set_name(name).set_uid(uid).set_dim(d.dims).set_stride(d.strides).set_data_type(
      to_fe(d.dtype));
}

// Score_mod tensors are not registered as graph inputs up front: like cuDNN's own ALiBi slopes they
// join the graph through the ops that use them, so one the score_mod ignores is no dangling input.
bridge::TensorList make_inputs(const std::vector<TensorDesc>& tensors, const std::string& prefix,
                               int64_t first_uid) {
  bridge::TensorList out;
  for (size_t i = 0; i < tensors.size(); ++i) {
    out.push_back(std::make_shared<fe::graph::Tensor_attributes>(
        attributes(prefix + std::to_string(i), first_uid + int64_t(i), tensors[i])));
  }
  return out;
}

std::string shape(const TensorDesc& d) {
  std::ostringstream s;
  s << "[";
  for (size_t i = 0; i < d.dims.size(); ++i) s << (i ? "," : "") << d.dims[i];
  s << "]";
  return s.str();
}

// Turns a frontend error into an exception that says which step refused what problem.
void check(fe::error_t status, const char* step, const SdpaProblem& p) {
  if (status.is_good()) return;
  std::ostringstream msg;
  msg << "cudnn_flex: cuDNN refused the " << (p.pass == Pass::Forward ? "forward" : "backward")
      << " attention graph at " << step << " for q " << shape(p.q) << ", k " << shape(p.k) << ", v "
      << shape(p.v) << (p.q.dtype == DType::Half ? " float16" : " bfloat16")
      << (p.mod_id ? " with a score_mod" : "") << (p.bprop_id ? " and a score_mod_bprop" : "")
      << ". cuDNN says: " << status.get_message();
  // Refusals while validating or choosing a kernel are about the user's problem; anything later
  // is a failure of the library or the driver.
  if (status.get_code() == fe::error_code_t::GRAPH_NOT_SUPPORTED ||
      status.get_code() == fe::error_code_t::INVALID_VALUE ||
      status.get_code() == fe::error_code_t::ATTRIBUTE_NOT_SET ||
      status.get_code() == fe::error_code_t::SHAPE_DEDUCTION_FAILED ||
      status.get_code() == fe::error_code_t::HEURISTIC_QUERY_FAILED) {
    throw std::invalid_argument(msg.str());
  }
  throw std::runtime_error(msg.str());
}

}  // namespace

std::shared_ptr<const BuiltGraph> build_graph(const SdpaProblem& p, cudnnHandle_t handle) {
  bridge::begin_build();
  auto graph = std::make_shared<fe::graph::Graph>();
  graph->set_io_data_type(to_fe(p.q.dtype))
      .set_intermediate_data_type(fe::DataType_t::FLOAT)
      .set_compute_data_type(fe::DataType_t::FLOAT);
  if (p.sm_version > 0) graph->set_sm_version(static_cast<int32_t>(p.sm_version));

  // Packed sequences: each of q (and dq), o (and dO), k (and dk), v (and dv) is located by its
  // ragged offsets, [n + 1] int32 element offsets of each sequence's first token.
  std::shared_ptr<fe::graph::Tensor_attributes> ragged_q, ragged_o, ragged_k, ragged_v;
  if (p.ragged) {
    const TensorDesc offsets{{p.q.dims[0] + 1, 1, 1, 1}, {1, 1, 1, 1}, DType::Int32, false};
    ragged_q = graph->tensor(attributes("ragged_offset_q", kRaggedQ, offsets));
    ragged_o = graph->tensor(attributes("ragged_offset_o", kRaggedO, offsets));
    ragged_k = graph->tensor(attributes("ragged_offset_k", kRaggedK, offsets));
    ragged_v = graph->tensor(attributes("ragged_offset_v", kRaggedV, offsets));
  }
  auto located = [](fe::graph::Tensor_attributes a, const std::shared_ptr<fe::graph::Tensor_attributes>& offset) {
    if (offset) a.set_ragged_offset(offset);
    return a;
  };
  auto q = graph->tensor(located(attributes("Q", kQ, p.q), ragged_q));
  auto k = graph->tensor(located(attributes("K", kK, p.k), ragged_k));
  auto v = graph->tensor(located(attributes("V", kV, p.v), ragged_v));
  bridge::TensorList mod_inputs = make_inputs(p.mod_tensors, "score_mod_tensor_", kModTensorUid);
  bridge::TensorList bprop_inputs = make_inputs(p.bprop_tensors, "score_mod_bprop_tensor_", kBpropTensorUid);
  // A padded batch: cuDNN bounds its loops by the lengths (whole tiles) and the padding mask in
  // the score_mod masks inside the last partial tile (bridge::expect_padding).
  bridge::TensorPtr seq_len_q, seq_len_kv;
  if (p.padded) {
    const TensorDesc lengths{{p.q.dims[0], 1, 1, 1}, {1, 1, 1, 1}, DType::Int32, false};
    seq_len_q = graph->tensor(attributes("seq_len_q", kSeqLenQ, lengths));
    seq_len_kv = graph->tensor(attributes("seq_len_kv", kSeqLenKV, lengths));
  }
  auto score_mod = [&p, mod_inputs, seq_len_q, seq_len_kv](bridge::GraphPtr g, bridge::TensorPtr score) {
    bridge::expect_padding(seq_len_q, seq_len_kv);
    bridge::TensorPtr result = score;
    if (p.mod_id && p.pass == Pass::Backward) {
      // In a backward graph the score_mod is lowered as part of the program of the bprop that
      // follows (which continues its replay and decides what the backward refuses), so it is
      // asked for by the bprop's id.
      result = bridge::call_python(p.bprop_id ? p.bprop_id : p.mod_id, bridge::Role::BackwardScoreMod, g, score,
                                   mod_inputs);
    } else if (p.mod_id) {
      result = bridge::call_python(p.mod_id, bridge::Role::ScoreMod, g, score, mod_inputs);
    }
    result = bridge::apply_pending_padding(g, result);  // unless a band took it
    // With a bprop, or with a partial tile, cuDNN needs the tile padding masked here (see
    // minus_inf_outside_the_scores).
    const bool partial_tile = p.q.dims[2] % bridge::kWholeTile != 0 || p.k.dims[2] % bridge::kWholeTile != 0;
    if (p.pass == Pass::Backward && p.mod_id && (p.bprop_id || partial_tile)) {
      result = bridge::minus_inf_outside_the_scores(g, result, p.q.dims[2], p.k.dims[2]);
    }
    return result;
  };

  // A padded batch (or packed sequences) without a score_mod takes cuDNN's native padding mask
  // and no score_mod at all: packed documents of mixed lengths ran 1.3-1.4x faster that way than
  // with the padding pattern in a score_mod (H200, docs/benchmarks.md, docsmix).
  const bool native_padding = p.padded && !p.mod_id;
  if (p.pass == Pass::Forward) {
    auto options = fe::graph::SDPA_attributes()
                       .set_name("cudnn_flex_fwd")
                       .set_generate_stats(true)
                       .set_attn_scale(static_cast<float>(p.scale));
    if (p.mod_id) options.set_score_mod(score_mod);
    if (p.padded) options.set_seq_len_q(seq_len_q).set_seq_len_kv(seq_len_kv).set_padding_mask(native_padding);
    auto [o, stats] = graph->sdpa(q, k, v, options);
    set_output(o, "O", kO, p.o);
    if (ragged_o) o->set_ragged_offset(ragged_o);
    set_output(stats, "Stats", kLse, p.lse);
  } else {
    auto o = graph->tensor(located(attributes("O", kO, p.o), ragged_o));
    auto d_o = graph->tensor(located(attributes("dO", kDO, p.d_o), ragged_o));
    auto stats = graph->tensor(attributes("Stats", kLse, p.lse));
    auto options = fe::graph::SDPA_backward_attributes()
                       .set_name("cudnn_flex_bwd")
                       .set_attn_scale(static_cast<float>(p.scale))
                       .set_deterministic_algorithm(p.deterministic);
    if (p.mod_id) options.set_score_mod(score_mod);
    if (p.padded) options.set_seq_len_q(seq_len_q).set_seq_len_kv(seq_len_kv).set_padding_mask(native_padding);
    if (p.bprop_id) {
      options.set_score_mod_bprop([&p, bprop_inputs](bridge::GraphPtr g, bridge::TensorPtr d_p) {
        return bridge::zero_outside_the_scores(
            g, bridge::call_python(p.bprop_id, bridge::Role::Bprop, g, d_p, bprop_inputs), p.q.dims[2], p.k.dims[2]);
      });
    }
    auto [dq, dk, dv] = graph->sdpa_backward(q, k, v, o, d_o, stats, options);
    set_output(dq, "dQ", kDQ, p.dq);
    set_output(dk, "dK", kDK, p.dk);
    set_output(dv, "dV", kDV, p.dv);
    if (p.ragged) {
      dq->set_ragged_offset(ragged_q);
      dk->set_ragged_offset(ragged_k);
      dv->set_ragged_offset(ragged_v);
    }
  }

  check(graph->validate(), "validate", p);
  check(graph->build_operation_graph(handle), "build_operation_graph", p);
  // The score_mods have run by now (cuDNN calls them while lowering the SDPA node).
  if (auto unused = bridge::unused_ops(); !unused.empty()) {
    std::string ops;
    for (const auto& op : unused) ops += (ops.empty() ? "" : ", ") + op;
    throw std::invalid_argument("cudnn_flex: the score_mod computed values it never used (ops: " + ops +
                                "). cuDNN 9.19 returns wrong gradients for attention graphs with such "
                                "dangling ops, so they are refused: remove the unused computations");
  }
  auto built = std::make_shared<BuiltGraph>();
  built->graph = graph;
  built->score_mod_ops = std::exchange(bridge::op_log(), {});
  // The frontend's own JSON of each score_mod tensor as cuDNN got it (dims, strides, by value):
  // the broadcast rule of ops.cpp is visible here without a GPU.
  nlohmann::json tensors = nlohmann::json::array();
  for (const auto& t : mod_inputs) tensors.push_back(*t);
  for (const auto& t : bprop_inputs) tensors.push_back(*t);
  built->score_mod_tensors = tensors.dump();
  if (handle != nullptr) {
    check(graph->create_execution_plans({fe::HeurMode_t::A}), "create_execution_plans", p);
    check(graph->check_support(handle), "check_support", p);
    check(graph->build_plans(handle), "build_plans", p);
    check(graph->get_workspace_size(built->workspace), "get_workspace_size", p);
    built->has_plans = true;
  }
  return built;
}

int64_t workspace_size(const BuiltGraph& graph) { return graph.workspace; }

std::vector<uint8_t> serialize_plans(const BuiltGraph& built) {
  if (!built.has_plans) throw std::logic_error("cudnn_flex: a graph built for validation has no plans to store");
  std::vector<uint8_t> blob;
  fe::error_t status = built.graph->serialize(blob);
  if (status.is_bad()) throw std::runtime_error("cudnn_flex: cannot serialise the plan: " + status.get_message());
  return blob;
}

std::shared_ptr<const BuiltGraph> load_plans(const std::vector<uint8_t>& blob, cudnnHandle_t handle) {
  auto built = std::make_shared<BuiltGraph>();
  built->graph = std::make_shared<fe::graph::Graph>();
  fe::error_t status;
  try {
    // No warmup: the frontend's warmup captures a throwaway CUDA graph on a stream of its own, and
    // while it captures, work another thread puts on the legacy stream fails (CUDA error 906).
    // A loaded plan's first execute loads its kernels, as a freshly built plan's does.
    status = built->graph->deserialize(handle, blob, /*enforce_precompiled=*/false, /*run_warmup=*/false);
  } catch (const std::exception& e) {  // the frontend's UBJSON parser throws on malformed input
    throw std::runtime_error(std::string("cudnn_flex: cannot load the stored plan: ") + e.what());
  }
  if (status.is_bad()) throw std::runtime_error("cudnn_flex: cannot load the stored plan: " + status.get_message());
  status = built->graph->get_workspace_size(built->workspace);
  if (status.is_bad()) throw std::runtime_error("cudnn_flex: stored plan has no workspace size: " + status.get_message());
  built->has_plans = true;
  built->score_mod_ops = {"(loaded from the plan store)"};
  return built;
}

std::string describe(const BuiltGraph& graph) {
  std::ostringstream s;
  s << "score_mod ops:";
  for (const auto& op : graph.score_mod_ops) s << " " << op;
  s << "\n" << *graph.graph;
  s << "\nscore_mod tensors: " << graph.score_mod_tensors;
  return s.str();
}

void execute(const BuiltGraph& built, cudnnHandle_t handle,
             const std::vector<std::pair<int64_t, void*>>& uid_to_pointer, void* workspace) {
  if (!built.has_plans) throw std::logic_error("cudnn_flex: graph was built for validation only");
  std::unordered_map<fe::graph::Tensor_attributes::uid_t, void*> pack(uid_to_pointer.begin(),
                                                                       uid_to_pointer.end());
  fe::error_t status = built.graph->execute(handle, pack, workspace);
  if (status.is_bad()) {
    throw std::runtime_error(std::string("cudnn_flex: cuDNN failed to execute the attention graph: ") +
                             status.get_message());
  }
}

}  // namespace cudnn_flex
