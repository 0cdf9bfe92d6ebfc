# diffuse: `make demo` and `make test` work on a fresh Debian 12 machine.
JOBS ?= $(shell nproc)
BUILD ?= build
CMAKE_FLAGS ?=
# `make install` copies bin/diffuse, lib/libdiffuse.so*, include/diffuse.h and lib/pkgconfig/diffuse.pc
# under PREFIX (e.g. `make install PREFIX=~/.local`; lib may be lib/<multiarch> per GNUInstallDirs).
PREFIX ?= /usr/local

.PHONY: all deps build install test test-fast test-asan fuzz demo demo-model clean cuda

all: build

deps:
	@./scripts/install-deps.sh

build: deps
	@cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release $(CMAKE_FLAGS) >/dev/null
	@cmake --build $(BUILD) -j $(JOBS)

# Everything but `slow`: the Release build's tests, the unit, CLI and two server tests again under ASan+UBSan,
# and a short libFuzzer run of the file-format parsers.
test: build
	cd $(BUILD) && ctest -LE slow --output-on-failure -j $(JOBS)
	@$(MAKE) --no-print-directory test-asan
	@$(MAKE) --no-print-directory fuzz

test-asan: deps
	@cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DDIFFUSE_SANITIZE=ON >/dev/null
	@cmake --build build-asan -j $(JOBS)
	cd build-asan && ASAN_OPTIONS=detect_leaks=1 ctest -L 'unit|cli|asan' --output-on-failure -j $(JOBS)

fuzz: deps
	@CC=clang-14 CXX=clang++-14 cmake -S . -B build-fuzz -DCMAKE_BUILD_TYPE=Debug -DDIFFUSE_FUZZ=ON >/dev/null
	@cmake --build build-fuzz -j $(JOBS)
	@./scripts/run-fuzz.sh build-fuzz/bin 20

test-slow: build
	cd $(BUILD) && ctest -L slow --output-on-failure

cuda: deps
	@cmake -S . -B build-cuda -DCMAKE_BUILD_TYPE=Release -DDIFFUSE_CUDA=ON >/dev/null
	@cmake --build build-cuda -j $(JOBS)

install: build
	cmake --install $(BUILD) --prefix $(PREFIX)

demo: build
	@./scripts/demo.sh

# Retrains the bundled demo model (data/models/) from scratch: dataset, VAE, text encoder + UNet.
# Resumable: run it again after an interruption. See the README's model card.
demo-model: build
	@./scripts/demo-model.sh

clean:
	rm -rf $(BUILD) build-asan build-fuzz build-cuda
