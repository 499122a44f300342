"""Lets benchmarks/bench_ops.py run as plain checks where pytest-benchmark is not installed."""
import pytest

try:
    import pytest_benchmark  # noqa: F401 - the real plugin provides the fixture
except ImportError:
    @pytest.fixture
    def benchmark():
        """Stand-in for pytest-benchmark's fixture: call the function once."""
        return lambda fn, *args, **kwargs: fn(*args, **kwargs)
