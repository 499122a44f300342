"""Benchmark library: measuring (measure.py), the one set of op benchmark cases (cases.py) and the
convert / train / ops benchmarks (suites.py). ``council-fast bench`` and the pytest-benchmark suites
in benchmarks/ are thin callers of it."""
from .cases import KINDS, NotApplicable, OpCase, op_backend, op_call, op_cases
from .measure import ENVIRONMENT_FIELDS, RESULT_FIELDS, BenchRow, count_launches, environment, format_table, \
    time_callable
from .suites import bench_convert, bench_ops, bench_train

__all__ = ["BenchRow", "time_callable", "count_launches", "environment", "format_table", "bench_convert",
           "bench_train", "bench_ops", "OpCase", "NotApplicable", "op_cases", "op_call", "op_backend", "KINDS",
           "RESULT_FIELDS", "ENVIRONMENT_FIELDS"]
