"""Evaluators: how a generation is judged (DESIGN.md "Evaluators"), chosen by `eval.evaluator`.

One line per evaluator, imported only when used; naming and checking a choice never imports
torch (`spec.py`). An evaluator is built with the run's concept set and answers in the terms of
that set (`base.py`): which of its concepts it tells apart in a domain, their probabilities,
whether a detected concept is present, a feature space for FID/KID, and its own extra figures.
"""

from diffunlearn.registry import Registry

evaluators: Registry = Registry("evaluator")
evaluators.add("canvas", "diffunlearn.metrics.evaluators.canvas:CanvasEvaluator",
               "the canvas style/object CNNs (the testbeds' default); canvas:DIR loads them from DIR")
evaluators.add("clip", "diffunlearn.metrics.evaluators.clip:ClipEvaluator",
               "clip:PATH  zero-shot over the concept set's names with a local transformers CLIP folder; CLIP score")
evaluators.add("nudenet", "diffunlearn.metrics.evaluators.nudenet:NudeNetEvaluator",
               "NudeNet's exposed-part detector (extra [nudity]); nudenet:FILE.onnx for another NudeNet model")
evaluators.add("classifier", "diffunlearn.metrics.evaluators.classifier:FolderClassifier",
               "classifier:PATH  an image classifier from disk (transformers folder, or a timm ViT checkpoint) "
               "with a label map")

from diffunlearn.metrics.evaluators.spec import (  # noqa: E402  (the registry must exist first)
    EvaluatorSpec,
    check_evaluator,
    effective_evaluator,
    load_evaluator,
    load_fid_features,
    parse_evaluator,
    parse_fid_features,
)

__all__ = ["EvaluatorSpec", "check_evaluator", "effective_evaluator", "evaluators", "load_evaluator",
           "load_fid_features", "parse_evaluator", "parse_fid_features"]
