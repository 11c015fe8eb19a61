// A RoPE call reduced to raw pointers, sizes and 64-bit strides.
//
// The adapter (rope_adapter.cpp) checks the tensors and fills this struct; the
// kernels (cpu/, cuda/) read only this struct and never touch at::Tensor.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "rope_math.h"

namespace rope {

// One tensor of vectors to rotate, seen as [batch, seq, heads, head_dim].
struct HeadsDesc {
  const void* in = nullptr;  // x
  void* out = nullptr;       // the result; equal to `in` for the in-place op
  int64_t heads = 0;
  int64_t head_dim = 0;
  int64_t in_stride_batch = 0, in_stride_seq = 0, in_stride_head = 0, in_stride_dim = 1;
  int64_t out_stride_batch = 0, out_stride_seq = 0, out_stride_head = 0, out_stride_dim = 1;
};

struct RopeProblem {
  int64_t batch = 0, seq = 0;
  int64_t pairs = 0;  // r / 2: pairs per head
  bool interleaved = false;
  bool inverse = false;
  c10::ScalarType x_dtype = c10::ScalarType::Float;
  c10::ScalarType table_dtype = c10::ScalarType::Float;
  const void* cos = nullptr;
  const void* sin = nullptr;
  TableIndex table;
  HeadsDesc x[2];  // q and k of a fused call; x[0] alone otherwise
  int num_x = 1;
};

}  // namespace rope
