"""`qareg bench`: methods x bits x seeds on one model and dataset, one JSON line per run."""

from qareg.bench.config import FP_BITS, BenchConfig, reference_method
from qareg.bench.results_file import append_row, read_choices, read_done
from qareg.bench.runner import Bench, Trained

__all__ = ["FP_BITS", "Bench", "BenchConfig", "Trained", "append_row", "read_choices",
           "read_done", "reference_method"]
