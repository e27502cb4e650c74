"""The method registry: one line per method, imported only when used."""

from diffunlearn.registry import Registry

methods: Registry = Registry("method")
methods.add("finetune", "diffunlearn.methods.finetune:Finetune", "retain-set fine-tuning L(D_r) ([004] baseline)")
methods.add("neggrad", "diffunlearn.methods.neggrad:NegGrad", "gradient ascent -L(D_f) ([004] baseline)")
methods.add("esd", "diffunlearn.methods.esd:Esd", "erased stable diffusion, negative-guidance target ([001] eq. 8)")
methods.add("esd-x", "diffunlearn.methods.esd:EsdX", "ESD on the cross-attention layers")
methods.add("esd-u", "diffunlearn.methods.esd:EsdU", "ESD on everything but the cross-attention layers")
methods.add("esd-all", "diffunlearn.methods.esd:EsdAll", "ESD on every UNet weight")
methods.add("esd-x-strict", "diffunlearn.methods.esd:EsdXStrict", "ESD on attn2 to_k/to_v only")
methods.add("core", "diffunlearn.methods.core:Core", "concept reconditioning onto anchors ([001] eq. 2-4)")
methods.add("dimum", "diffunlearn.methods.dimum:DiMUM", "unlearning by memorizing alternative images ([002] Alg. 1)")
methods.add("sfront", "diffunlearn.methods.sfront:Sfront", "retain descent plus forget ascent ([002] eq. 5)")
methods.add("salun", "diffunlearn.methods.salun:SalUn", "saliency-masked relabelling plus retain term ([001] eq. 9)")
methods.add("erasediff", "diffunlearn.methods.erasediff:EraseDiff", "value-function bi-level unlearning ([004] Alg. 1)")
methods.add("erasediff-sum", "diffunlearn.methods.erasediff:EraseDiffSum", "scalarised L_r + lambda L_f ([004] 'MOO')")
methods.add("uce", "diffunlearn.methods.uce:UCE", "closed-form edit of cross-attention K/V (Gandikota et al. 2024)")
methods.add("ca-model", "diffunlearn.methods.ca:CAModel", "concept ablation onto anchor predictions (Kumari 2023)")
methods.add("ca-noise", "diffunlearn.methods.ca:CANoise", "concept ablation with anchor images and noise target")
methods.add("retrain", "diffunlearn.methods.retrain:Retrain", "gold standard: retrain without the concepts")
methods.add("sdd", "diffunlearn.methods.sdd:SDD", "self-distillation onto the EMA's empty-prompt prediction")
