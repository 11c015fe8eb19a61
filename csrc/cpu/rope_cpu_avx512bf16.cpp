// The CPU kernel for AVX-512 with the BF16 instructions: setup.py compiles this file with
// CPU_CAPABILITY=AVX512_BF16 (ATen's AVX-512 vector code) and -mavx512bf16.
#include "rope_cpu_kernel.h"
#include "norm_rope_cpu_kernel.h"
