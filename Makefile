# Two commands do everything on a fresh machine:  `make demo`  and  `make test`.
SHELL := /bin/bash
A := .venvs/affected/bin/python
L := .venvs/latest/bin/python
B := .venvs/boundary/bin/python
STACKS := affected latest boundary
export HFPATCHES_CACHE := $(CURDIR)/.cache
export HF_HUB_OFFLINE := 1

.PHONY: setup demo test lint test-affected test-latest test-boundary gpu-test bench matrix wheel lab

setup:
	for s in $(STACKS); do bash scripts/setup_env.sh $$s || exit 1; done

## main job: every bug reproduced and fixed on the affected stack, then the doctor on the latest stack
demo: setup
	$(A) scripts/demo_cpu.py
	@echo; echo "== latest stack: the same patches must report NOT_AFFECTED where upstream fixed the bug"
	$(L) -m hfpatches doctor

## lint (ruff) and types (mypy), then the whole CPU suite on every stack (+ the README matrix check)
test: setup lint
	$(A) scripts/matrix.py --check
	rc=0; for s in $(STACKS); do echo "== stack $$s"; SECONDS=0; \
	  HFPATCHES_TEST_STACK=$$s .venvs/$$s/bin/python -m pytest -q -n 2 tests -p no:cacheprovider || rc=1; \
	  echo "== stack $$s: $$SECONDS s"; done; exit $$rc

lint: setup
	$(A) -m ruff check hfpatches tests scripts benchmarks gpu_tests
	$(A) -m mypy
	@# requires-python = ">=3.9": only 3.11 runs here (torch 2.13 needs a newer Python than 3.9), so the
	@# claim is checked statically: no syntax, module or annotation newer than 3.9 in the package
	@# (tomllib is imported only on 3.11+, with the tomli backport below it).
	$(dir $(A))vermin --target=3.9- --no-tips --violations --eval-annotations --exclude tomllib -q hfpatches

test-affected:
	HFPATCHES_TEST_STACK=affected $(A) -m pytest -q tests
test-latest:
	HFPATCHES_TEST_STACK=latest $(L) -m pytest -q tests
test-boundary:
	HFPATCHES_TEST_STACK=boundary $(B) -m pytest -q tests

## on a CUDA machine (see README "GPU regression suite")
gpu-test:
	bash gpu_tests/run.sh

bench: setup
	for b in benchmarks/*.py; do echo "== $$b"; $(A) $$b || exit 1; done

matrix:
	$(A) scripts/matrix.py --write

## the version lab: every scripts/lab/<id>.py on its releases, tables into docs/patches (downloads; not in `make test`)
lab: setup
	$(A) scripts/version_lab.py --all --write
