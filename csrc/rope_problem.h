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

namespace rope {

// The RMSNorm half of one of q, k in the fused QK-RMSNorm + RoPE (docs/math.md section 15.1).
struct NormDesc {
  // (weight + weight_offset) in the math type (float32, float64 for float64 x), unit stride:
  // [head_dim], or [heads * head_dim] when the norm spans every head of a token.
  const void* scale = nullptr;
  // 1 / sqrt(mean(x**2) + eps) of each normalized group, math type, contiguous
  // [tokens, heads] (or [tokens, 1] across heads). The forward writes it (unless null:
  // the in-place op keeps none), the backward reads it.
  void* rstd = nullptr;
  // Backward only: the forward's input x (strides in `x_stride_*`), and where the
  // scale's gradient goes ([groups, scale size] partial sums in the math type, summed
  // over groups in order afterwards: deterministic, no atomics).
  const void* x = nullptr;
  int64_t x_stride_batch = 0, x_stride_seq = 0, x_stride_head = 0, x_stride_dim = 1;
  void* scale_grad_partial = nullptr;
  void* scale_grad = nullptr;  // [scale size], math type
};

// out = rope(rms_norm(x) * scale) for x = q and k (forward), or the gradients of q, k
// and both scales given the outputs' gradients (backward). `rope` describes the
// rotation: in the forward x[i].in/out are the inputs and outputs; in the backward
// they are the incoming gradient and the gradient of x, and rope.inverse is set.
struct NormRopeProblem {
  RopeProblem rope;
  NormDesc norm[2];
  double eps = 1e-6;
  bool across_heads = false;
  bool backward = false;
  int64_t tokens_per_group = 1;  // backward: tokens summed into one row of scale_grad_partial
  int64_t groups = 0;            // backward: rows of scale_grad_partial
};

}  // namespace rope
