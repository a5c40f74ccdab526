#!/usr/bin/env bash
# ab_fwd.sh -- build test_fwd from the working tree with dev/prof/head_fwd.tar's forward files swapped in (the
# committed forward), in /tmp/ab, and time its --bench rows given as arguments (dev tool). Make the tar first, here:
#   git archive -o dev/prof/head_fwd.tar HEAD src/cuda/fwd_kernel.cuh src/cuda/common.cuh
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
rm -rf /tmp/ab && mkdir -p /tmp/ab/obj && cp -r src include tests /tmp/ab/ && tar xf dev/prof/head_fwd.tar -C /tmp/ab
cd /tmp/ab && ls src/cuda/*.cu tests/cuda/test_fwd.cu | grep -v bwd | xargs -P 16 -I{} sh -c \
  'nvcc -c -O3 --use_fast_math -std=c++17 -gencode arch=compute_90,code=sm_90 -Iinclude -Isrc -Xcompiler -fopenmp {} -o obj/$(basename {} .cu).o' \
  && nvcc -gencode arch=compute_90,code=sm_90 obj/*.o -Xcompiler -fopenmp -lgomp -o test_fwd_head && echo "built test_fwd_head"
for r in "$@"; do ./test_fwd_head --bench "$r" | tail -1; done
