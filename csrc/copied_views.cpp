// The float32 copies and views that the shortcut of a cached call hands to the op when every input
// slot of a torch-style mod is a copy of a captured tensor (record_call.CopiedViews plans them;
// record_call.captured_views makes the same tensors on the full path). From Python, the copy and
// its two views of a document mask over int64 ids were about 20 us of single torch calls per call,
// more than the C++ op itself (issue 15); here they are one call.
//
// The tensors are copied on every call, never remembered: a write that the version counter does
// not see (a CUDA graph replay, DLPack, `.data`) must still be read.
#include "copied_views.h"

#include <ATen/ATen.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/utils/pybind.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

namespace cudnn_flex {
namespace {

class CopiedViews {
 public:
  // Per slot: its tensor's position in `tensors`, the view's 4 sizes, the view's axis of each of
  // the tensor's dimensions (view_for's axes), and whether it is a view of the tensor's one float32
  // copy (shared by the slots that read it) or a float32 copy of its own view.
  using Slot = std::tuple<int64_t, std::vector<int64_t>, std::vector<int64_t>, bool>;

  // It holds no tensor: make() is handed them on each call (a handle held here would raise their
  // use count, and torch.utils.swap_tensors, load_state_dict's swap, refuses such a tensor).
  CopiedViews(int64_t tensors, std::vector<Slot> slots) : count_(tensors), slots_(std::move(slots)) {
    for (const auto& [at, sizes, axes, shared] : slots_) {
      TORCH_CHECK_VALUE(at >= 0 && at < count_, "CopiedViews: slot tensor ", at, " of ", count_);
      TORCH_CHECK_VALUE(sizes.size() == 4 && axes.size() <= 4, "CopiedViews: a slot needs 4 sizes and <= 4 axes");
      for (int64_t axis : axes) TORCH_CHECK_VALUE(axis >= 0 && axis < 4, "CopiedViews: axis ", axis);
    }
  }

  // The slots' tensors, as record_call.captured_views makes them now from `tensors`.
  std::vector<at::Tensor> make(const std::vector<at::Tensor>& tensors) const {
    TORCH_CHECK_VALUE(int64_t(tensors.size()) == count_, "CopiedViews: ", tensors.size(), " tensors for ",
                      count_);
    std::vector<std::optional<at::Tensor>> copies(tensors.size());
    std::vector<at::Tensor> views;
    views.reserve(slots_.size());
    for (const auto& [at, sizes, axes, shared] : slots_) {
      at::Tensor t = tensors[at];
      if (shared) {
        if (!copies[at]) copies[at] = t.to(at::kFloat);
        t = *copies[at];
      }
      // The shortcut checked the tensor's metadata first; a tensor of fewer dims than axes is
      // refused here rather than read out of bounds.
      TORCH_CHECK_VALUE(int64_t(axes.size()) <= t.dim(), "CopiedViews: ", axes.size(), " axes for a ", t.dim(),
                        "-dim tensor");
      std::vector<int64_t> strides(4, 0);
      for (size_t dim = 0; dim < axes.size(); ++dim) strides[axes[dim]] = t.stride(int64_t(dim));
      at::Tensor view = t.as_strided(sizes, strides, t.storage_offset());
      if (!shared) view = view.to(at::kFloat);
      // As view_for: a pluggable allocator may not align to the 16 bytes cuDNN reads.
      if (view.is_cuda() && reinterpret_cast<uintptr_t>(view.data_ptr()) % 16) view = view.clone();
      views.push_back(std::move(view));
    }
    return views;
  }

 private:
  int64_t count_;
  std::vector<Slot> slots_;
};

}  // namespace

void bind_copied_views(pybind11::module& m) {
  pybind11::class_<CopiedViews>(m, "CopiedViews",
                                "The float32 copies and views of captured tensors for a cached call "
                                "(record_call.CopiedViews).")
      .def(pybind11::init<int64_t, std::vector<CopiedViews::Slot>>(), pybind11::arg("tensors"),
           pybind11::arg("slots"))
      .def(
          "make",
          [](const CopiedViews& self, const std::vector<at::Tensor>& tensors) {
            HANDLE_TH_ERRORS
            return self.make(tensors);
            END_HANDLE_TH_ERRORS_PYBIND
          },
          pybind11::arg("tensors"), "The slots' tensors: copies made now, from the tensors' storage offsets now.");
}

}  // namespace cudnn_flex
