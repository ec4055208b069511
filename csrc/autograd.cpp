// Autograd of torch.ops.cudnn_flex.fwd, in C++: a Python autograd kernel cost ~110 us of host
// time per call on the H100 machine (scripts/host_profile.py), more than the rest of the call.
// Registered on the Autograd key, so eager mode, AOTAutograd (torch.compile) and opcheck see the
// same backward: torch.ops.cudnn_flex.bwd.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/custom_function.h>
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
                                            std::optional<double> scale, bool deterministic) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("cudnn_flex::fwd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, at::TensorList,
                           at::TensorList, int64_t, int64_t, bool, std::optional<double>, bool)>();
  return op.call(q, k, v, mod_tensors, bprop_tensors, mod_id, bprop_id, cacheable, scale, deterministic);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, at::TensorList mod_tensors, at::TensorList bprop_tensors,
    int64_t mod_id, int64_t bprop_id, bool cacheable, std::optional<double> scale, bool deterministic) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("cudnn_flex::bwd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, at::TensorList, at::TensorList, int64_t,
                           int64_t, bool, std::optional<double>, bool)>();
  return op.call(grad_out, q, k, v, out, lse, mod_tensors, bprop_tensors, mod_id, bprop_id, cacheable,
                 scale, deterministic);
}

class FlexAttentionFunction : public torch::autograd::Function<FlexAttentionFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, std::vector<at::Tensor> mod_tensors,
                               std::vector<at::Tensor> bprop_tensors, int64_t mod_id, int64_t bprop_id,
                               bool cacheable, std::optional<double> scale, bool deterministic) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, lse] = call_fwd(q, k, v, mod_tensors, bprop_tensors, mod_id, bprop_id, cacheable, scale,
                               deterministic);
    // Saving the score_mod tensors makes autograd's version check catch an in-place change of
    // one of them between forward and backward.
    variable_list saved{q, k, v, out, lse};
    saved.insert(saved.end(), mod_tensors.begin(), mod_tensors.end());
    saved.insert(saved.end(), bprop_tensors.begin(), bprop_tensors.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["n_mod"] = static_cast<int64_t>(mod_tensors.size());
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
    TORCH_CHECK_NOT_IMPLEMENTED(!grads[1].defined(),
                                "cudnn_flex: the backward pass does not propagate gradients through the "
                                "returned lse; use lse.detach() in the loss");
    variable_list saved = ctx->get_saved_variables();
    const int64_t n_mod = ctx->saved_data["n_mod"].toInt();
    std::vector<at::Tensor> mod_tensors(saved.begin() + 5, saved.begin() + 5 + n_mod);
    std::vector<at::Tensor> bprop_tensors(saved.begin() + 5 + n_mod, saved.end());
    const c10::IValue& scale_value = ctx->saved_data["scale"];
    std::optional<double> scale;
    if (!scale_value.isNone()) scale = scale_value.toDouble();
    at::Tensor grad_out = grads[0].defined() ? grads[0] : at::zeros_like(saved[3]);
    auto [dq, dk, dv] = call_bwd(grad_out, saved[0], saved[1], saved[2], saved[3], saved[4], mod_tensors,
                                 bprop_tensors, ctx->saved_data["mod_id"].toInt(),
                                 ctx->saved_data["bprop_id"].toInt(), ctx->saved_data["cacheable"].toBool(),
                                 scale, ctx->saved_data["deterministic"].toBool());
    // One gradient per forward argument: the score_mod tensors and options get none.
    return {dq, dk, dv, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> fwd_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                at::TensorList mod_tensors, at::TensorList bprop_tensors,
                                                int64_t mod_id, int64_t bprop_id, bool cacheable,
                                                std::optional<double> scale, bool deterministic) {
  auto outs = FlexAttentionFunction::apply(q, k, v, mod_tensors.vec(), bprop_tensors.vec(), mod_id, bprop_id,
                                           cacheable, scale, deterministic);
  return {outs[0], outs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(cudnn_flex, Autograd, m) {
  m.impl("fwd", fwd_autograd);
  // No double backward: a gradient through bwd raises "not implemented" instead of being wrong.
  m.impl("bwd", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace cudnn_flex
