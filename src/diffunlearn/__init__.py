"""diffunlearn: concept unlearning for text-to-image diffusion models, and whether it lasts."""

from diffunlearn.api import Run, attack, demo, erase, erase_then_attack, evaluate

__version__ = "0.1.0"
__all__ = ["Run", "attack", "demo", "erase", "erase_then_attack", "evaluate", "__version__"]
