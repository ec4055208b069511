// Autograd of torch.ops.cudnn_flex.fwd, in C++: a Python autograd kernel cost ~110 us of host
// time per call on the H100 machine (scripts/host_profile.py), more than the rest of the call.
// Registered on the Autograd key, so eager mode, AOTAutograd (torch.compile) and opcheck see the
// same backward: torch.ops.cudnn_flex.bwd.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

namespace cudnn_flex {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor> call_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                            at::TensorList mod_tensors, at::TensorList bprop_tensors,
                                            int64_t mod_id, int64_t bprop_id, bool cacheable,
                                            std::optional<double> scale, bool deterministic, at::TensorList seq_lens,
                                            at::TensorList cu_seqlens, at::IntArrayRef max_seqlens,
                                            bool every_row_attends) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("cudnn_flex::fwd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, at::TensorList,
                           at::TensorList, int64_t, int64_t, bool, std::optional<double>, bool, at::TensorList,
                           at::TensorList, at::IntArrayRef, bool)>();
  return op.call(q, k, v, mod_tensors, bprop_tensors, mod_id, bprop_id, cacheable, scale, deterministic, seq_lens,
                 cu_seqlens, max_seqlens, every_row_attends);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, at::TensorList mod_tensors, at::TensorList bprop_tensors,
    int64_t mod_id, int64_t bprop_id, bool cacheable, std::optional<double> scale, bool deterministic,
    at::TensorList seq_lens, at::TensorList cu_seqlens, at::IntArrayRef max_seqlens) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("cudnn_flex::bwd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, at::TensorList, at::TensorList, int64_t,
                           int64_t, bool, std::optional<double>, bool, at::TensorList, at::TensorList,
                           at::IntArrayRef)>();
  return op.call(grad_out, q, k, v, out, lse, mod_tensors, bprop_tensors, mod_id, bprop_id, cacheable,
                 scale, deterministic, seq_lens, cu_seqlens, max_seqlens);
}

// A gradient g through lse, folded into the one backward cuDNN has. d lse_i / d S_ij = P_ij, so
// dS gains P_ij g_i. cuDNN computes dS = P (dO V^T - rowsum(dO O)); with V' = [V | 1 | 0],
// O' = [O | 0] and dO' = [dO | g | 0] the row sum is unchanged and dO' V'^T = dO V^T + g, so the
// backward of (dO', V', O') gives dS + P g, hence dQ and dK with lse's part; dV is the first Dv
// columns of dV'. Eight extra columns keep the head dim a multiple of 8 (cuDNN needs it).
// torch.compile always hands this backward a (zero) lse gradient when lse is returned: it can
// not know whether the loss reads it. Returns (dO', V', O').
std::tuple<at::Tensor, at::Tensor, at::Tensor> with_lse_gradient(const at::Tensor& grad_out,
                                                                 const at::Tensor& grad_lse, const at::Tensor& v,
                                                                 const at::Tensor& out) {
  constexpr int64_t kExtra = 8;
  TORCH_CHECK_NOT_IMPLEMENTED(v.size(-1) + kExtra <= 256,
                              "cudnn_flex: a gradient through the returned lse needs a value head dim of at "
                              "most 248 (cuDNN's backward takes 256 and this adds 8 columns), got ",
                              v.size(-1), "; use lse.detach() in the loss, or return_lse=False");
  auto widened = [](const at::Tensor& t, const std::optional<at::Tensor>& first_column) {
    auto sizes = t.sizes().vec();
    sizes.back() = kExtra;
    at::Tensor extra = at::zeros(sizes, t.options());
    if (first_column) extra.select(-1, 0).copy_(*first_column);
    return at::cat({t, extra}, -1);
  };
  at::Tensor ones = at::ones({}, v.options()).expand(v.sizes().slice(0, v.dim() - 1));
  at::Tensor g = grad_lse.reshape(out.sizes().slice(0, out.dim() - 1)).to(grad_out.scalar_type());
  return {widened(grad_out, g), widened(v, ones), widened(out, std::nullopt)};
}

class FlexAttentionFunction : public torch::autograd::Function<FlexAttentionFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, std::vector<at::Tensor> mod_tensors,
                               std::vector<at::Tensor> bprop_tensors, int64_t mod_id, int64_t bprop_id,
                               bool cacheable, std::optional<double> scale, bool deterministic,
                               std::vector<at::Tensor> seq_lens, std::vector<at::Tensor> cu_seqlens,
                               std::vector<int64_t> max_seqlens, bool every_row_attends) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, lse] = call_fwd(q, k, v, mod_tensors, bprop_tensors, mod_id, bprop_id, cacheable, scale,
                               deterministic, seq_lens, cu_seqlens, max_seqlens, every_row_attends);
    // Saving the score_mod tensors makes autograd's version check catch an in-place change of
    // one of them between forward and backward.
    variable_list saved{q, k, v, out, lse};
    saved.insert(saved.end(), mod_tensors.begin(), mod_tensors.end());
    saved.insert(saved.end(), bprop_tensors.begin(), bprop_tensors.end());
    saved.insert(saved.end(), seq_lens.begin(), seq_lens.end());
    saved.insert(saved.end(), cu_seqlens.begin(), cu_seqlens.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["n_seq_lens"] = static_cast<int64_t>(seq_lens.size());
    ctx->saved_data["max_seqlens"] = max_seqlens;
    ctx->saved_data["n_mod"] = static_cast<int64_t>(mod_tensors.size());
    ctx->saved_data["n_bprop"] = static_cast<int64_t>(bprop_tensors.size());
    ctx->saved_data["mod_id"] = mod_id;
    ctx->saved_data["bprop_id"] = bprop_id;
    ctx->saved_data["cacheable"] = cacheable;
    ctx->saved_data["scale"] = scale.has_value() ? c10::IValue(*scale) : c10::IValue();
    ctx->saved_data["deterministic"] = deterministic;
    // Unused outputs then arrive undefined, so a gradient through lse can be told apart from none.
    ctx->set_materialize_grads(false);
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list saved = ctx->get_saved_variables();
    const int64_t n_mod = ctx->saved_data["n_mod"].toInt();
    std::vector<at::Tensor> mod_tensors(saved.begin() + 5, saved.begin() + 5 + n_mod);
    const int64_t n_bprop = ctx->saved_data["n_bprop"].toInt();
    std::vector<at::Tensor> bprop_tensors(saved.begin() + 5 + n_mod, saved.begin() + 5 + n_mod + n_bprop);
    const int64_t n_seq_lens = ctx->saved_data["n_seq_lens"].toInt();
    const auto lists = saved.begin() + 5 + n_mod + n_bprop;
    std::vector<at::Tensor> seq_lens(lists, lists + n_seq_lens);
    std::vector<at::Tensor> cu_seqlens(lists + n_seq_lens, saved.end());
    const std::vector<int64_t> max_seqlens = ctx->saved_data["max_seqlens"].toIntVector();
    const c10::IValue& scale_value = ctx->saved_data["scale"];
    std::optional<double> scale;
    if (!scale_value.isNone()) scale = scale_value.toDouble();
    at::Tensor grad_out = grads[0].defined() ? grads[0] : at::zeros_like(saved[3]);
    at::Tensor v = saved[2], out = saved[3];
    TORCH_CHECK_NOT_IMPLEMENTED(!grads[1].defined() || cu_seqlens.empty(),
                                "cudnn_flex: a gradient through the lse of packed sequences "
                                "(flex_attention_varlen) is not supported yet; use lse.detach() in the loss");
    if (grads[1].defined()) std::tie(grad_out, v, out) = with_lse_gradient(grad_out, grads[1], v, out);
    auto [dq, dk, dv] = call_bwd(grad_out, saved[0], saved[1], v, out, saved[4], mod_tensors, bprop_tensors,
                                 ctx->saved_data["mod_id"].toInt(), ctx->saved_data["bprop_id"].toInt(),
                                 ctx->saved_data["cacheable"].toBool(), scale,
                                 ctx->saved_data["deterministic"].toBool(), seq_lens, cu_seqlens, max_seqlens);
    if (grads[1].defined()) dv = dv.narrow(-1, 0, saved[2].size(-1));
    // One gradient per forward argument: the score_mod tensors and options get none.
    return {dq, dk, dv, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> fwd_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                at::TensorList mod_tensors, at::TensorList bprop_tensors,
                                                int64_t mod_id, int64_t bprop_id, bool cacheable,
                                                std::optional<double> scale, bool deterministic,
                                                at::TensorList seq_lens, at::TensorList cu_seqlens,
                                                at::IntArrayRef max_seqlens, bool every_row_attends) {
  // A call that nothing differentiates (no_grad, or q, k, v needing no gradient: the only inputs
  // Function::apply records) skips the autograd node that apply would find unneeded anyway; it
  // costs host time on every inference call. Forward-mode AD goes through apply, which refuses it
  // by name.
  const bool needs_grad = at::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad() || v.requires_grad());
  const bool has_tangent = q._fw_grad(/*level=*/0).defined() || k._fw_grad(/*level=*/0).defined() ||
                           v._fw_grad(/*level=*/0).defined();
  if (!needs_grad && !has_tangent) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_fwd(q, k, v, mod_tensors, bprop_tensors, mod_id, bprop_id, cacheable, scale, deterministic, seq_lens,
                    cu_seqlens, max_seqlens, every_row_attends);
  }
  auto outs = FlexAttentionFunction::apply(q, k, v, mod_tensors.vec(), bprop_tensors.vec(), mod_id, bprop_id,
                                           cacheable, scale, deterministic, seq_lens.vec(), cu_seqlens.vec(),
                                           max_seqlens.vec(), every_row_attends);
  return {outs[0], outs[1]};
}

}  // namespace

void bind_eager_fwd(pybind11::module& m) {
  // torch.ops.cudnn_flex.fwd boxes its 14 arguments into a stack of IValues and back on every
  // call; this binding calls the same op through the dispatcher, unboxed (autograd, then the CUDA
  // kernel, or whatever a TorchDispatchMode puts in between). Eager calls only: torch.compile
  // traces torch.ops.cudnn_flex.fwd. Errors reach Python as the op's would (ValueError for
  // TORCH_CHECK_VALUE, a score_mod's own exception unchanged).
  m.def(
      "fwd",
      [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, std::vector<at::Tensor> mod_tensors,
         std::vector<at::Tensor> bprop_tensors, int64_t mod_id, int64_t bprop_id, bool cacheable,
         std::optional<double> scale, bool deterministic, std::vector<at::Tensor> seq_lens,
         std::vector<at::Tensor> cu_seqlens, std::vector<int64_t> max_seqlens, bool every_row_attends) {
        HANDLE_TH_ERRORS
        return call_fwd(q, k, v, mod_tensors, bprop_tensors, mod_id, bprop_id, cacheable, scale, deterministic,
                        seq_lens, cu_seqlens, max_seqlens, every_row_attends);
        END_HANDLE_TH_ERRORS_PYBIND
      },
      "torch.ops.cudnn_flex.fwd without boxing its arguments (eager calls).", pybind11::arg("q"), pybind11::arg("k"),
      pybind11::arg("v"), pybind11::arg("mod_tensors"), pybind11::arg("bprop_tensors"), pybind11::arg("mod_id"),
      pybind11::arg("bprop_id"), pybind11::arg("cacheable"), pybind11::arg("scale"), pybind11::arg("deterministic"),
      pybind11::arg("seq_lens"), pybind11::arg("cu_seqlens"), pybind11::arg("max_seqlens"),
      pybind11::arg("every_row_attends") = false);  // the schema's default
}

TORCH_LIBRARY_IMPL(cudnn_flex, Autograd, m) {
  m.impl("fwd", fwd_autograd);
  // No double backward: a gradient through bwd raises "not implemented" instead of being wrong.
  m.impl("bwd", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace cudnn_flex
