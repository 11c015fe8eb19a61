// The CPU kernel for one instruction set: setup.py compiles this file with
// CPU_CAPABILITY=DEFAULT and the matching -m flags.
#include "rope_cpu_kernel.h"
#include "norm_rope_cpu_kernel.h"
