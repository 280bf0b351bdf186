# The two commands a newcomer types: `make demo` and `make test`. Each does its own set-up.
.PHONY: setup demo test bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/python examples/demo.py

test: setup
	.venv/bin/python -m pytest -q -p no:cacheprovider

bench: setup
	bash benchmarks/run.sh

clean:
	rm -rf demo-out bench-out
