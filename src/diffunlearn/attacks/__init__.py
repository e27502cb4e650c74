"""The attack registry: one line per attack, imported only when used."""

from diffunlearn.registry import Registry

attacks: Registry = Registry("attack")
attacks.add("relearn", "diffunlearn.attacks.relearn:Relearn",
            "DiMRA: fine-tune on the retain set or same-distribution data without the concept ([002] §IV)")
attacks.add("resurgence", "diffunlearn.attacks.resurgence:Resurgence",
            "benign fine-tuning (full or LoRA) on data that never shows the erased concept ([000] §3, §5)")
