// Stands in for the CUDA header of this name under cuda_emu.h, which defines
// the types and conversions the kernels use.
#pragma once
