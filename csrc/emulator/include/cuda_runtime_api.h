// Emulator build: stands in for the CUDA toolkit's <cuda_runtime_api.h> (this folder comes first on
// the include path, so the real header is never seen).
#pragma once

#include "emulator/emulator.h"
