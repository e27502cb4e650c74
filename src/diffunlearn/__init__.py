"""diffunlearn: concept unlearning for text-to-image diffusion models, and whether it lasts."""

from diffunlearn.api import Run, demo, erase, evaluate

__version__ = "0.1.0"
__all__ = ["Run", "demo", "erase", "evaluate", "__version__"]
