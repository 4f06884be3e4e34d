# The two commands a newcomer needs (each sets up whatever is missing, idempotently):
#   make run    the main job: the whole loop on MovieLens-100K with the embedded defaults
#   make test   the whole test suite, against real Kafka, Redis and Ray started for it
.PHONY: run test setup up down status bench

setup:
	scripts/setup.sh

run: setup
	.venv/bin/reloop run

test:
	scripts/test.sh

up: setup
	.venv/bin/reloop up

down:
	.venv/bin/reloop down

status:
	.venv/bin/reloop status

bench: setup
	.venv/bin/python benchmarks/bench_replay.py
