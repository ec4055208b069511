// cudnn_flex._C.CopiedViews: the float32 copies of a torch-style mod's captured integer tensors
// (document ids, per-batch lengths), made for every cached call in C++ (record_call.CopiedViews).
#pragma once

#include <pybind11/pybind11.h>

namespace cudnn_flex {

void bind_copied_views(pybind11::module& m);

}  // namespace cudnn_flex
