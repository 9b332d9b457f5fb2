# fastflannel: `make demo` runs the main job, `make test` runs the tests. Both do their own set-up:
# Debian packages when missing (needs root), a virtualenv in .venv, and an editable install that
# compiles the Cython extension in place.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: all setup system-deps venv compile compile-release debug test-debug test test-noext demo bench bench-smoke clean distclean wheel fuzz soak chaos scale

all: compile

setup: system-deps venv

# Install the system tools the testbed and the daemon use, only when one is missing (an absolute path is a file
# checked with test -x: Debian's CNI plugins live in /usr/lib/cni, off PATH), and what building the extension
# needs (a C compiler, Python's headers, venv).
system-deps:
	@missing=""; \
	for t in etcd:etcd-server etcdctl:etcd-client iperf3:iperf3 ip:iproute2 bridge:iproute2 iptables:iptables iptables-restore:iptables ping:iputils-ping /usr/lib/cni/bridge:containernetworking-plugins \
	         sockperf:sockperf nft:nftables wireguard-go:wireguard-go wg:wireguard-tools dockerd:docker.io /bin/busybox:busybox-static tcpdump:tcpdump openssl:openssl; do \
	  case $${t%%:*} in /*) test -x $${t%%:*} ;; *) command -v $${t%%:*} >/dev/null 2>&1 ;; esac || missing="$$missing $${t#*:}"; \
	done; \
	command -v cc >/dev/null 2>&1 || missing="$$missing gcc"; \
	$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || missing="$$missing python3-venv"; \
	$(PYTHON) -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
	  || missing="$$missing python3-dev"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" != 0 ]; then echo "need root to install packages (run as root or install:$$missing)"; exit 1; fi; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

# the extension's sources: the main .pyx, its parts, the .pxd/.h files and contract.py (setup.py generates
# includes/contract.pxd from it)
EXT_SOURCES := fastflannel/datapath/_fastpath.pyx fastflannel/datapath/contract.py \
	$(wildcard fastflannel/datapath/parts/*.pxi fastflannel/datapath/*.pxd fastflannel/datapath/includes/*.pxd fastflannel/datapath/includes/*.h)

$(VENV)/.installed: pyproject.toml setup.py $(EXT_SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

compile: venv
	$(PY) setup.py -q build_ext --inplace

# The debug build of the extension (assertion and allocation counters, -O0 -g; parts/debug.pxi), read by
# tests/datapath/conftest.py. `make compile-release` (or test-debug, which ends with it) goes back to the release build.
debug: venv
	FASTFLANNEL_DEBUG=1 $(PY) setup.py -q build_ext --inplace --force

compile-release: venv
	$(PY) setup.py -q build_ext --inplace --force

# tests/datapath on the debug build: no C buffer leaked by any test, no invariant failed; then the release build again
test-debug: debug
	$(PY) -m pytest -q tests/datapath $(PYTEST_ARGS); rc=$$?; $(MAKE) compile-release; exit $$rc

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# The same suite with the pure-Python twin of the fast path.
test-noext: setup
	FASTFLANNEL_NO_EXTENSIONS=1 $(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	$(PY) -m fastflannel.lab.cli demo

bench: setup
	$(PY) -m pytest bench --benchmark-only
	$(PY) -m fastflannel.lab.cli bench

bench-smoke: setup
	$(PY) -m pytest bench --benchmark-disable -q

# Coverage-guided fuzzing of the fast path (atheris; not part of `make test`): Cython vs the Python twin.
FUZZ_SECONDS ?= 60
fuzz: compile
	$(PY) -m pip install -q atheris
	mkdir -p build/fuzz-corpus && cp -n fuzz/corpus/* build/fuzz-corpus/
	$(PY) fuzz/fuzz_fastpath.py -max_total_time=$(FUZZ_SECONDS) -artifact_prefix=build/fuzz- build/fuzz-corpus

# Soak (not part of `make test`): the backends' clusters side by side with traffic, churn and restarts (docs/soak.md).
SOAK_MINUTES ?= 10
soak: setup
	rm -rf build/soak-work && mkdir -p build && $(PY) -m fastflannel.lab.soak --minutes $(SOAK_MINUTES) --json build/soak.json --workdir build/soak-work $(SOAK_ARGS)

# Chaos (not part of `make test`): seeded random faults on 4 hosts + 3 etcd members under traffic (docs/soak.md).
CHAOS_MINUTES ?= 10
chaos: setup
	rm -rf build/chaos-work && mkdir -p build && $(PY) -m fastflannel.lab.chaos --minutes $(CHAOS_MINUTES) --json build/chaos.json --workdir build/chaos-work $(CHAOS_ARGS)

# Scale (not part of `make test`): 5,000 leases restart/live on every backend, 50-daemon propagation, etcd load
# of a 5,000-host cluster (docs/scale.md). ~15 minutes on 2 cores.
SCALE_LEASES ?= 5000
scale: setup
	mkdir -p build && $(PY) -m fastflannel.lab.scale --leases $(SCALE_LEASES) --hosts 50 --reps 5 --etcd-load --json build/scale.json $(SCALE_ARGS)

wheel: venv
	$(PY) -m pip install -q build
	$(PY) -m build --wheel

clean:
	rm -rf build dist *.egg-info fastflannel/datapath/*.so fastflannel/datapath/_fastpath.c fastflannel/datapath/_fastpath.html \
	  fastflannel/datapath/includes/contract.pxd .pytest_cache

distclean: clean
	rm -rf $(VENV)
