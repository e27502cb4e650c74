"""The Python API, a thin facade over the run kinds in `runs/`. The CLI is a thin layer over it.

    import diffunlearn
    run = diffunlearn.erase("core", forget=["dotted"])
    run.metrics["after"]["UA"]

Every run directory holds config.yaml (resolved), run.json (id and status), metrics.json,
curves.csv, model/ (a complete model folder, loadable anywhere a model is accepted and, for a
Stable Diffusion model, by diffusers' StableDiffusionPipeline.from_pretrained: unchanged files
hard-linked from the base, unet_changed.safetensors with the changed tensors alone, the base
model's path and hash in diffunlearn.json), samples.png and log.txt.

Grids of runs: `run_bench(recipe)` runs a benchmark recipe (bench/recipes/*.yaml),
`results(recipe)` returns its runs as a pandas DataFrame, `bench_report(recipe, out)` writes its
HTML report. (`bench` itself is the subpackage, so the function that runs a recipe is `run_bench`.)
"""

from diffunlearn.bench import bench_report, results, run_bench
from diffunlearn.runs.attack import attack, attack_summary, erase_then_attack
from diffunlearn.runs.common import Run
from diffunlearn.runs.erase import erase
from diffunlearn.runs.evaluate import evaluate
from diffunlearn.runs.report import demo, render_report

__all__ = ["Run", "attack", "attack_summary", "bench_report", "demo", "erase", "erase_then_attack", "evaluate",
           "render_report", "results", "run_bench"]
