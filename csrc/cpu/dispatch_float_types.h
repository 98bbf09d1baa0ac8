// Dispatch over the three input dtypes the ops accept (float64 is rejected by the
// argument checks, so no kernel is instantiated for it).
#pragma once

#include <ATen/Dispatch.h>

#define STD_EXT_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)             \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                  \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)     \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
