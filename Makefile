# make up    : install everything and run the whole suite in one process, with a demo stream
# make test  : install everything and run the whole test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
BROWSER_STAMP := tests/browser/node_modules/.installed-stamp
WEB_STAMP := web/node_modules/.installed-stamp
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
ARGS ?=

.PHONY: install browser web srt up test lint proto bench peers clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Browser tests: Debian's chromium, driven by playwright-core; mpegts.js is the player under test.
$(BROWSER_STAMP): tests/browser/package.json tests/browser/package-lock.json
	@command -v chromium >/dev/null || { \
		echo "installing Debian's chromium for the browser tests"; \
		$(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }
	cd tests/browser && npm ci --no-audit --no-fund
	touch $@

browser: $(BROWSER_STAMP)

# The player page's JS players (mpegts.js, hls.js), from the lockfile: the page never loads from a CDN.
$(WEB_STAMP): web/package.json web/package-lock.json
	cd web && npm ci --no-audit --no-fund
	touch $@

web: $(WEB_STAMP)

# SRT: Debian's libsrt 1.5 (OpenSSL build), which castmesh/srt/libsrt.py binds with ctypes.
srt:
	@ldconfig -p | grep -q 'libsrt\.so\.1\.5' || { \
		echo "installing Debian's libsrt for SRT"; \
		$(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q libsrt1.5-openssl; }

up: $(STAMP) $(WEB_STAMP) srt
	$(VENV)/bin/castmesh up $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check castmesh castmesh_bench services tests tools
	$(VENV)/bin/mypy

test: lint browser web srt peers
	$(VENV)/bin/pytest

proto: $(STAMP)
	$(PY) tools/gen_proto.py

bench: $(STAMP)
	$(VENV)/bin/castmesh bench fanout $(or $(ARGS),--viewers 100 --seconds 20)

# Real servers at the far end: nginx-rtmp, the peer the latency benchmarks run beside castmesh (castmesh
# bench fanout --server nginx-rtmp) and the RTMP server forwards and pulls are tested against; rtsp-server-perl,
# the RTSP server pulls are tested against (tests/integration/test_forward.py, test_pull.py).
peers:
	@{ command -v nginx >/dev/null && [ -e /usr/lib/nginx/modules/ngx_rtmp_module.so ] \
		&& command -v rtsp-server-perl >/dev/null; } || { \
		echo "installing Debian's nginx with libnginx-mod-rtmp and rtsp-server-perl (forward and pull tests, benchmarks)"; \
		$(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
			nginx-light libnginx-mod-rtmp rtsp-server-perl; }

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
