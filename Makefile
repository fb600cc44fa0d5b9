# Two commands do all the set-up on a fresh machine with Python 3.11:
#   make demo   -- create .venv, install pinned deps + the package, run the demo
#   make test   -- same set-up, then the test suite (pytest + the C++ ctest)
# Both are idempotent: stamps skip the install steps when nothing changed.

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
PIP    := $(VPY) -m pip
MAX_JOBS ?= 2
export MAX_JOBS

EXT_SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' 2>/dev/null)

.PHONY: setup demo test test-fast test-compat test-triton-compat test-torch-compat bench bench-micro check clean

$(VENV)/.stamp-deps: requirements-dev.txt
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements-dev.txt
	touch $@

$(VENV)/.stamp-install: $(VENV)/.stamp-deps setup.py pyproject.toml $(EXT_SOURCES)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

setup: $(VENV)/.stamp-install

demo: setup
	$(VENV)/bin/prefix-attn demo

check: setup
	$(VENV)/bin/prefix-attn check

test: setup
	$(VPY) -m pytest -q tests
	@# the GPU files of the HF layer and the CLI once more with the CPU as their device: a check of
	@# the tests themselves (bench/gpu.sh runs them on a GPU), which otherwise skip here
	PREFIX_ATTN_HF_TEST_DEVICE=cpu $(VPY) -m pytest -q tests/test_hf_gpu.py tests/test_cli_gpu.py
	if [ -x csrc/run_ctest.sh ]; then bash csrc/run_ctest.sh; fi

# Without the Triton interpreter, nvcc, HF model and slow tests: a quick inner loop.
test-fast: setup
	$(VPY) -m pytest -q tests -m "not interpreter and not nvcc and not hf and not slow"

# The compat targets import the package from this tree, where prefix_attn.kernels is found
# through a link prefix_attn/kernels -> ../kernels, made for the run and removed after it (left
# in place, a later editable install maps prefix_attn.kernels to it, and removing it then
# breaks .venv's imports).
WITH_KERNELS_LINK := made=0; [ -e prefix_attn/kernels ] || { ln -s ../kernels prefix_attn/kernels && made=1; };
END_KERNELS_LINK := ; rc=$$?; [ $$made = 0 ] || rm -f prefix_attn/kernels; exit $$rc

# The tests that touch transformers / peft, against another pair of versions (default: the GPU
# machine's), in .venv-compat, importing the package from this tree (extension built by setup).
COMPAT_TRANSFORMERS ?= 5.17.0
COMPAT_PEFT ?= 0.21.0
COMPAT := .venv-compat
COMPAT_TESTS := tests/test_hf_models.py tests/test_hf_prefix.py tests/test_generate.py \
	tests/test_baselines.py tests/test_peft_format.py tests/test_train_cli.py \
	tests/test_serve_cli.py tests/test_tuning.py tests/test_bank.py tests/test_demo.py \
	tests/test_ddp.py tests/test_trainer.py tests/test_packed.py tests/test_autocast.py \
	tests/test_hf_lifecycle.py tests/test_train_cli_errors.py tests/test_serve_cli_errors.py \
	tests/test_hf_architectures.py tests/test_serve_api.py tests/test_fsdp.py \
	tests/test_composition.py tests/test_hf_sweep.py tests/test_default_prefix.py \
	tests/test_checkpoint.py tests/test_train_multi.py tests/test_train_optim.py tests/test_train_chat.py \
	tests/test_chat_families.py tests/test_serve_chat.py tests/test_serve_cli_decoding.py \
	tests/test_serve_request_options.py tests/test_server.py tests/test_server_stream.py \
	tests/test_serve_logprobs.py tests/test_serve_prompts.py tests/test_chat_continue.py \
	tests/test_eval_cli.py tests/test_train_dist.py tests/test_tool_calls.py tests/test_serve_tokenize.py \
	tests/test_serve_before_loading.py tests/test_serve_cli_batching.py tests/test_train_best.py \
	tests/test_server_exposed.py tests/test_server_metrics.py tests/test_server_edges.py

test-compat: setup
	test -x $(COMPAT)/bin/python || $(PYTHON) -m venv $(COMPAT)
	grep -vE '^(transformers|peft)==' requirements-dev.txt > $(COMPAT)/requirements.txt
	$(COMPAT)/bin/pip install -q -r $(COMPAT)/requirements.txt \
		transformers==$(COMPAT_TRANSFORMERS) peft==$(COMPAT_PEFT)
	$(WITH_KERNELS_LINK) PYTHONPATH=$(CURDIR) $(COMPAT)/bin/python -m pytest -q -p no:cacheprovider \
		$(COMPAT_TESTS) $(END_KERNELS_LINK)

# The Triton tests (interpreter, sm_90 compiles, numerics) against another Triton release
# (default: the newest checked) in .venv-triton, importing the package from this tree.
COMPAT_TRITON ?= 3.9.0
TRITON_COMPAT := .venv-triton
TRITON_FILES := tests/test_triton_sm90_compile.py tests/test_numerics_edges.py \
	tests/test_triton_mutation_analysis.py tests/test_bench_triton.py

test-triton-compat: setup
	test -x $(TRITON_COMPAT)/bin/python || $(PYTHON) -m venv $(TRITON_COMPAT)
	grep -vE '^triton==' requirements-dev.txt > $(TRITON_COMPAT)/requirements.txt
	$(TRITON_COMPAT)/bin/pip install -q -r $(TRITON_COMPAT)/requirements.txt triton==$(COMPAT_TRITON)
	$(WITH_KERNELS_LINK) \
		PYTHONPATH=$(CURDIR) $(TRITON_COMPAT)/bin/python -m pytest -q -p no:cacheprovider tests -m interpreter \
		&& PYTHONPATH=$(CURDIR) $(TRITON_COMPAT)/bin/python -m pytest -q -p no:cacheprovider $(TRITON_FILES) \
		$(END_KERNELS_LINK)

# The whole suite against another torch release in .venv-torch (default: the newest checked),
# on a copy of the committed tree (git archive HEAD) with its own editable install: the C++
# extension is built against that torch (a CUDA torch also builds the CUDA part: set CUDA_HOME
# to a toolkit of the same major version, or PREFIX_ATTN_NO_CUDA=1).
COMPAT_TORCH ?= 2.15.0
TORCH_COMPAT := .venv-torch

test-torch-compat:
	test -x $(TORCH_COMPAT)/bin/python || $(PYTHON) -m venv $(TORCH_COMPAT)
	grep -vE '^(torch|triton)==' requirements-dev.txt > $(TORCH_COMPAT)/requirements.txt
	$(TORCH_COMPAT)/bin/pip install -q -r $(TORCH_COMPAT)/requirements.txt torch==$(COMPAT_TORCH)
	rm -rf $(TORCH_COMPAT)/src && mkdir -p $(TORCH_COMPAT)/src
	git archive HEAD | tar -x -C $(TORCH_COMPAT)/src
	cd $(TORCH_COMPAT)/src && ../bin/pip install -q --no-build-isolation --no-deps -e . \
		&& ../bin/python -m pytest -q -p no:cacheprovider tests

bench: setup
	$(VPY) bench/run_all.py

# pytest-benchmark microbenchmarks of one attention call (bench/test_micro.py)
bench-micro: setup
	$(VPY) -m pytest -q -p no:cacheprovider bench/test_micro.py

# The install stamp goes with the extension it stands for (else setup skips the rebuild, and the
# demo and tests ran without the C++ backend).
clean:
	rm -rf build *.egg-info prefix_attn/*.so .pytest_cache $(VENV)/.stamp-install
