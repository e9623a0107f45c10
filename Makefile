# One entry point for people and CI. Every target installs what it needs into .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
DEMO := demo

BENCH := .venv-bench

.PHONY: install demo test lint bench bench-adult bench-scale bench-defaults bench-balancers bench-architectures bench-vocab bench-table-optimizers bench-task-types bench-checkpoints bench-tune bench-ops clean

$(BIN)/mbtrain: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# the CPU wheel first: a bare torch requirement would pull a multi-GB CUDA build
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev,tensorboard,onnx,plot,tune]'  # the extras the tests exercise
	touch $@

install: $(BIN)/mbtrain

# three binary tasks and a regression one (dwell_seconds: only on clicked rows, hence --missing-labels skip);
# item_vec enters as a vector feature by inference
DEMO_TASKS := purchase,cart,click,dwell_seconds
demo: install
	$(BIN)/mbtrain inspect sample_data/funnel_train.parquet --tasks $(DEMO_TASKS)
	$(BIN)/mbtrain fit sample_data/funnel_train.parquet --tasks $(DEMO_TASKS) --missing-labels skip \
		--model mmoe --balance metabalance --epochs 15 --batch-size 128 --seed 0 --out $(DEMO)/run --overwrite
	$(BIN)/mbtrain eval $(DEMO)/run sample_data/funnel_test.parquet --json $(DEMO)/test_metrics.json
	$(BIN)/mbtrain export $(DEMO)/run --output $(DEMO)/model.pt
	$(BIN)/mbtrain predict $(DEMO)/model.pt sample_data/funnel_test.parquet --output $(DEMO)/predictions.csv \
		--keep impression_id

test: install
	$(BIN)/ruff check mbtrain tests benchmarks
	$(BIN)/pytest -q -n 2  # two workers (pytest-xdist): the suite is mostly single-threaded fits and torchrun

lint: install
	$(BIN)/ruff check mbtrain tests benchmarks

clean:
	rm -rf $(VENV) $(BENCH) $(DEMO) *.egg-info

bench-adult: install
	$(BIN)/python benchmarks/adult_quality.py

bench-scale: install
	$(BIN)/python benchmarks/scale.py

bench-defaults: install
	POLARS_MAX_THREADS=1 OMP_NUM_THREADS=1 $(BIN)/python benchmarks/defaults_sweep.py

bench-balancers: install
	$(BIN)/python benchmarks/balancers.py --trials 8 --rows 200000 --out bench-balancers

bench-architectures: install
	$(BIN)/python benchmarks/architectures.py --out bench-architectures

bench-vocab: install
	$(BIN)/python benchmarks/vocab.py

bench-table-optimizers: install
	$(BIN)/python benchmarks/table_optimizers.py --out bench-table-optimizers

bench-task-types: install
	$(BIN)/python benchmarks/task_types.py --out bench-task-types

bench-tune: install
	$(BIN)/python benchmarks/tune_cost.py

bench-checkpoints: install
	$(BIN)/python benchmarks/checkpoint_cost.py

bench-ops: install
	$(BIN)/python benchmarks/ops.py
	$(BIN)/python benchmarks/speed.py --skip encoding --variants none metabalance pcgrad --models mmoe mmoe+funnel
	$(BIN)/python benchmarks/speed.py --skip encoding --batch-size 64 --variants none metabalance pcgrad

# The benchmarks' own environment: the reference library torch-rechub runs beside us, never as our dependency.
$(BENCH)/.installed: pyproject.toml
	$(PYTHON) -m venv $(BENCH)
	$(BENCH)/bin/pip install --quiet $(TORCH)
	$(BENCH)/bin/pip install --quiet -e .
	$(BENCH)/bin/pip install --quiet --no-deps torch-rechub==0.0.3
	$(BENCH)/bin/pip install --quiet pandas tqdm scikit-learn
	touch $@

bench: $(BENCH)/.installed
	$(BENCH)/bin/python benchmarks/speed.py
	$(BENCH)/bin/python benchmarks/versus_rechub.py
