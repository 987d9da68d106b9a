# Every target sets itself up first (idempotent): system packages, .venv, torch CPU wheel, the project.
PY := .venv/bin/python

.PHONY: setup run test test-heavy lint bench eval-diarization clean

setup:
	@bash scripts/setup.sh

run: setup
	@.venv/bin/streamwavlm stream --realtime --listen $(ARGS)

test: setup
	@.venv/bin/ruff check .
	@$(PY) -m pytest -q

test-heavy: setup
	@$(PY) -m pytest -q -m heavy

lint: setup
	@.venv/bin/ruff check .

bench: setup
	@$(PY) benchmarks/bench_offline.py --out benchmarks/results/offline.md
	@$(PY) benchmarks/bench_streaming.py --out benchmarks/results/streaming.md
	@$(PY) benchmarks/bench_mqtt.py --out benchmarks/results/mqtt.md
	@$(PY) benchmarks/bench_resample.py --out benchmarks/results/resample.md

# online diarization: clustering vs the diart-style baseline, DER per latency on espeak-ng conversations
# (resemblyzer, without and with a background model), cost added to the engine (about 25 minutes; results
# in docs/benchmarks.md)
eval-diarization: setup
	@$(PY) benchmarks/bench_diarization.py --out benchmarks/results/diarization.md

clean:
	rm -rf .venv out .pytest_cache .ruff_cache
