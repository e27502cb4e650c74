"""diffunlearn: concept unlearning for text-to-image diffusion models, and whether it lasts."""

from diffunlearn.api import Run, attack, bench_report, demo, erase, erase_then_attack, evaluate, results, run_bench

__version__ = "0.1.0"
__all__ = ["Run", "attack", "bench_report", "demo", "erase", "erase_then_attack", "evaluate", "results", "run_bench",
           "__version__"]
