"""SDD against the official nannullna/safe-diffusion `train_sdd.py`, worked out by hand on the
tiny model: the EMA (`unet_teacher`) samples x_t, the target is the student's own empty-prompt
prediction under no_grad, the EMA is updated after every optimizer step and is what the run saves."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import diffunlearn
from diffunlearn.data.tasks import UnlearningTask
from diffunlearn.engine.loop import LoopConfig, run_loop, step_generator
from diffunlearn.methods import methods
from diffunlearn.methods.sdd import SDD
from diffunlearn.objectives import TermBatch
from diffunlearn.runs.resolve import resolve_erase


def sdd_method(model_dir, *overrides: str):
    from diffunlearn.backends.diffusers_t2i import T2IModel

    resolved = resolve_erase("sdd", ["dotted"], model=model_dir,
                             overrides=["method.generation_steps=4", "method.batch_size=2", *overrides])
    model = T2IModel.from_pretrained(model_dir)
    method = methods.get("sdd")(resolved.method_config, model, UnlearningTask.create(["dotted"], images_per_prompt=1))
    params = model.set_trainable(method.param_group())
    method.setup()
    return model, method, params


def perturb_ema(method, scale: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(1)
    method.ema = {n: v + scale * torch.randn(v.shape, generator=gen) for n, v in method.ema.items()}


def test_sdd_samples_x_t_with_the_ema(tiny_model_dir, monkeypatch, one_thread):
    from diffunlearn.backends.diffusers_t2i import T2IModel

    model, method, params = sdd_method(tiny_model_dir)
    perturb_ema(method)  # EMA, student and original all differ
    calls = []
    original = T2IModel.sample

    def spy(self, prompts, seeds, **kwargs):
        calls.append((list(prompts), kwargs))
        return original(self, prompts, seeds, **kwargs)

    monkeypatch.setattr(T2IModel, "sample", spy)
    method.step(0, step_generator(0, 0))
    (prompts, kwargs), = calls
    assert all("dotted" in p for p in prompts)
    assert kwargs["guidance"] == 3.0 and kwargs["steps"] == 4 and kwargs["stop_at"] is not None
    assert set(kwargs["params"]) == set(params)
    for n, v in kwargs["params"].items():
        assert torch.equal(v, method.ema[n]) and not torch.equal(v, params[n].detach()), n


def test_sdd_target_is_the_students_empty_prompt_prediction_without_gradient(tiny_model_dir, monkeypatch,
                                                                             one_thread):
    from diffunlearn import objectives

    model, method, params = sdd_method(tiny_model_dir)
    perturb_ema(method)
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, *model.image_shape, generator=gen)
    t = torch.tensor([300, 620])
    prompts = {"forget": ["a dotted style painting of a circle"] * 2, "empty": ["", ""]}
    prompts |= {"anchor": prompts["forget"], "retain": prompts["forget"]}
    monkeypatch.setattr(objectives, "generate_batch", lambda *a: TermBatch(None, None, t, prompts, x_t=x_t))
    logs = method.step(0, step_generator(0, 0))
    ours = {n: p.grad.clone() for n, p in params.items()}

    # by hand, as train_step: e_0 = student(x_t, "") under no_grad; e_s = student(x_t, c); mse(e_0, e_s)
    names = list(params)
    e_s = model.eps(x_t, t, model.encode(prompts["forget"]))
    with torch.no_grad():
        e_0 = model.eps(x_t, t, model.encode(prompts["empty"]))
    loss = F.mse_loss(e_0, e_s)
    expected = dict(zip(names, torch.autograd.grad(loss, [params[n] for n in names]), strict=True))
    assert logs["loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    for n in names:
        torch.testing.assert_close(ours[n], expected[n], rtol=1e-4, atol=1e-5 * float(expected[n].abs().max()))

    # neither the EMA's prediction as the target, nor a gradient through the target, would pass
    with torch.no_grad():
        e_ema = model.eps(x_t, t, model.encode(prompts["empty"]), params=method.ema)
    assert float(F.mse_loss(e_ema, e_s.detach())) != pytest.approx(logs["loss"], rel=1e-3)
    both = F.mse_loss(model.eps(x_t, t, model.encode(prompts["empty"])),
                      model.eps(x_t, t, model.encode(prompts["forget"])))
    through_target = torch.autograd.grad(both, [params[n] for n in names])
    assert any(not torch.allclose(ours[n], g, rtol=1e-2) for n, g in zip(names, through_target, strict=True))


def test_sdd_delivers_the_ema_updated_after_every_step(tiny_model_dir, monkeypatch, one_thread):
    from diffunlearn.backends.diffusers_t2i import T2IModel

    model, method, params = sdd_method(tiny_model_dir, "method.ema_decay=0.6")
    seen, samplers = [], []
    original = T2IModel.sample

    def spy(self, prompts, seeds, **kwargs):
        samplers.append({n: v.clone() for n, v in kwargs["params"].items()})
        return original(self, prompts, seeds, **kwargs)

    monkeypatch.setattr(T2IModel, "sample", spy)
    run_loop(params, method.step, LoopConfig(steps=2, lr=1e-2, hook_every=1, progress=False),
             hooks=[lambda step: seen.append({n: p.detach().clone() for n, p in params.items()})])
    theta0, theta1, theta2 = seen  # before training, after optimizer step 1, after step 2
    d = 0.6
    for n in params:
        assert not torch.equal(theta1[n], theta0[n]) and not torch.equal(theta2[n], theta1[n])
        # ema <- d * ema + (1 - d) * theta after each optimizer step, starting from the original
        torch.testing.assert_close(samplers[0][n], theta0[n])
        torch.testing.assert_close(samplers[1][n], d * theta0[n] + (1 - d) * theta1[n])
        torch.testing.assert_close(method.final_weights()[n],
                                   d * d * theta0[n] + d * (1 - d) * theta1[n] + (1 - d) * theta2[n])
    assert all(torch.equal(p.detach(), theta2[n]) for n, p in params.items())  # final_weights leaves theta alone


def test_paper_profile_is_the_official_optimizer(tiny_model_dir):
    c = resolve_erase("sdd", ["dotted"], model=tiny_model_dir, overrides=["method.profile=paper"]).method_config
    assert (c.optimizer, c.weight_decay, c.lr, c.steps, c.batch_size, c.ema_decay, c.grad_clip) == (
        "adamw", 1e-4, 1e-5, 1500, 1, 0.999, 1.0)


ERASE = ["method.steps=4", "method.batch_size=2", "method.generation_steps=3", "method.checkpoint_every=2",
         "method.ema_decay=0.5", "task.images_per_prompt=1"]


def saved_unet(run_dir):
    """The tensors the run changed (the run's model/ also holds the whole UNet)."""
    from safetensors.torch import load_file

    from diffunlearn.backends.model_dir import CHANGED_UNET_WEIGHTS

    return load_file(str(run_dir / "model" / CHANGED_UNET_WEIGHTS))


def test_erase_saves_and_evaluates_the_ema(tiny_model_dir, tiny_evaluator_dir, tmp_path, monkeypatch,
                                           one_thread):
    from conftest import TINY_EVAL

    from diffunlearn.runs import erase as erase_run

    delivered, evaluated = [], []
    final_weights, evaluate = SDD.final_weights, erase_run._evaluate

    def recording_final(self):
        delivered.append({n: v.clone() for n, v in final_weights(self).items()})
        return delivered[-1]

    def recording_evaluate(model, evaluators, forget, resolved, alternatives, before, progress):
        if before is not None:  # the 'after' evaluation
            evaluated.append({n: p.detach().clone() for n, p in model.unet.named_parameters() if ".attn2." in n})
        return evaluate(model, evaluators, forget, resolved, alternatives, before, progress)

    monkeypatch.setattr(SDD, "final_weights", recording_final)
    monkeypatch.setattr(erase_run, "_evaluate", recording_evaluate)
    run = diffunlearn.erase("sdd", ["dotted"], model=tiny_model_dir, out=tmp_path / "run", progress=False,
                            overrides=[*ERASE, f"eval.evaluator=canvas:{tiny_evaluator_dir}", *TINY_EVAL])
    (ema,), (after,) = delivered, evaluated
    saved = saved_unet(run.out)
    assert set(saved) == set(ema)
    for n, v in ema.items():
        assert torch.equal(saved[n], v) and torch.equal(after[n], v), n


def test_interrupted_sdd_run_delivers_the_same_ema(tiny_model_dir, tmp_path, monkeypatch, one_thread):
    overrides = [*ERASE, "eval.enabled=false"]
    diffunlearn.erase("sdd", ["dotted"], model=tiny_model_dir, out=tmp_path / "a", overrides=overrides, progress=False)
    original_step = SDD.step

    def crashing_step(self, step, gen):
        if step == 3:
            raise KeyboardInterrupt
        return original_step(self, step, gen)

    monkeypatch.setattr(SDD, "step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        diffunlearn.erase("sdd", ["dotted"], model=tiny_model_dir, out=tmp_path / "b", overrides=overrides,
                          progress=False)
    monkeypatch.setattr(SDD, "step", original_step)
    run = diffunlearn.erase("sdd", ["dotted"], model=tiny_model_dir, out=tmp_path / "b", overrides=overrides,
                            progress=False)
    assert run.metrics["cost"]["resumed_from_step"] == 2
    a, b = saved_unet(tmp_path / "a"), saved_unet(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert json.loads((tmp_path / "b" / "run.json").read_text())["status"] == "complete"
