"""Benchmarks of stattn (run as modules, e.g. ``python -m bench.micro``)."""
