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
