# The README's two commands are `make demo` and `make test`; both set up first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup demo test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

setup: $(PY) $(FASHION_MNIST)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[cpu,jax,torch,recipes,test,kerascv]"

# Debian's package of the full Fashion-MNIST: the offline default data.
$(FASHION_MNIST):
	apt-get update -q && apt-get install -y -q dataset-fashion-mnist

demo: setup
	$(PY) -m recipes.compare

test: setup
	$(PY) -m pytest -q --durations=15 tests

bench: setup
	$(PY) -m benchmarks.optimizer_step

clean:
	rm -rf $(VENV) runs

# Offline Bazel build and tests (docs/bazel.md); .ci/run runs it after `test`.
BAZEL ?= bazel-4
.PHONY: bazel-test
bazel-test: setup
	tools/bazel/setup.sh
	$(BAZEL) test //...
