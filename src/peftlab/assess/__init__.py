"""The side-by-side study (the review's assessment): run methods on tasks and measure them alike.

``peftlab assess --suite quick`` runs the built-in quick suite; see docs/assessment.md for what is
measured and how.
"""
from .measure import LiveTensorBytes, MemoryProbe, measure_peak, storage_bytes
from .runner import SuiteResult, load_results, run_suite
from .suites import FULL, REVIEW_METHODS, SUITE_NAMES, Suite, TaskSpec, builtin_suites, get_suite, load_suite_file

__all__ = [
    "FULL", "LiveTensorBytes", "MemoryProbe", "REVIEW_METHODS", "SUITE_NAMES", "Suite", "SuiteResult", "TaskSpec",
    "builtin_suites", "get_suite", "load_results", "load_suite_file", "measure_peak", "run_suite", "storage_bytes",
]
