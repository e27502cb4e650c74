"""SalUn's saliency mask against a hand computation of the official
OPTML-Group/Unlearn-Saliency `SD/train-scripts/generate_mask.py` on the tiny model."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffunlearn.data.tasks import UnlearningTask
from diffunlearn.engine.loop import LoopConfig, run_loop, step_generator
from diffunlearn.methods import methods
from diffunlearn.methods.salun import saliency_scores, top_fraction_mask
from diffunlearn.objectives import draw_batch
from diffunlearn.runs.resolve import resolve_erase

W = 7.5  # generate_mask.py's --c_guidance default


def hand_gradients(model, task, params, batches: int, guidance: float) -> list[dict[str, torch.Tensor]]:
    """Each batch's gradient of MSE(eps, (1 + w) eps_c - w eps_empty), two separate forwards."""
    names = list(params)
    out = []
    for k in range(batches):
        batch = draw_batch(model, task, "forget", 2, step_generator(0, -1 - k))
        x_t = model.add_noise(batch.x0, batch.noise, batch.t)
        e_c = model.eps(x_t, batch.t, model.encode(batch.prompts["forget"]))
        e_0 = model.eps(x_t, batch.t, model.encode([""] * len(x_t)))
        loss = -F.mse_loss(batch.noise, (1 + guidance) * e_c - guidance * e_0)  # the script's sign; abs drops it
        out.append(dict(zip(names, torch.autograd.grad(loss, [params[n] for n in names]), strict=True)))
    return out


def official_mask(saliency: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
    """generate_mask.py's ranking: ranks of the descending order, 1 where rank < int(n * fraction)."""
    flat = -torch.cat([s.flatten() for s in saliency.values()])
    ranks = torch.argsort(torch.argsort(flat))
    chosen = (ranks < int(len(flat) * fraction)).float()
    return dict(zip(saliency, (c.view_as(s) for c, s in zip(chosen.split([s.numel() for s in saliency.values()]),
                                                             saliency.values(), strict=True)), strict=True))


def test_saliency_is_the_absolute_summed_gradient_of_the_guided_loss(tiny_model, one_thread):
    task = UnlearningTask.create(["dotted"], images_per_prompt=1)
    params = tiny_model.set_trainable("xattn")
    ours = saliency_scores(tiny_model, task, batch_size=2, batches=2, guidance=W, seed=0)

    grads = hand_gradients(tiny_model, task, params, 2, W)
    expected = {n: (grads[0][n] + grads[1][n]).abs() for n in params}
    for n in params:  # batched and separate forwards differ by float rounding only
        torch.testing.assert_close(ours[n], expected[n], rtol=1e-4, atol=1e-5 * float(expected[n].abs().max()))

    # the two readings the old code had would not pass: per-batch magnitudes, or the unguided loss
    per_batch = {n: grads[0][n].abs() + grads[1][n].abs() for n in params}
    plain = hand_gradients(tiny_model, task, params, 2, 0.0)
    unguided = {n: (plain[0][n] + plain[1][n]).abs() for n in params}
    for wrong in (per_batch, unguided):
        assert any(not torch.allclose(ours[n], wrong[n], rtol=1e-2) for n in params)
    assert all(p.grad is None for p in params.values())  # left cleared for training


def test_salun_setup_keeps_the_official_top_fraction_of_the_hand_saliency(tiny_model_dir, one_thread):
    from diffunlearn.backends.diffusers_t2i import T2IModel

    resolved = resolve_erase("salun", ["dotted"], model=tiny_model_dir,
                             overrides=["method.batch_size=2", "method.mask_batches=2", "method.mask_fraction=0.3",
                                        "method.param_group=xattn"])
    assert resolved.method_config.mask_guidance == W
    model = T2IModel.from_pretrained(tiny_model_dir)
    task = UnlearningTask.create(["dotted"], images_per_prompt=1)
    method = methods.get("salun")(resolved.method_config, model, task)
    params = model.set_trainable("xattn")
    method.setup()

    grads = hand_gradients(model, task, params, 2, W)
    saliency = {n: (grads[0][n] + grads[1][n]).abs() for n in params}
    expected = official_mask(saliency, 0.3)
    total = sum(m.numel() for m in expected.values())
    assert sum(float(m.sum()) for m in method.mask.values()) == int(0.3 * total)
    # the same weights, but for float-rounding near-ties at the threshold
    ranked = torch.cat([s.flatten() for s in saliency.values()]).sort(descending=True).values
    threshold = float(ranked[int(0.3 * total)])
    for n in params:
        differ = method.mask[n] != expected[n]
        assert torch.allclose(saliency[n][differ], torch.tensor(threshold), rtol=1e-4), n


def test_top_fraction_mask_keeps_exactly_floor_fraction_whatever_the_ties():
    saliency = {"a": torch.tensor([3.0, 1.0, 1.0]), "b": torch.tensor([[1.0, 5.0], [0.0, 1.0]])}
    mask = top_fraction_mask(saliency, 0.5)  # 7 weights: floor(3.5) = 3 kept, the 5, the 3 and one of the 1s
    assert mask["a"][0] == 1 and mask["b"][0, 1] == 1 and mask["b"][1, 0] == 0
    assert sum(float(m.sum()) for m in mask.values()) == 3


def test_salun_moves_only_masked_weights(tiny_model_dir):
    from diffunlearn.backends.diffusers_t2i import T2IModel

    resolved = resolve_erase("salun", ["dotted"], model=tiny_model_dir,
                             overrides=["method.epochs=null", "method.steps=2", "method.batch_size=2",
                                        "method.mask_batches=1", "method.param_group=xattn"])
    model = T2IModel.from_pretrained(tiny_model_dir)
    method = methods.get("salun")(resolved.method_config, model, UnlearningTask.create(["dotted"], images_per_prompt=1))
    params = model.set_trainable("xattn")
    before = {n: p.detach().clone() for n, p in params.items()}
    method.setup()
    run_loop(params, method.step, LoopConfig(steps=2, lr=1e-2, optimizer="sgd", progress=False))
    for n, p in params.items():
        moved = p.detach() != before[n]
        assert not (moved & (method.mask[n] == 0)).any(), n
