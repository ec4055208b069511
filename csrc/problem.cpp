#include "problem.h"

namespace cudnn_flex {

namespace {

void add_desc(GraphKey& key, const TensorDesc& d) {
  key.add(d.dims).add(d.strides).add(static_cast<int64_t>(d.dtype)).add(d.by_value);
}

void add_all(GraphKey& key, const std::vector<TensorDesc>& tensors) {
  key.add(static_cast<int64_t>(tensors.size()));
  for (const auto& t : tensors) add_desc(key, t);
}

}  // namespace

GraphKey SdpaProblem::key() const {
  GraphKey key;
  key.add(static_cast<int64_t>(pass)).add(device);
  for (const TensorDesc* d : {&q, &k, &v, &o, &lse}) add_desc(key, *d);
  if (pass == Pass::Backward) {
    for (const TensorDesc* d : {&d_o, &dq, &dk, &dv}) add_desc(key, *d);
    key.add(deterministic).add(bprop_id);
    add_all(key, bprop_tensors);
  }
  add_all(key, mod_tensors);
  key.add(scale).add(mod_id).add(sm_version).add(padded).add(ragged);
  return key;
}

}  // namespace cudnn_flex
