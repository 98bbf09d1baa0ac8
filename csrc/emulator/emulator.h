// A CPU emulator of the CUDA SIMT machine, header-only, for g++ on x86-64 Linux: the
// kernels in csrc/kernels/ compile against it unmodified (csrc/kernels/mma_utils.cuh
// calls the std_ext::emu hooks under STD_EXT_EMULATOR). Design, schedules, environment
// variables and limits: csrc/emulator/README.md.
#pragma once

#include "emulator/types.h"
#include "emulator/machine.h"
#include "emulator/device.h"
#include "emulator/runtime.h"
