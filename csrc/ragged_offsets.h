// The ragged offsets of packed sequences (cu_seqlens times a token stride), remembered per
// cu_seqlens tensor and version, so that a cached flex_attention_varlen call launches only
// cuDNN's kernels: each multiply was a kernel launch and ~8 us of host time (H200), twice in the
// forward and twice in the backward, against ~17 us for a whole plain call (issue 15).
//
// The same rule as flex_attention_varlen's host reads (_validation.once_per_version): a tensor's
// values are taken as unchanged while its version counter and its data pointer are (`t.data = u`
// swaps the storage without a version bump). Not remembered: offsets made during CUDA graph
// capture (a replay must follow what the buffer holds then) and of inference tensors (no version
// counter).
#pragma once

#include <ATen/ATen.h>
#include <c10/core/TensorImpl.h>
#include <c10/util/intrusive_ptr.h>

#include <cstdint>
#include <deque>
#include <mutex>
#include <utility>

namespace cudnn_flex {

class RaggedOffsetsCache {
 public:
  explicit RaggedOffsetsCache(size_t capacity) : capacity_(capacity) {}

  // cu_seqlens * stride, made by make() unless this tensor object, at this version, was already
  // multiplied by this stride for this stream. `stream` names the stream the offsets are read on:
  // an evicted tensor goes back to the caching allocator of the stream it was made on, and only
  // that stream's later work can reuse its memory.
  template <class Make>
  at::Tensor get(const at::Tensor& cu_seqlens, int64_t stride, int64_t stream, Make&& make) {
    c10::TensorImpl* impl = cu_seqlens.unsafeGetTensorImpl();
    const uint32_t version = cu_seqlens._version();
    const void* data = cu_seqlens.data_ptr();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (const Entry& e : entries_) {
        // A weak reference keeps the TensorImpl's memory, so a live match at this address is
        // this very tensor, never a new one allocated where a dead one was.
        if (e.impl == impl && !e.of.expired() && e.version == version && e.data == data && e.stride == stride &&
            e.stream == stream)
          return e.offsets;
      }
    }
    at::Tensor offsets = make();
    std::lock_guard<std::mutex> lock(mutex_);
    if (entries_.size() >= capacity_) entries_.pop_front();  // the oldest; a tiny tensor each
    entries_.push_back(Entry{c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(
                                 cu_seqlens.getIntrusivePtr()),
                             impl, version, data, stride, stream, offsets});
    return offsets;
  }

  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    entries_.clear();
  }

 private:
  struct Entry {
    c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> of;
    c10::TensorImpl* impl;
    uint32_t version;
    const void* data;
    int64_t stride;
    int64_t stream;
    at::Tensor offsets;
  };
  size_t capacity_;
  std::mutex mutex_;
  std::deque<Entry> entries_;
};

}  // namespace cudnn_flex
