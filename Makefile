# ssic — make help lists the targets.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
# pinned: an unpinned torch pulls a multi-GB CUDA build; the CPU build of 2.13.0 is what ssic is tested with
TORCH_REQ ?= torch==2.13.0
STAMP := build/.installed

.PHONY: help install plugins demo demo-ddim test test-slow bench bench-trained bench-sige goldens serve-example serve lint clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml CMakeLists.txt $(wildcard plugins/ort/*) $(wildcard plugins/common/*)
	$(PIP) install -q $(TORCH_REQ)
	$(PIP) install -q scikit-build-core ninja cmake
	$(PIP) install -q --no-build-isolation -e ".[test,bench]"
	@mkdir -p build && touch $(STAMP)

install: $(STAMP) ## Install ssic (editable) with torch 2.13.0 CPU and build the C++ op library

plugins: ## Rebuild the C++ ONNX Runtime op library in place
	$(PIP) install -q --no-build-isolation -e ".[test,bench]"
	@mkdir -p build && touch $(STAMP)

demo: $(STAMP) ## The main job: the church edit upscaled x4 by trained Real-ESRGAN, dense vs sparse (ORT CPU)
	$(PYTHON) -m ssic.cli demo --model realesrgan --size 64 --out out/demo

demo-ddim: $(STAMP) ## SDEdit with DDIM (random weights), dense vs sparse on ONNX Runtime CPU
	$(PYTHON) -m ssic.cli demo --model ddim --preset tiny --steps 10 --out out/demo-ddim

test: $(STAMP) ## Run the test suite (what CI runs)
	$(PYTHON) -m pytest -q -p no:cacheprovider tests

test-slow: $(STAMP) ## Tests on the full-size models too (slow)
	SSIC_SLOW=1 $(PYTHON) -m pytest -q -p no:cacheprovider tests

bench: $(STAMP) ## Full-size benchmarks -> BENCHMARKS.md (long: tens of minutes)
	$(PYTHON) bench/run_bench.py --out bench_out --report BENCHMARKS.md --anchor-split

bench-trained: $(STAMP) ## Trained Real-ESRGAN/OIDN grid vs ORT dense and the packages' engines (~30 min) -> BENCHMARKS.md
	$(PYTHON) bench/trained_grid.py

bench-sige: $(STAMP) ## The SIGE engine side by side (installs sige 0.3.0 from PyPI; not in CI)
	bash bench/install_sige.sh
	$(PYTHON) bench/bench_sige.py --out bench_out/sige.json

goldens: $(STAMP) ## Regenerate the golden outputs of the tiny presets in tests/golden
	$(PYTHON) -m tests.make_goldens

serve-example: ## Build the C++ serving example -> build/cpp/ssic_serve (fetches ONNX Runtime with npm once)
	cmake -S examples/cpp -B build/cpp -DCMAKE_BUILD_TYPE=Release && cmake --build build/cpp -j

serve: $(STAMP) ## The editor in the browser on http://127.0.0.1:8000 (Ray Serve, GauGAN tiny; installs ssic[serve])
	$(PYTHON) -c "import ray.serve, multipart" 2>/dev/null || $(PIP) install -q --no-build-isolation -e ".[serve]"
	@mkdir -p out/serve
	test -d out/serve/gaugan.ssic || ($(PYTHON) -m ssic.cli export gaugan --preset tiny -o out/serve/gaugan.onnx && \
		$(PYTHON) -m ssic.cli compile out/serve/gaugan.onnx -o out/serve/gaugan.ssic)
	$(PYTHON) -m ssic.cli serve out/serve/gaugan.ssic --replicas 2 --port 8000

lint: ## ruff
	$(PYTHON) -m ruff check ssic tests bench

clean: ## Remove build products
	rm -rf build out bench_out ssic/_lib
