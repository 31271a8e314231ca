# The two commands of the README: `make demo` (the embedded default, no servers) and `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: demo test debs bench clean

$(PY):
	python3 -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(PIP) -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/vigil demo --out demo-out

debs:
	bash scripts/ensure-debs.sh

test: $(VENV)/.installed-test debs
	$(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) demo-out .pytest_cache
