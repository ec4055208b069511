// Which fields of an SdpaProblem enter its graph key. A field that changes the graph but is
// missing from the key makes the cache hand back a wrong graph silently; a backward-only field
// in the forward key only costs rebuilds. Both are checked, field by field.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "problem.h"

using cudnn_flex::DType;
using cudnn_flex::GraphKey;
using cudnn_flex::Pass;
using cudnn_flex::SdpaProblem;
using cudnn_flex::TensorDesc;

namespace {

TensorDesc desc(std::vector<int64_t> dims, DType dtype = DType::BFloat16) {
  // Contiguous strides of `dims`.
  std::vector<int64_t> strides(dims.size());
  int64_t running = 1;
  for (size_t i = dims.size(); i-- > 0;) {
    strides[i] = running;
    running *= dims[i];
  }
  return TensorDesc{dims, strides, dtype, false};
}

// A GQA backward problem with every field set to a value that differs from its default, so that
// a field left out of the key cannot hide behind a default.
SdpaProblem make(Pass pass) {
  SdpaProblem p;
  p.pass = pass;
  p.device = 1;
  p.q = desc({2, 8, 128, 64});
  p.k = desc({2, 2, 192, 64});
  p.v = desc({2, 2, 192, 64});
  p.o = desc({2, 8, 128, 64});
  p.lse = TensorDesc{{2, 8, 128, 1}, {1024, 128, 1, 1}, DType::Float, false};
  p.d_o = desc({2, 8, 128, 64});
  p.dq = desc({2, 8, 128, 64});
  p.dk = desc({2, 2, 192, 64});
  p.dv = desc({2, 2, 192, 64});
  p.mod_tensors = {TensorDesc{{1, 8, 1, 1}, {8, 1, 1, 1}, DType::Float, false},
                   TensorDesc{{2, 8, 128, 192}, {0, 0, 0, 1}, DType::Float, false},
                   TensorDesc{{1, 1, 1, 1}, {1, 1, 1, 1}, DType::Float, true}};
  p.bprop_tensors = {TensorDesc{{1, 8, 1, 1}, {8, 1, 1, 1}, DType::Float, false},
                     TensorDesc{{1, 1, 1, 1}, {1, 1, 1, 1}, DType::Float, true}};
  p.scale = 0.125;
  p.deterministic = true;
  p.mod_id = 7;
  p.bprop_id = 9;
  p.sm_version = 90;
  return p;
}

struct Change {
  std::string name;
  std::function<void(SdpaProblem&)> apply;
  bool backward_only = false;  // changes the backward key only
};

// Every way one TensorDesc can change: a dim, the number of dims, a stride, the dtype, by_value.
void tensor_changes(std::vector<Change>& out, const std::string& name,
                    std::function<TensorDesc&(SdpaProblem&)> get, bool backward_only) {
  out.push_back({name + ".dims[0]", [get](SdpaProblem& p) { get(p).dims[0] += 1; }, backward_only});
  out.push_back({name + ".dims[last]", [get](SdpaProblem& p) { get(p).dims.back() += 8; }, backward_only});
  out.push_back({name + ".rank", [get](SdpaProblem& p) {
                   get(p).dims.push_back(1);
                   get(p).strides.push_back(1);
                 }, backward_only});
  out.push_back({name + ".strides[0]", [get](SdpaProblem& p) { get(p).strides[0] += 1; }, backward_only});
  out.push_back({name + ".strides[1]", [get](SdpaProblem& p) { get(p).strides[1] += 3; }, backward_only});
  out.push_back({name + ".dtype", [get](SdpaProblem& p) {
                   get(p).dtype = get(p).dtype == DType::Half ? DType::BFloat16 : DType::Half;
                 }, backward_only});
  out.push_back({name + ".by_value", [get](SdpaProblem& p) { get(p).by_value = !get(p).by_value; },
                 backward_only});
}

std::vector<Change> all_changes() {
  std::vector<Change> out;
  out.push_back({"pass", [](SdpaProblem& p) {
                   p.pass = p.pass == Pass::Forward ? Pass::Backward : Pass::Forward;
                 }});
  out.push_back({"device", [](SdpaProblem& p) { p.device = 0; }});
  out.push_back({"device -1 (validation on the CPU)", [](SdpaProblem& p) { p.device = -1; }});
  tensor_changes(out, "q", [](SdpaProblem& p) -> TensorDesc& { return p.q; }, false);
  tensor_changes(out, "k", [](SdpaProblem& p) -> TensorDesc& { return p.k; }, false);
  tensor_changes(out, "v", [](SdpaProblem& p) -> TensorDesc& { return p.v; }, false);
  tensor_changes(out, "o", [](SdpaProblem& p) -> TensorDesc& { return p.o; }, false);
  tensor_changes(out, "lse", [](SdpaProblem& p) -> TensorDesc& { return p.lse; }, false);
  tensor_changes(out, "d_o", [](SdpaProblem& p) -> TensorDesc& { return p.d_o; }, true);
  tensor_changes(out, "dq", [](SdpaProblem& p) -> TensorDesc& { return p.dq; }, true);
  tensor_changes(out, "dk", [](SdpaProblem& p) -> TensorDesc& { return p.dk; }, true);
  tensor_changes(out, "dv", [](SdpaProblem& p) -> TensorDesc& { return p.dv; }, true);
  for (size_t i = 0; i < 3; ++i) {
    tensor_changes(out, "mod_tensors[" + std::to_string(i) + "]",
                   [i](SdpaProblem& p) -> TensorDesc& { return p.mod_tensors[i]; }, false);
  }
  for (size_t i = 0; i < 2; ++i) {
    tensor_changes(out, "bprop_tensors[" + std::to_string(i) + "]",
                   [i](SdpaProblem& p) -> TensorDesc& { return p.bprop_tensors[i]; }, true);
  }
  out.push_back({"mod_tensors: one more", [](SdpaProblem& p) { p.mod_tensors.push_back(p.mod_tensors[0]); }});
  out.push_back({"mod_tensors: one fewer", [](SdpaProblem& p) { p.mod_tensors.pop_back(); }});
  out.push_back({"mod_tensors: none", [](SdpaProblem& p) { p.mod_tensors.clear(); }});
  out.push_back({"mod_tensors: two swapped", [](SdpaProblem& p) {
                   std::swap(p.mod_tensors[0], p.mod_tensors[1]);
                 }});
  out.push_back({"bprop_tensors: one more", [](SdpaProblem& p) {
                   p.bprop_tensors.push_back(p.bprop_tensors[0]);
                 }, true});
  out.push_back({"bprop_tensors: one fewer", [](SdpaProblem& p) { p.bprop_tensors.pop_back(); }, true});
  out.push_back({"bprop_tensors: none", [](SdpaProblem& p) { p.bprop_tensors.clear(); }, true});
  out.push_back({"bprop_tensors: two swapped", [](SdpaProblem& p) {
                   std::swap(p.bprop_tensors[0], p.bprop_tensors[1]);
                 }, true});
  // The last mod tensor becomes the first bprop tensor: same descs in all, other roles.
  out.push_back({"a tensor moved from mod_tensors to bprop_tensors", [](SdpaProblem& p) {
                   p.bprop_tensors.insert(p.bprop_tensors.begin(), p.mod_tensors.back());
                   p.mod_tensors.pop_back();
                 }});
  out.push_back({"scale", [](SdpaProblem& p) { p.scale = 0.25; }});
  out.push_back({"scale, last bit of its double", [](SdpaProblem& p) {
                   p.scale = std::nextafter(p.scale, 1.0);
                 }});
  out.push_back({"scale, -0.0 vs 0.0", [](SdpaProblem& p) { p.scale = -0.0; }});
  out.push_back({"deterministic", [](SdpaProblem& p) { p.deterministic = !p.deterministic; }, true});
  out.push_back({"mod_id", [](SdpaProblem& p) { p.mod_id = 8; }});
  out.push_back({"mod_id 0 (no score_mod)", [](SdpaProblem& p) { p.mod_id = 0; }});
  out.push_back({"bprop_id", [](SdpaProblem& p) { p.bprop_id = 10; }, true});
  out.push_back({"bprop_id 0 (dP passes through)", [](SdpaProblem& p) { p.bprop_id = 0; }, true});
  out.push_back({"sm_version", [](SdpaProblem& p) { p.sm_version = 100; }});
  out.push_back({"sm_version 0 (a real build with plans)", [](SdpaProblem& p) { p.sm_version = 0; }});
  out.push_back({"padded (seq_len tensors)", [](SdpaProblem& p) { p.padded = !p.padded; }});
  out.push_back({"ragged (packed sequences)", [](SdpaProblem& p) { p.ragged = !p.ragged; }});
  return out;
}

}  // namespace

TEST(ProblemKey, EqualProblemsGiveEqualKeysAndHashes) {
  for (Pass pass : {Pass::Forward, Pass::Backward}) {
    const SdpaProblem a = make(pass), b = make(pass);
    EXPECT_EQ(a.key(), b.key());
    EXPECT_EQ(a.key().hash(), b.key().hash());
    const SdpaProblem copy = a;
    EXPECT_EQ(copy.key(), a.key());
  }
  // Default-constructed problems too (nothing uninitialised reaches the key).
  EXPECT_EQ(SdpaProblem{}.key(), SdpaProblem{}.key());
}

TEST(ProblemKey, OneScaleComputedTwoWaysIsOneKey) {
  // The same bit pattern, however computed, is the same key.
  SdpaProblem a = make(Pass::Forward), b = make(Pass::Forward);
  a.scale = 1.0 / 8.0;
  b.scale = 1.0 / std::sqrt(64.0);
  EXPECT_EQ(a.key(), b.key());
}

TEST(ProblemKey, EveryFieldChangesTheBackwardKey) {
  const SdpaProblem base = make(Pass::Backward);
  const GraphKey base_key = base.key();
  for (const Change& change : all_changes()) {
    SCOPED_TRACE(change.name);
    SdpaProblem p = base;
    change.apply(p);
    EXPECT_NE(p.key(), base_key) << change.name << " does not enter the backward key";
    EXPECT_NE(p.key().hash(), base_key.hash()) << change.name << " leaves the hash unchanged";
  }
}

TEST(ProblemKey, EveryForwardFieldChangesTheForwardKeyAndBackwardOnlyFieldsDoNot) {
  const SdpaProblem base = make(Pass::Forward);
  const GraphKey base_key = base.key();
  int backward_only = 0;
  for (const Change& change : all_changes()) {
    SCOPED_TRACE(change.name);
    SdpaProblem p = base;
    change.apply(p);
    if (change.backward_only) {
      ++backward_only;
      // A forward graph does not depend on it: the same cached forward graph serves both values.
      EXPECT_EQ(p.key(), base_key) << change.name << " (backward only) enters the forward key";
    } else {
      EXPECT_NE(p.key(), base_key) << change.name << " does not enter the forward key";
      EXPECT_NE(p.key().hash(), base_key.hash()) << change.name << " leaves the hash unchanged";
    }
  }
  EXPECT_GE(backward_only, 4 * 7 + 2 * 7 + 6);  // the list really has backward-only changes
}

TEST(ProblemKey, ForwardAndBackwardOfOneProblemDiffer) {
  SdpaProblem fwd = make(Pass::Backward);
  fwd.pass = Pass::Forward;
  EXPECT_NE(fwd.key(), make(Pass::Backward).key());
}

TEST(ProblemKey, AllSingleChangesGiveDistinctKeys) {
  // Two different changes never collide: no two fields share a position in the key.
  const SdpaProblem base = make(Pass::Backward);
  std::vector<std::pair<std::string, GraphKey>> keys;
  for (const Change& change : all_changes()) {
    SdpaProblem p = base;
    change.apply(p);
    keys.emplace_back(change.name, p.key());
  }
  for (size_t i = 0; i < keys.size(); ++i) {
    for (size_t j = i + 1; j < keys.size(); ++j) {
      EXPECT_NE(keys[i].second, keys[j].second) << keys[i].first << " and " << keys[j].first;
    }
  }
}
