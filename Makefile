# flash-dmattn: convenience targets around CMake (the build itself is CMakeLists.txt).
#
#   make        configure + build libflashdma, test_fdma and example_c in build/ (CUDA when nvcc is found)
#   make test   build, run build/test_fdma and the C example, then an AddressSanitizer + UBSan build in
#               build-asan/ (CPU only) and test_fdma again there
#   make clean  remove build/ and build-asan/
#   make check  the README's test command (CI runs it): venv set-up, make test, then the Python suites
#   make demo   the README's main command: venv set-up, pip install ., python -m flash_dmattn.demo
#
# Variables: CMAKE_ARGS (extra configure flags, e.g. -DFDMA_WITH_CUDA=OFF), JOBS (default: nproc).

JOBS ?= $(shell nproc 2>/dev/null || echo 2)
CMAKE_ARGS ?=

.PHONY: all build test test-asan clean check demo

all: build

build:
	cmake -S . -B build -DCMAKE_BUILD_TYPE=Release $(CMAKE_ARGS)
	cmake --build build -j$(JOBS)

test: build
	./build/test_fdma
	./build/example_c
	$(MAKE) test-asan

test-asan:
	cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DFDMA_SANITIZE=ON
	cmake --build build-asan -j$(JOBS)
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
		./build-asan/test_fdma

# check: the C tests (make test, CUDA kernels compiled when nvcc is present), then `pip install .` of the package
# (CPU-only build, to test the packaging), then the Python suites on the CPU against build/libflashdma.so:
# CPU backend, ctypes binding and ops, Triton in its interpreter, Flex, transformers. GPU tests: pytest -m gpu.
check: test
	@venv=$$(scripts/setup_env.sh) && set -e && \
	"$$venv/bin/python" -m pip install -q --no-build-isolation --no-deps -Ccmake.define.FDMA_WITH_CUDA=OFF . && \
	(cd /tmp && "$$venv/bin/python" -c "import flash_dmattn, flash_dma; \
	print('installed package OK, backends:', flash_dmattn.get_available_backends())") && \
	FDMA_LIBRARY=$(CURDIR)/build/libflashdma.so "$$venv/bin/python" -m pytest -q -m "not gpu" tests/python

demo:
	@venv=$$(scripts/setup_env.sh) && \
	"$$venv/bin/python" -m pip install -q --no-build-isolation --no-deps . && \
	"$$venv/bin/python" -m flash_dmattn.demo

clean:
	rm -rf build build-asan
