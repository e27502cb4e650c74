"""fp16 mixed precision: every gradient a method or attack computes passes through the loss
scale, the loop unscales it, skips overflowing steps and keeps the scale across a resume.

The key expectation is arithmetic, not taken from our output: multiplying a loss by a power of
two and dividing its gradients by the same power is exact in binary floating point (only the
exponent changes, away from overflow and subnormals), so a run under a 2**10 loss scale with
autocast off must end with bit-identical weights to a run without one. Plain SGD without
clipping makes a missed or doubled scale visible as a 1024x larger or smaller update."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from diffunlearn.config import ConfigError
from diffunlearn.data.tasks import UnlearningTask
from diffunlearn.engine.loop import LoopConfig, run_loop
from diffunlearn.methods import methods
from diffunlearn.objectives import denoising_loss
from diffunlearn.runs.resolve import resolve_erase

pytestmark = pytest.mark.usefixtures("one_thread")

SMOKE = {"salun": ["method.mask_batches=1"], "erasediff": ["method.inner_steps=1"],
         "sdd": ["method.generation_steps=3"], "advanchor": ["method.max_iters=2"], "mace": ["method.steps=2"]}
# closed-form methods have no gradients; retrain runs the pretraining recipe, which has its own precision
LOOP_METHODS = [m for m in methods.names() if not methods.get(m).closed_form and m != "retrain"] + ["mace"]


def _train(name: str, model_dir, scale: float | None) -> dict[str, torch.Tensor]:
    from diffunlearn.backends.diffusers_t2i import T2IModel

    steps = [] if name == "mace" else ["method.steps=2", "method.epochs=null"]
    resolved = resolve_erase(name, ["dotted"], model=model_dir,
                             overrides=[*steps, "method.batch_size=2", "task.images_per_prompt=1",
                                        *SMOKE.get(name, [])])
    torch.manual_seed(0)
    model = T2IModel.from_pretrained(model_dir)
    if scale is not None:  # the scale alone, autocast off: the arithmetic must not change
        model.loss_scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    task = UnlearningTask.create(["dotted"], images_per_prompt=1, image_size=model.pixel_size)
    method = methods.get(name)(resolved.method_config, model, task)
    params = model.set_trainable(method.param_group())
    method.setup()
    if method.closed_form:  # mace: the LoRA loops inside the closed form
        method.apply_closed_form()
    else:
        cfg = LoopConfig(steps=method.resolved_steps(), lr=1e-2, optimizer="sgd", grad_clip=None, progress=False)
        run_loop(params, method.step, cfg, loss_scaler=model.loss_scaler)
    return {n: p.detach().clone() for n, p in model.unet.named_parameters()}


@pytest.mark.parametrize("name", sorted(set(LOOP_METHODS)))
def test_a_power_of_two_loss_scale_leaves_every_method_bit_identical(name, tiny_model_dir):
    plain, scaled = _train(name, tiny_model_dir, None), _train(name, tiny_model_dir, 2.0**10)
    different = [n for n in plain if not torch.equal(plain[n], scaled[n])]
    assert not different, f"{name}: {len(different)} weights differ under the loss scale, e.g. {different[0]}"


def test_attack_steps_pass_through_the_loss_scale(tiny_model_dir):
    from diffunlearn.backends.diffusers_t2i import T2IModel

    def grads(scale):
        model = T2IModel.from_pretrained(tiny_model_dir)
        model.loss_scaler = torch.amp.GradScaler("cpu", init_scale=scale) if scale else None
        params = model.set_trainable("xattn")
        x0 = torch.zeros(2, *model.image_shape)
        model.backward(denoising_loss(model, x0, ["a", "b"], torch.Generator().manual_seed(0)))
        return {n: p.grad / model.loss_scale for n, p in params.items()}

    plain, scaled = grads(None), grads(2.0**12)
    assert all(torch.equal(plain[n], scaled[n]) for n in plain)


def _overflow_then_plain(w: nn.Parameter, scaler: torch.amp.GradScaler):
    def step(k: int, gen: torch.Generator) -> dict[str, float]:
        loss = w.sum() * (1e35 if k == 0 else 1.0)  # 1e35 * 65536 overflows float32's 3.4e38
        scaler.scale(loss).backward()
        return {"loss": float(loss.detach())}
    return step


def test_an_overflowing_step_is_skipped_and_halves_the_scale_without_diverging():
    w = nn.Parameter(torch.ones(2))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    cfg = LoopConfig(steps=2, lr=0.5, optimizer="sgd", grad_clip=1.0, log_every=1, progress=False)
    result = run_loop({"w": w}, _overflow_then_plain(w, scaler), cfg, loss_scaler=scaler)
    assert [r["skipped_overflow"] for r in result.curves] == [1.0, 0.0]
    assert [r["fp16_scale"] for r in result.curves] == [2.0**16, 2.0**15]
    assert "grad_norm" not in result.curves[0]
    assert math.isclose(result.curves[1]["grad_norm"], math.sqrt(2), rel_tol=1e-6)
    # only step 1 moved w: d(sum w)/dw = 1 per entry, clipped to norm 1 -> 1/sqrt(2) each, times lr 0.5
    assert torch.allclose(w.detach(), torch.full((2,), 1 - 0.5 / math.sqrt(2)))


def test_the_loss_scale_survives_a_resume(tmp_path):
    w = nn.Parameter(torch.ones(2))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    cfg = LoopConfig(steps=1, lr=0.5, optimizer="sgd", log_every=1, progress=False)
    run_loop({"w": w}, _overflow_then_plain(w, scaler), cfg, checkpoint_dir=tmp_path / "ckpt", loss_scaler=scaler)
    fresh = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    longer = LoopConfig(steps=2, lr=0.5, optimizer="sgd", log_every=1, progress=False)
    result = run_loop({"w": w}, _overflow_then_plain(w, fresh), longer, checkpoint_dir=tmp_path / "ckpt",
                      loss_scaler=fresh)
    assert result.resumed_from == 1 and result.curves[-1]["fp16_scale"] == 2.0**15


@pytest.mark.parametrize("which, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_mixed_precision_runs_the_unet_in_half_and_returns_float32(sd_pipeline_dir, which, dtype):
    from diffunlearn.backends.diffusers_t2i import T2IModel

    model = T2IModel.from_pretrained(sd_pipeline_dir)
    model.set_precision(**{which: True})
    assert (model.loss_scaler is not None) == (which == "fp16")  # bf16 has float32's range: no scale
    seen = []
    hook = model.unet.conv_in.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    x = torch.randn(2, *model.image_shape)
    out = model.eps(x, torch.tensor([10, 500]), model.encode(["a", "b"]))
    hook.remove()
    assert seen == [dtype] and out.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.unet.parameters())  # master weights stay float32


def test_fp16_erase_runs_end_to_end_on_a_stable_diffusion_folder(sd_pipeline_dir, tmp_path):
    import diffunlearn

    run = diffunlearn.erase("esd-x", ["van gogh"], model=sd_pipeline_dir, out=tmp_path / "run",
                            overrides=["method.fp16=true", "method.steps=3", "method.batch_size=1",
                                       "method.log_every=1", "eval.enabled=false"], progress=False)
    curves = (run.out / "curves.csv").read_text().splitlines()
    assert "fp16_scale" in curves[0] and len(curves) == 4
    assert run.config["method"]["fp16"] is True


def test_bf16_and_fp16_together_are_refused_in_one_line(tiny_model_dir):
    with pytest.raises(ConfigError, match="bf16 and fp16 are alternatives"):
        resolve_erase("esd", ["dotted"], model=tiny_model_dir, overrides=["method.bf16=true", "method.fp16=true"])
