// torch.ops.cudnn_flex.{fwd,bwd,validate}: schemas and kernels. Turns torch tensors into the
// graph problem, finds or builds its graph in the cache, and runs it on the current stream.
#include "ops.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cudnn/Handle.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <cuda.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>
#include <numeric>
#include <optional>
#include <sstream>
#include <stdexcept>

#include "plan_cache.h"
#include "ragged_offsets.h"
#include "sdpa_graph.h"

namespace cudnn_flex {
namespace {

using TensorList = at::TensorList;

LruCache<BuiltGraph>& graph_cache() {
  // Leaked on purpose: graphs must not be destroyed after the CUDA context at process exit.
  static auto* cache = new LruCache<BuiltGraph>(1024);
  return *cache;
}

RaggedOffsetsCache& ragged_offsets_cache() {
  // Leaked like the graph cache: its tensors must not be freed after the CUDA context at exit.
  static auto* cache = new RaggedOffsetsCache(32);
  return *cache;
}

DType dtype_of(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kHalf: return DType::Half;
    case at::kBFloat16: return DType::BFloat16;
    case at::kFloat: return DType::Float;
    case at::kDouble: return DType::Double;
    case at::kInt: return DType::Int32;
    case at::kLong: return DType::Int64;
    case at::kBool: return DType::Bool;
    case at::kByte: return DType::UInt8;
    default:
      TORCH_CHECK_VALUE(false, "cudnn_flex: ", what, " has dtype ", t.scalar_type(),
                        ", which cuDNN graphs do not take");
  }
}

TensorDesc describe(const at::Tensor& t, const char* what) {
  return TensorDesc{t.sizes().vec(), t.strides().vec(), dtype_of(t, what), false};
}

// Strides of a new tensor of `sizes` laid out in the same dimension order as `like` (so that an
// output of a bshd input is bshd in memory too). The fake kernel in _ops.py mirrors this.
std::vector<int64_t> strides_like(const at::Tensor& like, at::IntArrayRef sizes) {
  const int64_t n = like.dim();
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  // Outermost first; ties (size-1 dims) keep their logical order.
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return like.stride(a) > like.stride(b); });
  std::vector<int64_t> strides(n);
  int64_t running = 1;
  for (int64_t i = n - 1; i >= 0; --i) {
    strides[order[i]] = running;
    running *= sizes[order[i]];
  }
  return strides;
}

TensorDesc layout_like(const at::Tensor& like, at::IntArrayRef sizes, DType dtype) {
  return TensorDesc{sizes.vec(), strides_like(like, sizes), dtype, false};
}

at::Tensor empty_from(const TensorDesc& d, const at::TensorOptions& options) {
  return at::empty_strided(d.dims, d.strides, options);
}

// How broadcast dims of a score_mod tensor are described to cuDNN. cuDNN 9.19 computes wrong
// results for six patterns when broadcast dims are given as size 1 (docs/broadcasting.md):
// every pattern that broadcasts over Sq but not over both B and Skv (B111, BH11: forward and/or
// log-sum-exp; 111K, 1H1K, B11K, BH1K: backward). For those, each broadcast dim is described at
// full size with stride 0 (what Tensor.expand does; no copy), which is right for all 16
// patterns. The other ten keep size-1 dims: cuDNN reads them faster (ALiBi's [1, H, 1, 1]
// slopes were 2.4x slower expanded). 2 = that rule (default); 0 = always size 1; 1 = always
// expanded; 0 and 1 are kept for scripts/gpu_report.py.
int64_t broadcast_repr = 2;

bool expand_broadcast_dims(const std::vector<int64_t>& dims) {
  if (broadcast_repr != 2) return broadcast_repr == 1;
  const bool over_q = dims[2] == 1, has_b = dims[0] != 1, has_k = dims[3] != 1;
  return over_q && (has_b || has_k);
}

// A score_mod tensor as a 4-D graph input broadcast against [B, H, Sq, Skv]; a one-element host
// tensor is passed by value at execution, so changing its value never rebuilds the graph.
TensorDesc describe_mod_tensor(const at::Tensor& t, const std::string& name, const std::vector<int64_t>& full) {
  std::string what = "score_mod tensor '" + name + "'";
  if (t.device().is_cpu() && t.numel() == 1) {
    return TensorDesc{{1, 1, 1, 1}, {1, 1, 1, 1}, dtype_of(t, what.c_str()), true};
  }
  TORCH_CHECK_VALUE(t.dim() <= 4, "cudnn_flex: ", what, " has ", t.dim(),
                    " dims; it must broadcast against [B, H, Sq, Skv]");
  TensorDesc d = describe(t, what.c_str());
  while (d.dims.size() < 4) {
    d.dims.insert(d.dims.begin(), 1);
    d.strides.insert(d.strides.begin(), d.strides.empty() ? 1 : d.dims[1] * d.strides[0]);
  }
  if (expand_broadcast_dims(d.dims)) {
    for (size_t i = 0; i < 4; ++i) {
      if (d.dims[i] == 1 && full[i] != 1) {
        d.dims[i] = full[i];
        d.strides[i] = 0;
      }
    }
  }
  return d;
}

// The tensors' names live with the score_mod's registry id in Python (the id covers them), so
// C++ knows them by position only.
std::vector<TensorDesc> describe_mod_tensors(TensorList tensors, const char* role, const std::vector<int64_t>& full) {
  std::vector<TensorDesc> out;
  for (size_t i = 0; i < tensors.size(); ++i) {
    out.push_back(describe_mod_tensor(tensors[i], std::string(role) + " #" + std::to_string(i), full));
  }
  return out;
}

// cuDNN's Stats are [B, H, Sq, 1] (packed: [n, H, max_q, 1]); the op returns them as [B, H, Sq].
TensorDesc lse_desc(int64_t b, int64_t h, int64_t s) {
  return TensorDesc{{b, h, s, 1}, {h * s, s, 1, 1}, DType::Float, false};
}

std::string shape_of(const at::Tensor& t);

// Packed sequences (flex_attention_varlen): q, k, v are [1, H, total, D] views of tensors dense
// in their own dimension order, cu_seqlens = [cu_q, cu_kv] (int32 [n + 1], ending at the totals:
// flex_attention_varlen checks it) and max_seqlens = [max_q, max_kv]. cuDNN sees them as
// [n, H, max_s, D] with ragged offsets, and writes every row of out and of the gradients (the
// sequences cover every token). n == 0: not packed.
struct Packing {
  int64_t n = 0, max_q = 0, max_kv = 0;
  explicit operator bool() const { return n > 0; }
};

Packing packing(TensorList cu_seqlens, at::IntArrayRef max_seqlens, const at::Tensor& q, const at::Tensor& k,
                const at::Tensor& v, bool on_device) {
  if (cu_seqlens.empty()) return {};
  TORCH_CHECK_VALUE(cu_seqlens.size() == 2 && max_seqlens.size() == 2,
                    "cudnn_flex: cu_seqlens and max_seqlens must be empty or [q's, kv's]");
  const int64_t n = cu_seqlens[0].numel() - 1;
  for (size_t i = 0; i < 2; ++i) {
    const at::Tensor& t = cu_seqlens[i];
    const char* name = i == 0 ? "cu_seqlens_q" : "cu_seqlens_kv";
    TORCH_CHECK_VALUE(t.scalar_type() == at::kInt && t.dim() == 1 && t.numel() == n + 1 && n > 0 &&
                          t.stride(0) == 1 && (!on_device || t.device() == q.device()),
                      "cudnn_flex: ", name, " must be a contiguous int32 [n + 1] tensor on q's device, got ",
                      t.scalar_type(), " ", shape_of(t));
  }
  TORCH_CHECK_VALUE(q.size(0) == 1 && k.size(0) == 1 && max_seqlens[0] > 0 && max_seqlens[1] > 0,
                    "cudnn_flex: packed sequences come as [1, H, total, D] views with positive max_seqlens");
  // A gradient is allocated dense in its tensor's dimension order and shares that tensor's ragged
  // offsets, so each packed tensor must be dense in its own order: k and v as views of one packed
  // projection (a gap between tokens) would get their gradients written at the wrong rows.
  for (auto [t, name] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}}) {
    const std::vector<int64_t> dense = strides_like(*t, t->sizes());
    bool ok = true;
    for (int64_t d = 0; d < t->dim(); ++d) ok = ok && (t->size(d) == 1 || t->stride(d) == dense[d]);
    TORCH_CHECK_VALUE(ok, "cudnn_flex: packed ", name, " must be dense in its own dimension order, got strides ",
                      t->strides(), " for shape ", shape_of(*t),
                      "; pass a .contiguous() copy (flex_attention_varlen makes one)");
  }
  return {n, max_seqlens[0], max_seqlens[1]};
}

// A [1, H, total, D] tensor (token stride st) as cuDNN's packed [n, H, max_s, D]: the batch
// stride is unused, the ragged offsets place each sequence.
TensorDesc packed(TensorDesc d, int64_t n, int64_t max_s) {
  const int64_t st = d.strides[2];
  d.dims = {n, d.dims[1], max_s, d.dims[3]};
  d.strides = {max_s * st, d.strides[1], st, d.strides[3]};
  return d;
}

// Whether the current stream is capturing a CUDA graph.
bool capturing() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

// The ragged offsets of q (and dq), o (and dO), k (and dk), v (and dv): cu_seqlens times each
// tensor's token stride, in int32 as cuDNN takes them. Tensors of one token stride share one
// offsets tensor (q and o usually do, and k and v of one packed kv tensor).
std::vector<at::Tensor> ragged_offsets(const SdpaProblem& p, TensorList cu_seqlens, int64_t total_q,
                                       int64_t total_kv) {
  std::vector<at::Tensor> out;
  const std::tuple<const TensorDesc*, int, int64_t> located[] = {
      {&p.q, 0, total_q}, {&p.o, 0, total_q}, {&p.k, 1, total_kv}, {&p.v, 1, total_kv}};
  // Made anew under capture (replays follow the buffer's values then) and for inference tensors.
  const bool capture = capturing();
  const int64_t stream = c10::cuda::getCurrentCUDAStream(cu_seqlens[0].device().index()).id();
  for (size_t i = 0; i < 4; ++i) {
    auto [d, which, total] = located[i];
    TORCH_CHECK_VALUE(total * d->strides[2] <= std::numeric_limits<int32_t>::max(),
                      "cudnn_flex: packed sequences of ", total, " tokens exceed cuDNN's int32 ragged offsets; "
                      "split the batch");
    const bool same_as_previous = i % 2 == 1 && d->strides[2] == std::get<0>(located[i - 1])->strides[2];
    if (same_as_previous) {
      out.push_back(out.back());
      continue;
    }
    const at::Tensor& cu = cu_seqlens[which];
    const int64_t stride = d->strides[2];
    auto multiply = [&] { return cu * stride; };
    const bool remembered = !capture && !cu.is_inference();
    out.push_back(remembered ? ragged_offsets_cache().get(cu, stride, stream, multiply) : multiply());
  }
  return out;
}

// The scores' shape [B, H, Sq, Skv] (packed: [n, H, max_q, max_kv]), which score_mod tensors
// broadcast against.
std::vector<int64_t> scores_shape(const at::Tensor& q, const at::Tensor& k, const Packing& pk) {
  if (pk) return {pk.n, q.size(1), pk.max_q, pk.max_kv};
  return {q.size(0), q.size(1), q.size(2), k.size(2)};
}

SdpaProblem make_problem(Pass pass, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const std::vector<int64_t>& scores, TensorList mod_tensors, TensorList bprop_tensors,
                         int64_t mod_id, int64_t bprop_id, std::optional<double> scale, bool deterministic,
                         bool padded, const Packing& pk) {
  TORCH_CHECK_VALUE(!pk || padded, "cudnn_flex: packed sequences need seq_lens (their lengths) too");
  SdpaProblem p;
  p.pass = pass;
  p.padded = padded;
  p.ragged = bool(pk);
  p.device = q.device().is_cuda() ? q.device().index() : -1;
  p.q = describe(q, "q");
  p.k = describe(k, "k");
  p.v = describe(v, "v");
  p.o = layout_like(q, {q.size(0), q.size(1), q.size(2), v.size(3)}, p.q.dtype);
  p.lse = lse_desc(scores[0], scores[1], scores[2]);
  if (pk) {
    p.q = packed(p.q, pk.n, pk.max_q);
    p.k = packed(p.k, pk.n, pk.max_kv);
    p.v = packed(p.v, pk.n, pk.max_kv);
    p.o = packed(p.o, pk.n, pk.max_q);
  }
  p.mod_tensors = describe_mod_tensors(mod_tensors, "score_mod tensor", scores);
  // No scale: the usual 1/sqrt(head dim), decided here so that a traced head dim can stay symbolic.
  p.scale = scale.value_or(1.0 / std::sqrt(double(q.size(3))));
  p.mod_id = mod_id;
  if (pass == Pass::Backward) {
    p.d_o = p.o;
    p.dq = layout_like(q, q.sizes(), p.q.dtype);
    p.dk = layout_like(k, k.sizes(), p.k.dtype);
    p.dv = layout_like(v, v.sizes(), p.v.dtype);
    if (pk) {
      p.dq = packed(p.dq, pk.n, pk.max_q);
      p.dk = packed(p.dk, pk.n, pk.max_kv);
      p.dv = packed(p.dv, pk.n, pk.max_kv);
    }
    p.bprop_tensors = describe_mod_tensors(bprop_tensors, "score_mod_bprop tensor", scores);
    p.bprop_id = bprop_id;
    p.deterministic = deterministic;
  }
  return p;
}

// Builds run one at a time. A stateful score_mod keeps graph tensors from its forward call for its
// bprop (the softcap pattern); a build on another thread (autograd's backward thread, a data
// loader thread) must not run the same object's score_mod in between. Builds are cache misses, so
// serialising them costs nothing on the hot path. The GIL is released while waiting (the builder
// holding the lock needs it for the score_mod) and while cuDNN compiles.
std::shared_ptr<const BuiltGraph> build_serialized(const SdpaProblem& p, cudnnHandle_t handle) {
  static std::mutex build_mutex;
  std::optional<pybind11::gil_scoped_release> no_gil;
  if (Py_IsInitialized() && PyGILState_Check()) no_gil.emplace();
  std::lock_guard<std::mutex> lock(build_mutex);
  return build_graph(p, handle);
}

// A graph build allocates and synchronises, which a CUDA graph capture forbids: say so instead of
// failing inside cuDNN or recording garbage.
void refuse_build_during_capture(const SdpaProblem& p) {
  if (p.device < 0 || !capturing()) return;
  TORCH_CHECK(false, "cudnn_flex: a new cuDNN graph (", p.pass == Pass::Forward ? "forward" : "backward",
              ") would be built while a CUDA graph is being captured. Run the same call once before "
              "capture (a warm-up step builds and caches its graphs); a score_mod that cannot be "
              "cached (a closure without score_mod_graph_cache_key()) is rebuilt on every call and "
              "cannot be captured.");
}

// cuDNN before 9.28 frees a plan's runtime-compiled kernels with the plan, and a CUDA graph that
// captured a launch of them replays whatever is at that address afterwards
// (../shared/reference/cudnn_masks.md §4). A plan executed during a capture is therefore kept for
// the rest of the process, whatever the LRU cache or clear_cache() do: CUDA graphs are not
// tracked, and the plans a process captures are few (one per captured shape and mod).
void pin_if_captured(const std::shared_ptr<const BuiltGraph>& graph) {
  if (!capturing()) return;
  static std::mutex mutex;
  static auto* pinned = new std::vector<std::shared_ptr<const BuiltGraph>>();  // leaked on purpose
  std::lock_guard<std::mutex> lock(mutex);
  if (std::find(pinned->begin(), pinned->end(), graph) == pinned->end()) pinned->push_back(graph);
}

// cuDNN's refusals of the user's problem come back as ValueError; Python errors from a score_mod
// pass through unchanged.
template <class F>
auto translate_errors(F&& f) {
  try {
    return f();
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
}

void run(const SdpaProblem& p, bool cacheable, std::vector<std::pair<int64_t, void*>> pointers,
         TensorList mod_tensors, TensorList bprop_tensors, const at::Tensor& like) {
  for (size_t i = 0; i < mod_tensors.size(); ++i) {
    pointers.emplace_back(kModTensorUid + int64_t(i), mod_tensors[i].data_ptr());
  }
  for (size_t i = 0; i < bprop_tensors.size(); ++i) {
    pointers.emplace_back(kBpropTensorUid + int64_t(i), bprop_tensors[i].data_ptr());
  }
  // The graph is looked up before the handle is taken: a thread's first handle is created with
  // allocations, which would invalidate a CUDA graph capture before the build could be refused.
  auto handle_on_stream = [] {
    cudnnHandle_t handle = at::native::getCudnnHandle();
    TORCH_CHECK(cudnnSetStream(handle, at::cuda::getCurrentCUDAStream()) == CUDNN_STATUS_SUCCESS,
                "cudnn_flex: cudnnSetStream failed");
    return handle;
  };
  auto graph = translate_errors(
      [&] { return graph_cache().get_or_build(p.key(), cacheable, [&] {
        refuse_build_during_capture(p);
        cudnnHandle_t handle = handle_on_stream();
        auto build = [&] { return build_serialized(p, handle); };
        if (!cacheable) return build();
        const cudaDeviceProp& gpu = *at::cuda::getDeviceProperties(p.device);
        return load_or_build(p, gpu.name, int64_t(gpu.major) * 10 + gpu.minor, handle, build);
      }); });
  cudnnHandle_t handle = handle_on_stream();
  const int64_t workspace_bytes = workspace_size(*graph);
  at::Tensor workspace;  // most forward graphs need none: no allocation on their hot path
  if (workspace_bytes > 0) workspace = at::empty({workspace_bytes}, like.options().dtype(at::kByte));
  execute(*graph, handle, pointers, workspace_bytes > 0 ? workspace.data_ptr() : nullptr);
  pin_if_captured(graph);
}

std::string shape_of(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

// The shapes of q, k, v as BHSD, checked here as well as in Python: models call the public ops
// directly, and a zero head count reaches a division inside cuDNN (SIGFPE).
void check_shapes(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  for (auto [t, name] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}}) {
    TORCH_CHECK_VALUE(t->dim() == 4, "cudnn_flex: ", name, " must be 4-D [B, H, S, D], got ", shape_of(*t));
  }
  TORCH_CHECK_VALUE(k.dtype() == q.dtype() && v.dtype() == q.dtype(), "cudnn_flex: q, k and v must have one dtype, got ",
                    q.dtype(), ", ", k.dtype(), ", ", v.dtype());
  TORCH_CHECK_VALUE(k.device() == q.device() && v.device() == q.device(),
                    "cudnn_flex: q, k and v must be on one device, got ", q.device(), ", ", k.device(), ", ", v.device());
  TORCH_CHECK_VALUE(k.size(0) == q.size(0) && v.size(0) == q.size(0), "cudnn_flex: q, k and v must have one batch size, got q ",
                    shape_of(q), ", k ", shape_of(k), ", v ", shape_of(v));
  TORCH_CHECK_VALUE(k.size(1) > 0 && k.size(1) == v.size(1) && q.size(1) % k.size(1) == 0,
                    "cudnn_flex: k and v need the same number of heads (> 0), and q's head count a multiple of it; got q ",
                    shape_of(q), ", k ", shape_of(k), ", v ", shape_of(v));
  TORCH_CHECK_VALUE(k.size(2) == v.size(2), "cudnn_flex: k and v must have one sequence length, got k ", shape_of(k),
                    ", v ", shape_of(v));
  TORCH_CHECK_VALUE(k.size(3) == q.size(3) && q.size(3) > 0, "cudnn_flex: q and k need one head dim (> 0), got q ",
                    shape_of(q), ", k ", shape_of(k));
}

// Score_mod tensors as cuDNN reads them, checked: on q's device (a one-element CPU tensor is
// passed by value; any other host pointer would reach the kernel and lose the CUDA context),
// at most 4-D and broadcastable against the scores. Bool becomes float32 (cuDNN 9.19 crashes on
// BOOLEAN inputs with SIGFPE, and a uint8 view of an odd-length mask is read misaligned); the
// recorded program compares it with 0.
std::vector<at::Tensor> graph_inputs(TensorList tensors, const char* role, const at::Tensor& q,
                                     const std::vector<int64_t>& full, bool on_device) {
  std::vector<at::Tensor> out;
  for (size_t i = 0; i < tensors.size(); ++i) {
    at::Tensor t = tensors[i];
    const bool host_scalar = t.device().is_cpu() && t.numel() == 1;
    TORCH_CHECK_VALUE(!on_device || host_scalar || t.device() == q.device(), "cudnn_flex: ", role, " #", i,
                      " is on ", t.device(), " but q is on ", q.device(),
                      "; move it to q's device (only one-element CPU tensors are passed by value)");
    TORCH_CHECK_VALUE(t.dim() <= 4, "cudnn_flex: ", role, " #", i, " has ", t.dim(),
                      " dims; it must broadcast against [B, H, Sq, Skv]");
    for (int64_t d = 0; d < t.dim() && !host_scalar; ++d) {
      const int64_t n = t.size(t.dim() - 1 - d), f = full[3 - d];
      TORCH_CHECK_VALUE(n == 1 || n == f, "cudnn_flex: ", role, " #", i, " has shape ", shape_of(t),
                        ", which does not broadcast against the scores [B, H, Sq, Skv] = ", at::IntArrayRef(full));
    }
    if (t.scalar_type() == at::kBool) t = t.to(at::kFloat);
    // As flex_attention checks in eager mode; here also for the shortcut (fast_path.py), which
    // leaves these checks to the op, and for a compiled call, whose tensors are only known here.
    TORCH_CHECK_VALUE(!on_device || host_scalar || reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0,
                      "cudnn_flex: ", role, " #", i, " is not 16-byte aligned for cuDNN (a slice at an odd "
                      "offset?); pass a .clone()");
    out.push_back(t);
  }
  return out;
}

// The valid lengths of a padded batch: none, or [seq_lens_q, seq_lens_kv], each int32 [B] with
// unit stride (cuDNN reads them as [B,1,1,1]) on q's device. Their values are checked in Python
// (cudnn_flex.flex_attention): a length past the padded one makes cuDNN read out of bounds.
bool padded_batch(TensorList seq_lens, int64_t batch, const at::Tensor& q, bool on_device) {
  if (seq_lens.empty()) return false;
  TORCH_CHECK_VALUE(seq_lens.size() == 2, "cudnn_flex: seq_lens must be empty or [seq_lens_q, seq_lens_kv], got ",
                    seq_lens.size(), " tensors");
  for (size_t i = 0; i < 2; ++i) {
    const at::Tensor& t = seq_lens[i];
    const char* name = i == 0 ? "seq_lens_q" : "seq_lens_kv";
    TORCH_CHECK_VALUE(t.scalar_type() == at::kInt && t.dim() == 1 && t.size(0) == batch && t.stride(0) == 1,
                      "cudnn_flex: ", name, " must be a contiguous int32 [B] = [", batch, "] tensor, got ",
                      t.scalar_type(), " ", shape_of(t));
    TORCH_CHECK_VALUE(!on_device || t.device() == q.device(), "cudnn_flex: ", name, " is on ", t.device(),
                      " but q is on ", q.device());
  }
  return true;
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_shapes(q, k, v);
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK_VALUE(t->is_cuda() && t->stride(3) == 1,
                      "cudnn_flex: q, k, v must be CUDA tensors with a dense last dim "
                      "(use cudnn_flex.flex_attention, which checks and explains)");
    TORCH_CHECK_VALUE(t->scalar_type() == at::kHalf || t->scalar_type() == at::kBFloat16,
                      "cudnn_flex: q, k, v must be float16 or bfloat16 for cuDNN, got ", t->dtype());
    // flex_attention checks this in eager mode; under torch.compile the inputs are only known here.
    TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0,
                      "cudnn_flex: q, k and v must be 16-byte aligned for cuDNN (a slice at an odd "
                      "offset?); pass a .clone()");
  }
}

// flex_attention_varlen passes the packed tensors as they come, [total, H, D] (the two views
// per tensor it made in Python were an autograd node each and ~2 us of host time); the problem
// is made from [1, H, total, D] views of them, and the results go back as [total, H, D]. Views
// made here, below autograd, are not tracked as views: out and the gradients are plain outputs.
bool packed_rows(const at::Tensor& q, TensorList cu_seqlens) { return !cu_seqlens.empty() && q.dim() == 3; }
at::Tensor as_rows(const at::Tensor& t) { return t.dim() == 3 ? t.unsqueeze(0).transpose(1, 2) : t; }
at::Tensor from_rows(const at::Tensor& t) { return t.squeeze(0).transpose(0, 1); }

// Whether t lies in memory as d says: the same sizes, and the same strides where a dim has more
// than one element (the stride of a size-1 dim addresses nothing; views of [total, H, D] tensors
// give it another value than an allocation does).
bool same_layout(const at::Tensor& t, const TensorDesc& d) {
  if (t.sizes().vec() != d.dims) return false;
  for (int64_t i = 0; i < t.dim(); ++i) {
    if (t.size(i) != 1 && t.stride(i) != d.strides[i]) return false;
  }
  return true;
}

// Zeroes a tensor allocated dense (its bytes are its elements) with one cudaMemsetAsync on the
// current stream: less host time than a fill kernel through TensorIterator.
void zero_dense(const at::Tensor& t) {
  if (t.nbytes() == 0) return;  // an empty problem's outputs (no storage to set)
  C10_CUDA_CHECK(cudaMemsetAsync(t.data_ptr(), 0, t.nbytes(), at::cuda::getCurrentCUDAStream(t.device().index())));
}

// The driver's cuMemsetD32Async, found once through the runtime (the extension does not link
// libcuda): it sets 32-bit words, so it writes a float that is no byte pattern, as -inf.
using MemsetD32 = CUresult (*)(CUdeviceptr, unsigned int, size_t, CUstream);

MemsetD32 memset_d32() {
  static const MemsetD32 fn = [] {
    void* found = nullptr;
    cudaDriverEntryPointQueryResult status{};
#if CUDART_VERSION >= 12050
    C10_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuMemsetD32Async", &found, 12000, cudaEnableDefault, &status));
#else  // CUDA 12.0-12.4: the same lookup without a version
    C10_CUDA_CHECK(cudaGetDriverEntryPoint("cuMemsetD32Async", &found, cudaEnableDefault, &status));
#endif
    TORCH_CHECK(status == cudaDriverEntryPointSuccess && found != nullptr,
                "cudnn_flex: the CUDA driver offers no cuMemsetD32Async");
    return reinterpret_cast<MemsetD32>(found);
  }();
  return fn;
}

// Sets every element of a float32 tensor allocated dense to `value` with one memset on the
// current stream: less host time than a fill kernel through TensorIterator (a padded batch's lse
// took one on every call).
void fill_dense_float(const at::Tensor& t, float value) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous(), "cudnn_flex: fill_dense_float takes dense float32");
  if (t.numel() == 0) return;
  unsigned int bits = 0;
  std::memcpy(&bits, &value, sizeof bits);
  const CUresult result = memset_d32()(reinterpret_cast<CUdeviceptr>(t.data_ptr()), bits, t.numel(),
                                       at::cuda::getCurrentCUDAStream(t.device().index()).stream());
  TORCH_CHECK(result == CUDA_SUCCESS, "cudnn_flex: cuMemsetD32Async failed (CUresult ", static_cast<int>(result), ")");
}

// What fwd, bwd and validate share: the inputs checked, and cuDNN's view of them (the problem).
struct Call {
  std::vector<at::Tensor> mods, bprop_mods;  // the score_mod tensors as cuDNN reads them
  SdpaProblem p;
};

Call prepare(Pass pass, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, TensorList mod_tensors,
             TensorList bprop_tensors, int64_t mod_id, int64_t bprop_id, std::optional<double> scale,
             bool deterministic, TensorList seq_lens, TensorList cu_seqlens, at::IntArrayRef max_seqlens,
             bool on_device) {
  const Packing pk = packing(cu_seqlens, max_seqlens, q, k, v, on_device);
  const std::vector<int64_t> scores = scores_shape(q, k, pk);  // [B, H, Sq, Skv]; packed: [n, H, max_q, max_kv]
  const bool padded = padded_batch(seq_lens, scores[0], q, on_device);
  Call c;
  c.mods = graph_inputs(mod_tensors, "score_mod tensor", q, scores, on_device);
  c.bprop_mods = graph_inputs(bprop_tensors, "score_mod_bprop tensor", q, scores, on_device);
  c.p = make_problem(pass, q, k, v, scores, c.mods, c.bprop_mods, mod_id, bprop_id, scale, deterministic, padded, pk);
  return c;
}

// The pointers of the lengths a padded batch or packed sequences add to the variant pack. Returns
// the ragged offsets computed for this call, which must live until the graph is launched.
std::vector<at::Tensor> add_lengths(std::vector<std::pair<int64_t, void*>>& pointers, const Call& c,
                                    TensorList seq_lens, TensorList cu_seqlens, int64_t total_q, int64_t total_kv) {
  if (!seq_lens.empty()) {
    pointers.emplace_back(kSeqLenQ, seq_lens[0].data_ptr());
    pointers.emplace_back(kSeqLenKV, seq_lens[1].data_ptr());
  }
  if (!c.p.ragged) return {};
  std::vector<at::Tensor> offsets = ragged_offsets(c.p, cu_seqlens, total_q, total_kv);
  const int64_t uids[] = {kRaggedQ, kRaggedO, kRaggedK, kRaggedV};
  for (size_t i = 0; i < 4; ++i) pointers.emplace_back(uids[i], offsets[i].data_ptr());
  return offsets;
}

std::tuple<at::Tensor, at::Tensor> fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                            TensorList mod_tensors, TensorList bprop_tensors, int64_t mod_id, int64_t bprop_id, bool cacheable,
                                            std::optional<double> scale, bool deterministic, TensorList seq_lens,
                                            TensorList cu_seqlens, at::IntArrayRef max_seqlens,
                                            bool every_row_attends) {
  if (packed_rows(q, cu_seqlens)) {
    auto [out, lse] = fwd_cuda(as_rows(q), as_rows(k), as_rows(v), mod_tensors, bprop_tensors, mod_id, bprop_id,
                               cacheable, scale, deterministic, seq_lens, cu_seqlens, max_seqlens, every_row_attends);
    return {from_rows(out), lse};
  }
  check_inputs(q, k, v);
  c10::cuda::CUDAGuard guard(q.device());
  const Call c = prepare(Pass::Forward, q, k, v, mod_tensors, bprop_tensors, mod_id, bprop_id, scale, deterministic,
                         seq_lens, cu_seqlens, max_seqlens, true);
  const SdpaProblem& p = c.p;
  at::Tensor out = at::empty_strided({q.size(0), q.size(1), q.size(2), v.size(3)},
                                     strides_like(q, {q.size(0), q.size(1), q.size(2), v.size(3)}), q.options());
  at::Tensor lse = at::empty({p.lse.dims[0], p.lse.dims[1], p.lse.dims[2]}, q.options().dtype(at::kFloat));
  const bool empty = q.numel() == 0 || k.size(2) == 0;
  // every_row_attends: the caller read the lengths' values on the host (once per version) and
  // found every query row inside its sequence with a key, so cuDNN writes all of out and lse (a
  // decode step's KV-cache lengths): two memsets less, 6-7 us of host time on the H100's host. Not
  // under capture: a replay runs on whatever values the lengths hold then.
  const bool all_rows_written = every_row_attends && !capturing();
  if ((p.padded && !p.ragged && !all_rows_written) || empty) {
    // cuDNN leaves the rows of skipped tiles unwritten: padding rows get out 0 and lse -inf (a
    // row with no keys), as the rows it masks in the last partial tile do. With nothing to
    // attend to, that is the whole result (no cuDNN launch on empty tensors). Both are allocated
    // dense: a memset each.
    zero_dense(out);
    fill_dense_float(lse, -std::numeric_limits<float>::infinity());
    if (empty) return {out, lse};
  } else if (p.ragged) {
    // Packed sequences cover every token, but cuDNN writes no out for the queries of a sequence
    // without keys (they get 0; it writes their lse, -inf). Their lse [n, H, max_q] has rows
    // past each sequence, which nothing reads: flex_attention_varlen returns the tokens' rows,
    // and cuDNN's backward masks the rest. A memset, not a fill kernel: ~6 us less host time.
    zero_dense(out);
  }
  std::vector<std::pair<int64_t, void*>> pointers{
      {kQ, q.data_ptr()}, {kK, k.data_ptr()}, {kV, v.data_ptr()}, {kO, out.data_ptr()}, {kLse, lse.data_ptr()}};
  const auto offsets = add_lengths(pointers, c, seq_lens, cu_seqlens, q.size(2), k.size(2));
  run(p, cacheable, std::move(pointers), c.mods, {}, q);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_cuda(const at::Tensor& grad_out, const at::Tensor& q,
                                                        const at::Tensor& k, const at::Tensor& v,
                                                        const at::Tensor& out, const at::Tensor& lse,
                                                        TensorList mod_tensors, TensorList bprop_tensors,
                                                        int64_t mod_id,
                                                        int64_t bprop_id, bool cacheable, std::optional<double> scale,
                                                        bool deterministic, TensorList seq_lens,
                                                        TensorList cu_seqlens, at::IntArrayRef max_seqlens) {
  if (packed_rows(q, cu_seqlens)) {
    auto [dq, dk, dv] = bwd_cuda(as_rows(grad_out), as_rows(q), as_rows(k), as_rows(v), as_rows(out), lse, mod_tensors,
                                 bprop_tensors, mod_id, bprop_id, cacheable, scale, deterministic, seq_lens,
                                 cu_seqlens, max_seqlens);
    return {from_rows(dq), from_rows(dk), from_rows(dv)};
  }
  check_inputs(q, k, v);
  c10::cuda::CUDAGuard guard(q.device());
  const Call c = prepare(Pass::Backward, q, k, v, mod_tensors, bprop_tensors, mod_id, bprop_id, scale, deterministic,
                         seq_lens, cu_seqlens, max_seqlens, true);
  const SdpaProblem& p = c.p;
  // The tensors as allocated (packed: [1, H, total, D]); p holds cuDNN's view of them.
  const TensorDesc o_layout = layout_like(q, {q.size(0), q.size(1), q.size(2), v.size(3)}, p.q.dtype);
  TORCH_CHECK(same_layout(out, o_layout), "cudnn_flex: bwd got an `out` that fwd did not make");
  // The graph reads dO with O's layout; autograd may hand over another one (or an expanded zero).
  at::Tensor d_o = grad_out;
  if (!same_layout(d_o, o_layout)) {
    d_o = empty_from(o_layout, grad_out.options());
    d_o.copy_(grad_out);
  }
  at::Tensor dq = empty_from(layout_like(q, q.sizes(), p.q.dtype), q.options());
  at::Tensor dk = empty_from(layout_like(k, k.sizes(), p.k.dtype), k.options());
  at::Tensor dv = empty_from(layout_like(v, v.sizes(), p.v.dtype), v.options());
  const bool empty = q.numel() == 0 || k.numel() == 0;
  if ((p.padded && !p.ragged) || empty) {
    // cuDNN skips the tiles past the lengths and leaves their gradients unwritten: padding gets
    // no gradient (and an empty problem none at all). Allocated dense: memsets.
    zero_dense(dq);
    zero_dense(dk);
    zero_dense(dv);
    if (empty) return {dq, dk, dv};
  } else if (p.ragged) {
    // Packed: cuDNN writes no dq for the queries of a sequence without keys (as out in fwd_cuda),
    // and is not relied on to write dk, dv for the keys of a sequence without queries.
    zero_dense(dq);
    zero_dense(dk);
    zero_dense(dv);
  }
  std::vector<std::pair<int64_t, void*>> pointers{
      {kQ, q.data_ptr()},   {kK, k.data_ptr()},   {kV, v.data_ptr()},   {kO, out.data_ptr()},  {kLse, lse.data_ptr()},
      {kDO, d_o.data_ptr()}, {kDQ, dq.data_ptr()}, {kDK, dk.data_ptr()}, {kDV, dv.data_ptr()}};
  const auto offsets = add_lengths(pointers, c, seq_lens, cu_seqlens, q.size(2), k.size(2));
  run(p, cacheable, std::move(pointers), c.mods, c.bprop_mods, q);
  return {dq, dk, dv};
}

// Builds the fwd and bwd graphs for an SM version up to cuDNN's operation graph, without a GPU,
// and returns their printed form. The user's score_mod really runs through the bridge.
std::string validate(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, TensorList mod_tensors,
                     TensorList bprop_tensors, int64_t mod_id, int64_t bprop_id,
                     std::optional<double> scale, bool deterministic, int64_t sm_version, TensorList seq_lens,
                     TensorList cu_seqlens, at::IntArrayRef max_seqlens) {
  TORCH_CHECK_VALUE(sm_version > 0, "cudnn_flex: validate needs an SM version such as 90");
  check_shapes(q, k, v);
  std::string text;
  for (Pass pass : {Pass::Forward, Pass::Backward}) {
    Call c = prepare(pass, q, k, v, mod_tensors, bprop_tensors, mod_id, bprop_id, scale, deterministic, seq_lens,
                     cu_seqlens, max_seqlens, false);
    if (q.numel() == 0 || k.numel() == 0 || v.numel() == 0) {
      // flex_attention returns a defined result without cuDNN for these; cuDNN itself divides by
      // the empty dims (SIGFPE), so there is no graph to validate.
      return "empty problem (a zero-size dim): no cuDNN graph is built\n";
    }
    c.p.sm_version = sm_version;
    // Counted like any other build, never stored: these graphs have no plans to run.
    auto graph = translate_errors(
        [&] { return graph_cache().get_or_build(c.p.key(), false, [&] { return build_serialized(c.p, nullptr); }); });
    text += describe(*graph);
    text += "\n";
  }
  return text;
}

}  // namespace

CacheStats graph_cache_stats() { return graph_cache().stats(); }
void clear_graph_cache() {
  graph_cache().clear();
  ragged_offsets_cache().clear();
}
void set_graph_cache_capacity(size_t capacity) { graph_cache().set_capacity(capacity); }
void set_broadcast_repr(int64_t repr) { broadcast_repr = repr; }

TORCH_LIBRARY(cudnn_flex, m) {
  m.def(
      "fwd(Tensor q, Tensor k, Tensor v, Tensor[] mod_tensors, Tensor[] bprop_tensors, int mod_id, "
      "int bprop_id, bool cacheable, float? scale, bool deterministic, Tensor[] seq_lens, "
      "Tensor[] cu_seqlens, int[] max_seqlens, bool every_row_attends=False) -> (Tensor out, Tensor lse)");
  m.def(
      "bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor[] mod_tensors, "
      "Tensor[] bprop_tensors, int mod_id, int bprop_id, bool cacheable, "
      "float? scale, bool deterministic, Tensor[] seq_lens, Tensor[] cu_seqlens, int[] max_seqlens) "
      "-> (Tensor dq, Tensor dk, Tensor dv)");
  m.def(
      "validate(Tensor q, Tensor k, Tensor v, Tensor[] mod_tensors, Tensor[] bprop_tensors, int mod_id, "
      "int bprop_id, float? scale, bool deterministic, int sm_version, Tensor[] seq_lens, "
      "Tensor[] cu_seqlens, int[] max_seqlens) -> str");
  m.impl("validate", c10::DispatchKey::CompositeExplicitAutograd, TORCH_FN(validate));
}

TORCH_LIBRARY_IMPL(cudnn_flex, CUDA, m) {
  m.impl("fwd", TORCH_FN(fwd_cuda));
  m.impl("bwd", TORCH_FN(bwd_cuda));
}

}  // namespace cudnn_flex
