#include "score_mod_bridge.h"

#include <cudnn_frontend.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <limits>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <sstream>

namespace py = pybind11;
namespace fe = cudnn_frontend;

namespace cudnn_flex::bridge {
namespace {

// A tensor of the graph being built, as a score_mod sees it, stamped with its build so that a
// tensor kept from an earlier build is caught. cuDNN may hand the score_mod and the bprop of one
// backward build different (sub)graphs; tensors may flow between them (the softcap pattern).
struct BridgeTensor {
  TensorPtr tensor;
  int64_t build = 0;
};

thread_local int64_t current_build = 0;
// The graph of the callback running now: operators on tensors (`s * 0.5`) add their node here.
thread_local GraphPtr current_graph;
// The callback's input (the score, or dP): a tensor of the score's full shape.
thread_local TensorPtr current_input;
// A zero of the score's shape for the callback running now, made on first use.
thread_local TensorPtr current_zero;
// The callbacks' inputs (score or dP) in this build.
thread_local std::unordered_set<const fe::graph::Tensor_attributes*> callback_inputs;
// Each op output of this build -> (its inputs, its op name), and what the callbacks returned: to find
// ops whose result is never used.
struct OpRecord {
  std::vector<const fe::graph::Tensor_attributes*> inputs;
  std::string op;
};
thread_local std::unordered_map<const fe::graph::Tensor_attributes*, OpRecord> op_inputs;
thread_local std::vector<TensorPtr> callback_results;
// The seq_len tensors of a padded batch whose padding mask the current score_mod has yet to get.
thread_local TensorPtr pending_seq_len_q, pending_seq_len_kv;

// The graph handed to a score_mod: the cuDNN frontend graph with the score_mod DSL on it.
struct BridgeGraph {
  GraphPtr graph;
};

// What an op produces, which decides its default output (and compute) data type.
enum class Kind { Arithmetic, Index, Compare, Logical, Select };

py::object* dispatcher = nullptr;  // cudnn_flex._registry.dispatch, set once at import

[[noreturn]] void raise(PyObject* type, const std::string& message) {
  PyErr_SetString(type, message.c_str());
  throw py::error_already_set();
}

// A graph tensor of `g`, or a Python number made into a graph constant.
TensorPtr operand(const GraphPtr& g, const py::handle& value, const char* op, const char* arg) {
  if (py::isinstance<BridgeTensor>(value)) {
    auto& t = value.cast<BridgeTensor&>();
    if (t.build != current_build) {
      raise(PyExc_ValueError, std::string("cudnn_flex: argument '") + arg + "' of " + op +
                                  "() is a tensor of another graph (one kept from an earlier build?); "
                                  "a score_mod may only use the tensors it is given in this call");
    }
    return t.tensor;
  }
  if (py::isinstance<py::bool_>(value)) {
    raise(PyExc_TypeError, std::string("cudnn_flex: argument '") + arg + "' of " + op +
                               "() is a bool; use a comparison or the number 0 or 1");
  }
  if (py::isinstance<py::int_>(value) || py::isinstance<py::float_>(value)) {
    // Numbers become FLOAT constants baked into the graph; cuDNN converts them where they meet
    // INT32 indices.
    return std::make_shared<fe::graph::Tensor_attributes>(value.cast<float>());
  }
  std::string type_name = py::str(py::type::of(value).attr("__qualname__"));
  std::string hint = type_name == "Tensor"
                         ? " A torch.Tensor cannot be used directly: pass it in score_mod_tensors and use "
                           "tensors['name'] inside the score_mod."
                         : "";
  raise(PyExc_TypeError, std::string("cudnn_flex: argument '") + arg + "' of " + op +
                             "() must be a cudnn_flex graph tensor or a Python number, got " + type_name +
                             "." + hint);
}

const auto kNotSet = fe::DataType_t::NOT_SET;

TensorPtr raw_pointwise(const GraphPtr& g, fe::PointwiseMode_t mode, const std::vector<TensorPtr>& in,
                        fe::DataType_t compute, fe::DataType_t output, const std::string& name,
                        const std::function<void(fe::graph::Pointwise_attributes&)>& extra = nullptr) {
  auto attrs = fe::graph::Pointwise_attributes().set_mode(mode).set_name(name);
  if (compute != fe::DataType_t::NOT_SET) attrs.set_compute_data_type(compute);
  if (extra) extra(attrs);
  TensorPtr out;
  switch (in.size()) {
    case 1: out = g->pointwise(in[0], attrs); break;
    case 2: out = g->pointwise(in[0], in[1], attrs); break;
    default: out = g->pointwise(in[0], in[1], in[2], attrs); break;
  }
  out->set_data_type(output);
  OpRecord record{{}, nlohmann::json(mode).get<std::string>()};
  for (const auto& t : in) record.inputs.push_back(t.get());
  op_log().push_back(record.op);
  op_inputs[out.get()] = std::move(record);
  return out;
}

// An intermediate of this build's score_mod subgraphs: an op output or a callback's input. Each
// has the score's full [B, H, Sq, Skv] shape (every op gets an intermediate first input).
bool is_intermediate(const TensorPtr& t) { return op_inputs.count(t.get()) || callback_inputs.count(t.get()); }

TensorPtr constant(float value) { return std::make_shared<fe::graph::Tensor_attributes>(value); }

// cuDNN 9.19 fuses a pointwise op into SDPA only when its first input is an intermediate of the
// score_mod subgraph: with a constant, a score_mod tensor or a pair of broadcast tensors first it
// refuses the graph (NOT_SUPPORTED_GRAPH_PATTERN "in_ports[0].first.isVirtual != true", seen for
// `doc_q == doc_k`, `mod(-0.5, x)`, `binary_select(1.0, 0.0, m)`). Such a first input is lifted:
// zero + x, with a zero of the score's shape derived from an index, which cuDNN accepts and which
// changes no value.
TensorPtr lift_to_score_shape(const GraphPtr& g, const TensorPtr& t) {
  if (!current_zero) {
    auto index = raw_pointwise(g, fe::PointwiseMode_t::GEN_INDEX, {current_input}, fe::DataType_t::INT32,
                               fe::DataType_t::INT32, "lift_index", [](auto& a) { a.set_axis(3); });
    current_zero = raw_pointwise(g, fe::PointwiseMode_t::MUL, {index, constant(0.0f)}, kNotSet,
                                 fe::DataType_t::FLOAT, "lift_zero");
  }
  return raw_pointwise(g, fe::PointwiseMode_t::ADD, {current_zero, t}, kNotSet, fe::DataType_t::FLOAT, "lift");
}

BridgeTensor pointwise(const GraphPtr& g, fe::PointwiseMode_t mode, Kind kind, std::vector<TensorPtr> in,
                       fe::DataType_t compute, const std::string& name,
                       const std::function<void(fe::graph::Pointwise_attributes&)>& extra = nullptr) {
  using M = fe::PointwiseMode_t;
  if (kind == Kind::Logical) {
    // cuDNN 9.19 refuses LOGICAL_AND/OR/NOT on booleans inside SDPA (NOT_SUPPORTED_DATA_TYPE), so
    // they are lowered to ops it fuses: masks as 0/1 floats through binary_select, then a compare.
    auto as_float = [&](const TensorPtr& mask) {
      return pointwise(g, M::BINARY_SELECT, Kind::Select, {constant(1.0f), constant(0.0f), mask}, kNotSet,
                       name).tensor;
    };
    if (mode == M::LOGICAL_NOT) {
      return pointwise(g, M::CMP_LT, Kind::Compare, {as_float(in[0]), constant(0.5f)}, kNotSet, name);
    }
    // Chained selects: a AND b = (a ? float(b) : 0) > 0.5; a OR b = (a ? 1 : float(b)) > 0.5.
    const bool is_and = mode == M::LOGICAL_AND;
    auto chosen = pointwise(g, M::BINARY_SELECT, Kind::Select,
                            {is_and ? as_float(in[1]) : constant(1.0f), is_and ? constant(0.0f) : as_float(in[1]), in[0]},
                            kNotSet, name);
    return pointwise(g, M::CMP_GT, Kind::Compare, {chosen.tensor, constant(0.5f)}, kNotSet, name);
  }
  if (!is_intermediate(in[0])) in[0] = lift_to_score_shape(g, in[0]);
  fe::DataType_t output = fe::DataType_t::FLOAT;
  switch (kind) {
    case Kind::Index:
      if (compute == fe::DataType_t::NOT_SET) compute = fe::DataType_t::INT32;
      output = fe::DataType_t::INT32;
      break;
    case Kind::Compare:
      output = fe::DataType_t::BOOLEAN;
      break;
    case Kind::Logical:
      if (compute == fe::DataType_t::NOT_SET) compute = fe::DataType_t::BOOLEAN;
      output = fe::DataType_t::BOOLEAN;
      break;
    case Kind::Select:
      break;
    case Kind::Arithmetic:
      if (compute != fe::DataType_t::NOT_SET) output = compute;
      break;
  }
  return BridgeTensor{raw_pointwise(g, mode, in, compute, output, name, extra), current_build};
}

using GraphClass = py::class_<BridgeGraph>;

void def_unary(GraphClass& c, const char* op, fe::PointwiseMode_t mode, Kind kind = Kind::Arithmetic) {
  c.def(
      op,
      [op, mode, kind](BridgeGraph& self, py::object input, fe::DataType_t compute, const std::string& name) {
        return pointwise(self.graph, mode, kind, {operand(self.graph, input, op, "input")}, compute, name);
      },
      py::arg("input"), py::arg("compute_data_type") = kNotSet, py::arg("name") = "");
}

void def_binary(GraphClass& c, const char* op, fe::PointwiseMode_t mode, const char* a, const char* b,
                Kind kind = Kind::Arithmetic) {
  c.def(
      op,
      [op, mode, kind, a, b](BridgeGraph& self, py::object x, py::object y, fe::DataType_t compute,
                             const std::string& name) {
        return pointwise(self.graph, mode, kind, {operand(self.graph, x, op, a), operand(self.graph, y, op, b)},
                         compute, name);
      },
      py::arg(a), py::arg(b), py::arg("compute_data_type") = kNotSet, py::arg("name") = "");
}

// Binary ops whose attributes carry one optional float (swish beta, relu slope).
void def_with_float(GraphClass& c, const char* op, fe::PointwiseMode_t mode, bool is_backward, const char* attr,
                    void (*apply)(fe::graph::Pointwise_attributes&, float)) {
  if (is_backward) {
    c.def(
        op,
        [op, mode, apply](BridgeGraph& self, py::object loss, py::object input, std::optional<float> value,
                          fe::DataType_t compute, const std::string& name) {
          return pointwise(self.graph, mode, Kind::Arithmetic,
                           {operand(self.graph, loss, op, "loss"), operand(self.graph, input, op, "input")},
                           compute, name, [&](auto& a) {
                             if (value) apply(a, *value);
                           });
        },
        py::arg("loss"), py::arg("input"), py::arg(attr) = py::none(), py::arg("compute_data_type") = kNotSet,
        py::arg("name") = "");
  } else {
    c.def(
        op,
        [op, mode, apply](BridgeGraph& self, py::object input, std::optional<float> value, fe::DataType_t compute,
                          const std::string& name) {
          return pointwise(self.graph, mode, Kind::Arithmetic, {operand(self.graph, input, op, "input")}, compute,
                           name, [&](auto& a) {
                             if (value) apply(a, *value);
                           });
        },
        py::arg("input"), py::arg(attr) = py::none(), py::arg("compute_data_type") = kNotSet,
        py::arg("name") = "");
  }
}

std::string repr(const BridgeTensor& t) {
  std::ostringstream s;
  s << "cudnn_flex.Tensor(name='" << t.tensor->get_name() << "', dim=[";
  auto dims = t.tensor->get_dim();
  for (size_t i = 0; i < dims.size(); ++i) s << (i ? ", " : "") << dims[i];
  s << "], data_type=" << nlohmann::json(t.tensor->get_data_type()).dump() << ")";
  return s.str();
}

const GraphPtr& graph_for_operator() {
  if (!current_graph) {
    raise(PyExc_RuntimeError,
          "cudnn_flex: graph tensors can only be combined while a score_mod runs (during a graph build)");
  }
  return current_graph;
}

// Operators on tensors: `s + b`, `2 * s`, `r >= c`, `~m`, `m & n`.
void def_operators(py::class_<BridgeTensor>& c) {
  using M = fe::PointwiseMode_t;
  auto binary = [&c](const char* dunder, const char* rdunder, M mode, Kind kind, const char* op) {
    c.def(dunder, [mode, kind, op](const BridgeTensor& self, py::object other) {
      const GraphPtr& g = graph_for_operator();
      return pointwise(g, mode, kind, {operand(g, py::cast(self), op, "self"), operand(g, other, op, "other")},
                       kNotSet, "");
    });
    if (rdunder) {
      c.def(rdunder, [mode, kind, op](const BridgeTensor& self, py::object other) {
        const GraphPtr& g = graph_for_operator();
        return pointwise(g, mode, kind, {operand(g, other, op, "other"), operand(g, py::cast(self), op, "self")},
                         kNotSet, "");
      });
    }
  };
  binary("__add__", "__radd__", M::ADD, Kind::Arithmetic, "+");
  binary("__sub__", "__rsub__", M::SUB, Kind::Arithmetic, "-");
  binary("__mul__", "__rmul__", M::MUL, Kind::Arithmetic, "*");
  binary("__truediv__", "__rtruediv__", M::DIV, Kind::Arithmetic, "/");
  binary("__pow__", "__rpow__", M::POW, Kind::Arithmetic, "**");
  binary("__mod__", "__rmod__", M::MOD, Kind::Arithmetic, "%");
  binary("__lt__", nullptr, M::CMP_LT, Kind::Compare, "<");
  binary("__le__", nullptr, M::CMP_LE, Kind::Compare, "<=");
  binary("__gt__", nullptr, M::CMP_GT, Kind::Compare, ">");
  binary("__ge__", nullptr, M::CMP_GE, Kind::Compare, ">=");
  binary("__eq__", nullptr, M::CMP_EQ, Kind::Compare, "==");
  binary("__ne__", nullptr, M::CMP_NEQ, Kind::Compare, "!=");
  binary("__and__", "__rand__", M::LOGICAL_AND, Kind::Logical, "&");
  binary("__or__", "__ror__", M::LOGICAL_OR, Kind::Logical, "|");
  auto unary = [&c](const char* dunder, M mode, Kind kind, const char* op) {
    c.def(dunder, [mode, kind, op](const BridgeTensor& self) {
      const GraphPtr& g = graph_for_operator();
      return pointwise(g, mode, kind, {operand(g, py::cast(self), op, "self")}, kNotSet, "");
    });
  };
  unary("__neg__", M::NEG, Kind::Arithmetic, "-");
  unary("__abs__", M::ABS, Kind::Arithmetic, "abs");
  unary("__invert__", M::LOGICAL_NOT, Kind::Logical, "~");
  // __eq__ is an op here, so identity hashing has to be restored explicitly.
  c.def("__hash__", [](const BridgeTensor& s) { return reinterpret_cast<intptr_t>(s.tensor.get()); });
  c.def("__bool__", [](const BridgeTensor&) -> bool {
    raise(PyExc_TypeError,
          "cudnn_flex: a graph tensor has no truth value while the graph is built; use "
          "graph.binary_select(a, b, mask) instead of Python if/and/or on tensors");
  });
}

void bind_graph_ops(GraphClass& c) {
  using M = fe::PointwiseMode_t;
  for (auto [op, mode] : std::initializer_list<std::pair<const char*, M>>{
           {"add", M::ADD}, {"mul", M::MUL}, {"sub", M::SUB}, {"div", M::DIV}, {"add_square", M::ADD_SQUARE}}) {
    def_binary(c, op, mode, "a", "b");
  }
  def_binary(c, "bias", M::ADD, "input", "bias");
  def_binary(c, "scale", M::MUL, "input", "scale");
  for (auto [op, mode] : std::initializer_list<std::pair<const char*, M>>{
           {"max", M::MAX}, {"min", M::MIN}, {"mod", M::MOD}, {"pow", M::POW}}) {
    def_binary(c, op, mode, "input0", "input1");
  }
  for (auto [op, mode] : std::initializer_list<std::pair<const char*, M>>{{"cmp_eq", M::CMP_EQ},
                                                                         {"cmp_neq", M::CMP_NEQ},
                                                                         {"cmp_gt", M::CMP_GT},
                                                                         {"cmp_ge", M::CMP_GE},
                                                                         {"cmp_lt", M::CMP_LT},
                                                                         {"cmp_le", M::CMP_LE}}) {
    def_binary(c, op, mode, "input", "comparison", Kind::Compare);
  }
  def_binary(c, "logical_and", M::LOGICAL_AND, "a", "b", Kind::Logical);
  def_binary(c, "logical_or", M::LOGICAL_OR, "a", "b", Kind::Logical);
  def_unary(c, "logical_not", M::LOGICAL_NOT, Kind::Logical);
  for (auto [op, mode] : std::initializer_list<std::pair<const char*, M>>{
           {"sqrt", M::SQRT},   {"tanh", M::TANH_FWD},       {"elu", M::ELU_FWD},
           {"gelu", M::GELU_FWD}, {"sigmoid", M::SIGMOID_FWD}, {"softplus", M::SOFTPLUS_FWD},
           {"gelu_approx_tanh", M::GELU_APPROX_TANH_FWD},     {"erf", M::ERF},
           {"identity", M::IDENTITY}, {"exp", M::EXP},        {"log", M::LOG},
           {"neg", M::NEG},     {"abs", M::ABS},             {"ceil", M::CEIL},
           {"floor", M::FLOOR}, {"rsqrt", M::RSQRT},         {"reciprocal", M::RECIPROCAL},
           {"sin", M::SIN},     {"cos", M::COS},             {"tan", M::TAN}}) {
    def_unary(c, op, mode);
  }
  for (auto [op, mode] : std::initializer_list<std::pair<const char*, M>>{
           {"tanh_backward", M::TANH_BWD},
           {"sigmoid_backward", M::SIGMOID_BWD},
           {"elu_backward", M::ELU_BWD},
           {"gelu_backward", M::GELU_BWD},
           {"softplus_backward", M::SOFTPLUS_BWD},
           {"gelu_approx_tanh_backward", M::GELU_APPROX_TANH_BWD}}) {
    def_binary(c, op, mode, "loss", "input");
  }
  auto slope = [](fe::graph::Pointwise_attributes& a, float v) { a.set_relu_lower_clip_slope(v); };
  auto beta = [](fe::graph::Pointwise_attributes& a, float v) { a.set_swish_beta(v); };
  def_with_float(c, "leaky_relu", M::RELU_FWD, false, "negative_slope", slope);
  def_with_float(c, "leaky_relu_backward", M::RELU_BWD, true, "negative_slope", slope);
  def_with_float(c, "swish", M::SWISH_FWD, false, "swish_beta", beta);
  def_with_float(c, "swish_backward", M::SWISH_BWD, true, "swish_beta", beta);

  auto relu_attrs = [](std::optional<float> slope, std::optional<float> lower, std::optional<float> upper) {
    return [=](fe::graph::Pointwise_attributes& a) {
      if (slope) a.set_relu_lower_clip_slope(*slope);
      if (lower) a.set_relu_lower_clip(*lower);
      if (upper) a.set_relu_upper_clip(*upper);
    };
  };
  c.def(
      "relu",
      [relu_attrs](BridgeGraph& self, py::object input, std::optional<float> negative_slope,
                   std::optional<float> lower_clip, std::optional<float> upper_clip, fe::DataType_t compute,
                   const std::string& name) {
        return pointwise(self.graph, M::RELU_FWD, Kind::Arithmetic, {operand(self.graph, input, "relu", "input")},
                         compute, name, relu_attrs(negative_slope, lower_clip, upper_clip));
      },
      py::arg("input"), py::arg("negative_slope") = py::none(), py::arg("lower_clip") = py::none(),
      py::arg("upper_clip") = py::none(), py::arg("compute_data_type") = kNotSet, py::arg("name") = "");
  c.def(
      "relu_backward",
      [relu_attrs](BridgeGraph& self, py::object loss, py::object input, std::optional<float> negative_slope,
                   std::optional<float> lower_clip, std::optional<float> upper_clip, fe::DataType_t compute,
                   const std::string& name) {
        return pointwise(self.graph, M::RELU_BWD, Kind::Arithmetic,
                         {operand(self.graph, loss, "relu_backward", "loss"),
                          operand(self.graph, input, "relu_backward", "input")},
                         compute, name, relu_attrs(negative_slope, lower_clip, upper_clip));
      },
      py::arg("loss"), py::arg("input"), py::arg("negative_slope") = py::none(), py::arg("lower_clip") = py::none(),
      py::arg("upper_clip") = py::none(), py::arg("compute_data_type") = kNotSet, py::arg("name") = "");
  c.def(
      "gen_index",
      [](BridgeGraph& self, py::object input, int64_t axis, fe::DataType_t compute, const std::string& name) {
        if (axis < 0 || axis > 3) {
          raise(PyExc_ValueError, "cudnn_flex: gen_index axis must be 0 (batch), 1 (head), 2 (query) or 3 (key), got " +
                                      std::to_string(axis));
        }
        return pointwise(self.graph, M::GEN_INDEX, Kind::Index, {operand(self.graph, input, "gen_index", "input")},
                         compute, name, [axis](auto& a) { a.set_axis(axis); });
      },
      py::arg("input"), py::arg("axis"), py::arg("compute_data_type") = kNotSet, py::arg("name") = "");
  // The diagonal band lo <= q_idx - kv_idx <= hi (either bound optional), everything else -inf,
  // in the frontend's own form (attn::score_modifiers::sliding_window_mask, top-left aligned):
  // cuDNN recognises this pattern and skips the tiles outside the band, forward and backward
  // (../shared/reference/cudnn_masks.md). It must be the last op of the score_mod (FE's order:
  // user ops, padding, band). The right bound keeps row + shift >= col (shift = -lo), the left
  // bound keeps col + left > row (left = hi + 1), as the frontend builds them.
  c.def(
      "_band_mask",
      [](BridgeGraph& self, py::object input, std::optional<int64_t> lo, std::optional<int64_t> hi) {
        TensorPtr x = operand(self.graph, input, "_band_mask", "input");
        if (!lo && !hi) raise(PyExc_ValueError, "cudnn_flex: _band_mask needs a lower or an upper bound");
        x = apply_pending_padding(self.graph, x);  // the frontend's order: padding, then the band
        auto band = [&](const TensorPtr& in, TensorPtr left, TensorPtr shift, fe::PointwiseMode_t mode,
                        const char* name) {
          auto out = self.graph->diagonal_band_mask(
              in, constant(-std::numeric_limits<float>::infinity()), nullptr, nullptr, nullptr, nullptr,
              std::move(left), std::move(shift),
              fe::graph::DiagonalBandMask_attributes().set_name(name).set_comparison_mode(mode));
          out->set_data_type(fe::DataType_t::FLOAT);
          op_log().push_back("DIAGONAL_BAND_MASK");
          op_inputs[out.get()] = OpRecord{{in.get()}, "DIAGONAL_BAND_MASK"};
          return out;
        };
        if (lo) {
          TensorPtr shift = *lo == 0 ? nullptr
                                     : std::make_shared<fe::graph::Tensor_attributes>(static_cast<int32_t>(-*lo));
          x = band(x, nullptr, shift, M::CMP_GE, "band_right_bound");
        }
        if (hi) x = band(x, constant(static_cast<float>(*hi + 1)), nullptr, M::CMP_GT, "band_left_bound");
        return BridgeTensor{x, current_build};
      },
      py::arg("input"), py::arg("lo") = py::none(), py::arg("hi") = py::none());
  c.def(
      "binary_select",
      [](BridgeGraph& self, py::object input0, py::object input1, py::object mask, fe::DataType_t compute,
         const std::string& name) {
        return pointwise(self.graph, M::BINARY_SELECT, Kind::Select,
                         {operand(self.graph, input0, "binary_select", "input0"),
                          operand(self.graph, input1, "binary_select", "input1"),
                          operand(self.graph, mask, "binary_select", "mask")},
                         compute, name);
      },
      py::arg("input0"), py::arg("input1"), py::arg("mask"), py::arg("compute_data_type") = kNotSet,
      py::arg("name") = "");
}

}  // namespace

std::vector<std::string>& op_log() {
  thread_local std::vector<std::string> log;
  return log;
}

void begin_build() {
  static std::atomic<int64_t> builds{0};
  current_build = ++builds;
  op_log().clear();
  callback_inputs.clear();
  op_inputs.clear();
  callback_results.clear();
  expect_padding(nullptr, nullptr);
}

std::vector<std::string> unused_ops() {
  std::unordered_set<const fe::graph::Tensor_attributes*> reached;
  std::vector<const fe::graph::Tensor_attributes*> stack;
  for (const auto& r : callback_results) stack.push_back(r.get());
  while (!stack.empty()) {
    auto t = stack.back();
    stack.pop_back();
    if (!reached.insert(t).second) continue;
    auto it = op_inputs.find(t);
    if (it != op_inputs.end()) stack.insert(stack.end(), it->second.inputs.begin(), it->second.inputs.end());
  }
  std::vector<std::string> unused;
  for (const auto& [t, record] : op_inputs) {
    if (!reached.count(t)) unused.push_back(record.op);
  }
  return unused;
}

TensorPtr call_python(int64_t callable_id, Role role, const GraphPtr& graph, const TensorPtr& input,
                      const TensorList& tensors) {
  py::gil_scoped_acquire gil;
  if (dispatcher == nullptr) {
    raise(PyExc_RuntimeError, "cudnn_flex: the score_mod dispatcher is not set; import cudnn_flex first");
  }
  py::list inputs;
  for (const auto& tensor : tensors) inputs.append(BridgeTensor{tensor, current_build});
  struct CurrentCallback {  // restored even when the score_mod raises
    GraphPtr saved_graph = current_graph;
    TensorPtr saved_input = current_input, saved_zero = current_zero;
    CurrentCallback(const GraphPtr& g, const TensorPtr& in) {
      current_graph = g;
      current_input = in;
      current_zero = nullptr;
    }
    ~CurrentCallback() {
      current_graph = saved_graph;
      current_input = saved_input;
      current_zero = saved_zero;
    }
  } scope(graph, input);
  callback_inputs.insert(input.get());
  py::object result =
      (*dispatcher)(callable_id, BridgeGraph{graph}, BridgeTensor{input, current_build}, inputs, static_cast<int64_t>(role));
  // The dispatcher has checked the type; the build is checked here, where it is known.
  TensorPtr out = operand(graph, result, "score_mod", "return value");
  if (out == input) {
    // A score_mod that returns its input unchanged adds no node, and cuDNN refuses an empty
    // score_mod subgraph: give it one identity node.
    out = pointwise(graph, fe::PointwiseMode_t::IDENTITY, Kind::Arithmetic, {input}, kNotSet, "identity").tensor;
  }
  callback_results.push_back(out);
  return out;
}

namespace {

// value where (q_idx, kv_idx) < (s_q, s_kv), `fill` in the padding of a partial tile: INT32
// indices compared with the lengths, then a select, per axis (two selects, not a LOGICAL_AND of
// booleans, which cuDNN 9.19 refuses inside SDPA).
TensorPtr outside_the_scores(const GraphPtr& g, TensorPtr value, int64_t s_q, int64_t s_kv, float fill) {
  using M = fe::PointwiseMode_t;
  const int64_t lengths[] = {s_q, s_kv};
  for (int64_t axis : {2, 3}) {
    auto index = raw_pointwise(g, M::GEN_INDEX, {value}, fe::DataType_t::INT32, fe::DataType_t::INT32,
                               "padding_index", [axis](auto& a) { a.set_axis(axis); });
    auto inside = raw_pointwise(g, M::CMP_LT, {index, constant(static_cast<float>(lengths[axis - 2]))}, kNotSet,
                                fe::DataType_t::BOOLEAN, "padding_inside");
    value = raw_pointwise(g, M::BINARY_SELECT, {value, constant(fill), inside}, kNotSet, fe::DataType_t::FLOAT,
                          "padding_select");
  }
  callback_results.push_back(value);
  return value;
}

}  // namespace

TensorPtr zero_outside_the_scores(const GraphPtr& g, TensorPtr value, int64_t s_q, int64_t s_kv) {
  return outside_the_scores(g, std::move(value), s_q, s_kv, 0.0f);
}

TensorPtr minus_inf_outside_the_scores(const GraphPtr& g, TensorPtr value, int64_t s_q, int64_t s_kv) {
  return outside_the_scores(g, std::move(value), s_q, s_kv, -std::numeric_limits<float>::infinity());
}

void expect_padding(TensorPtr seq_len_q, TensorPtr seq_len_kv) {
  pending_seq_len_q = std::move(seq_len_q);
  pending_seq_len_kv = std::move(seq_len_kv);
}

TensorPtr apply_pending_padding(const GraphPtr& g, TensorPtr value) {
  if (!pending_seq_len_q) return value;
  auto out = fe::graph::attn::score_modifiers::padding_mask(g, value, std::exchange(pending_seq_len_kv, nullptr),
                                                            std::exchange(pending_seq_len_q, nullptr));
  out->set_data_type(fe::DataType_t::FLOAT);
  op_log().push_back("PADDING_MASK");
  op_inputs[out.get()] = OpRecord{{value.get()}, "PADDING_MASK"};
  callback_results.push_back(out);  // a result of the score_mod, used even when nothing follows it
  return out;
}

void bind(py::module_& m) {
  py::enum_<fe::DataType_t>(m, "data_type", "Data types of graph tensors (as in the cuDNN frontend).")
      .value("NOT_SET", fe::DataType_t::NOT_SET)
      .value("FLOAT", fe::DataType_t::FLOAT)
      .value("DOUBLE", fe::DataType_t::DOUBLE)
      .value("HALF", fe::DataType_t::HALF)
      .value("BFLOAT16", fe::DataType_t::BFLOAT16)
      .value("INT8", fe::DataType_t::INT8)
      .value("INT32", fe::DataType_t::INT32)
      .value("INT64", fe::DataType_t::INT64)
      .value("UINT8", fe::DataType_t::UINT8)
      .value("BOOLEAN", fe::DataType_t::BOOLEAN);

  py::class_<BridgeTensor> tensor(m, "Tensor", "A tensor of the cuDNN graph being built, seen by a score_mod.");
  tensor.def("set_data_type", [](BridgeTensor& self, fe::DataType_t dt) -> BridgeTensor& {
        self.tensor->set_data_type(dt);
        return self;
      }, py::return_value_policy::reference_internal)
      .def("get_data_type", [](const BridgeTensor& self) { return self.tensor->get_data_type(); })
      .def("set_name", [](BridgeTensor& self, const std::string& n) -> BridgeTensor& {
        self.tensor->set_name(n);
        return self;
      }, py::return_value_policy::reference_internal)
      .def("get_name", [](const BridgeTensor& self) { return self.tensor->get_name(); })
      .def("get_dim", [](const BridgeTensor& self) { return self.tensor->get_dim(); })
      .def("get_stride", [](const BridgeTensor& self) { return self.tensor->get_stride(); })
      .def("__repr__", &repr);
  def_operators(tensor);

  GraphClass graph(m, "Graph", "The cuDNN graph being built, handed to a score_mod.");
  bind_graph_ops(graph);
  graph.def("__repr__", [](const BridgeGraph&) { return std::string("cudnn_flex.Graph(<being built>)"); });

  m.def("_set_dispatcher", [](py::object fn) {
    // Kept for the life of the process: graphs may be built until the interpreter exits.
    if (dispatcher == nullptr) dispatcher = new py::object();
    *dispatcher = std::move(fn);
  });
}

}  // namespace cudnn_flex::bridge
