"""Scissorhands' trimming against the official `snip` (UnlearnCanvas
`mu_scissorhands_shs/train-erase.py`, JingWu321/Scissorhands `SD/shs_nsfw.py`) worked out by
hand on the tiny model."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffunlearn.data.tasks import UnlearningTask
from diffunlearn.engine.loop import step_generator
from diffunlearn.methods.shs import reinitialised, snip_scores, trim_by_connection_sensitivity
from diffunlearn.objectives import draw_batch


def hand_gradients(model, task, params, batches: int) -> list[dict[str, torch.Tensor]]:
    """Each batch's gradient of the plain denoising loss (`model.shared_step`) on forget images."""
    names = list(params)
    out = []
    for k in range(batches):
        batch = draw_batch(model, task, "forget", 2, step_generator(0, -1 - k))
        x_t = model.add_noise(batch.x0, batch.noise, batch.t)
        loss = F.mse_loss(model.eps(x_t, batch.t, model.encode(batch.prompts["forget"])), batch.noise)
        out.append(dict(zip(names, torch.autograd.grad(loss, [params[n] for n in names]), strict=True)))
    return out


def test_snip_scores_add_each_batch_gradient_magnitude(tiny_model, one_thread):
    task = UnlearningTask.create(["dotted"], images_per_prompt=1)
    params = tiny_model.set_trainable("xattn")
    ours = snip_scores(tiny_model, task, 2, 2, seed=0)

    grads = hand_gradients(tiny_model, task, params, 2)
    # official: grads[j] += param.grad.abs() per batch; saliences = (grad * weight).abs()
    expected = {n: ((grads[0][n].abs() + grads[1][n].abs()) * params[n].detach()).abs() for n in params}
    for n in params:
        torch.testing.assert_close(ours[n], expected[n], rtol=1e-4, atol=1e-5 * float(expected[n].abs().max()))
    summed_first = {n: ((grads[0][n] + grads[1][n]) * params[n].detach()).abs() for n in params}
    assert any(not torch.allclose(ours[n], summed_first[n], rtol=1e-2) for n in params)


def test_trimming_reinitialises_only_inside_the_scope(tiny_model, one_thread):
    task = UnlearningTask.create(["dotted"], images_per_prompt=1)
    params = tiny_model.set_trainable("full")
    before = {n: p.detach().clone() for n, p in params.items()}
    scores = snip_scores(tiny_model, task, 2, 1, seed=0)
    # official: one threshold, the k-th smallest score over every weight, k = int(sparsity * n)
    flat = torch.cat([s.flatten() for s in scores.values()])
    threshold = float(flat.kthvalue(int(0.9 * flat.numel())).values)
    above = {n: s > threshold for n, s in scores.items()}
    assert any(above[n].any() for n in params if ".attn2." not in n)  # the scope is what keeps these

    trimmed = trim_by_connection_sensitivity(tiny_model, task, 2, 1, sparsity=0.9, scope="xattn", seed=0)
    for n, p in params.items():
        expected = above[n] if ".attn2." in n else torch.zeros_like(above[n])
        assert torch.equal(trimmed[n], expected), n
        assert torch.equal(p.detach()[~expected], before[n][~expected]), n  # nothing else moved
        if n.endswith("bias"):
            assert (p.detach()[expected] == 0).all(), n
        elif expected.any():
            assert (p.detach()[expected] != before[n][expected]).all(), n
    assert any(m.any() for m in trimmed.values())


def test_reinit_is_unlearncanvas_trunc_normal_with_absolute_bounds():
    gen = torch.Generator().manual_seed(0)
    fresh = reinitialised(torch.empty(256, 256), "up.attn2.to_q.weight", gen)
    # timm's trunc_normal_(mask, std=.02): mean 0, std 0.02, cut at a=-2, b=2 in absolute value,
    # i.e. 100 std away: a plain normal. A cut at +-2 std would leave no value beyond 0.04.
    assert abs(float(fresh.mean())) < 5e-4
    assert abs(float(fresh.std()) - 0.02) < 0.02 * 0.02
    assert float(fresh.abs().max()) <= 2.0
    beyond_two_std = float((fresh.abs() > 0.04).float().mean())
    assert 0.040 < beyond_two_std < 0.051  # 4.55% for a normal
    kurtosis = float(((fresh - fresh.mean()) ** 4).mean() / fresh.var() ** 2)
    assert abs(kurtosis - 3.0) < 0.15  # a normal's 3, not a uniform's 1.8 (Kaiming-uniform)
    assert torch.equal(reinitialised(torch.ones(8), "up.attn2.to_out.0.bias", gen), torch.zeros(8))
