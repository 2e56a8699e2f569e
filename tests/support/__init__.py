"""Helpers shared by the tests (and benchmarks): plain functions and classes, no fixtures (those
are in tests/conftest.py). Import them as `tests.support.<module>`."""
