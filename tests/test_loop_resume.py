"""The shared loop resumes exactly from its atomic, pickle-free checkpoints."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import build_tiny_model

from diffunlearn.data import canvas
from diffunlearn.engine import checkpoint as ckpt
from diffunlearn.engine.loop import LoopConfig, StopRequested, lr_factor, make_optimizer, run_loop, step_generator

PROMPTS = [canvas.full_prompt("striped", "circle"), canvas.object_prompt("ring")]


pytestmark = pytest.mark.usefixtures("one_thread")


def setup_model(group: str):
    model = build_tiny_model(0)
    params = model.set_trainable(group)
    return model, params


def make_step(model, interrupt_at: int | None = None):
    cond = model.encode(PROMPTS)
    calls: list[int] = []

    def step(k: int, gen: torch.Generator) -> dict[str, float]:
        calls.append(k)
        x0 = 0.5 * torch.randn(2, *model.image_shape, generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, model.num_train_timesteps, (2,), generator=gen)
        pred = model.eps(model.add_noise(x0, noise, t), t, cond)
        loss = (pred - noise).pow(2).mean() + 0.1 * (pred - model.teacher_eps(model.add_noise(x0, noise, t), t, cond)
                                                     ).pow(2).mean()
        loss.backward()
        if k == interrupt_at:  # gradients computed, the step half done: then the process dies
            raise StopRequested(f"interrupted at step {k}")
        return {"loss": loss.item()}

    step.calls = calls
    return step


def weight_hook(params):
    name = sorted(params)[0]
    return lambda step: {"w": float(params[name].detach().double().sum())}


CASES = {
    "adam-cosine-ema": dict(optimizer="adam", schedule="cosine", warmup=2, ema_decay=0.9, grad_clip=1.0),
    "adamw-constant": dict(optimizer="adamw", schedule="constant", weight_decay=0.1, grad_clip=None),
    "sgd-cosine-ema": dict(optimizer="sgd", schedule="cosine", ema_decay=0.5, grad_clip=0.5, lr=0.05),
}


def loop_config(**kw) -> LoopConfig:
    base = dict(steps=6, lr=2e-3, seed=3, log_every=1, checkpoint_every=2, hook_every=2, progress=False)
    return LoopConfig(**{**base, **kw})


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("fresh_process", [False, True])
def test_resume_is_bitwise_identical(tmp_path, case, fresh_process):
    cfg = loop_config(**CASES[case])
    group = "xattn" if case != "adamw-constant" else "xattn-kv"

    # uninterrupted run
    model_a, params_a = setup_model(group)
    result_a = run_loop(params_a, make_step(model_a), cfg, checkpoint_dir=tmp_path / "A",
                        hooks=[weight_hook(params_a)])

    # interrupted after the checkpoint of step 2, in the middle of step index 3
    model_b, params_b = setup_model(group)
    with pytest.raises(StopRequested):
        run_loop(params_b, make_step(model_b, interrupt_at=3), cfg, checkpoint_dir=tmp_path / "B",
                 hooks=[weight_hook(params_b)])
    pointer = json.loads((tmp_path / "B" / ckpt.POINTER).read_text())
    assert pointer["step"] == 2
    # the crashed process holds weights one step past the checkpoint: resuming must restore them
    saved, _ = ckpt.load_checkpoint(tmp_path / "B")
    assert any(not torch.equal(saved[f"param.{n}"], p) for n, p in params_b.items())
    if fresh_process:
        model_b, params_b = setup_model(group)  # a new process starts from the original weights
    step_b = make_step(model_b)
    result_b = run_loop(params_b, step_b, cfg, checkpoint_dir=tmp_path / "B", hooks=[weight_hook(params_b)])
    assert result_b.resumed_from == 2
    assert step_b.calls == [2, 3, 4, 5]  # replays exactly the missing steps

    changed = [n for n in params_a if not torch.equal(params_a[n], model_a.teacher_params()[n])]
    assert changed, "training must change the weights for this test to mean anything"
    for name in params_a:
        assert torch.equal(params_a[name], params_b[name]), name
    # the frozen rest of the UNet is untouched in both
    full_a, full_b = model_a.unet.state_dict(), model_b.unet.state_dict()
    for name in full_a:
        assert torch.equal(full_a[name], full_b[name]), name
    # EMA, curves and hook rows are restored too
    assert set(result_a.ema) == (set(params_a) if cfg.ema_decay else set())
    for name in result_a.ema:
        assert torch.equal(result_a.ema[name], result_b.ema[name]), name
        assert not torch.equal(result_a.ema[name], params_a[name]) or name not in changed
    assert [r["step"] for r in result_a.curves] == [1, 2, 3, 4, 5, 6]
    assert result_b.curves == result_a.curves
    assert [r["step"] for r in result_a.hook_rows] == [0, 2, 4, 6]
    assert result_b.hook_rows == result_a.hook_rows
    # and the final checkpoints agree
    for folder in ("A", "B"):
        assert json.loads((tmp_path / folder / ckpt.POINTER).read_text())["step"] == 6
    ta, _ = ckpt.load_checkpoint(tmp_path / "A")
    tb, _ = ckpt.load_checkpoint(tmp_path / "B")
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_finished_run_is_not_repeated(tmp_path):
    cfg = loop_config(steps=2, hook_every=0)
    model, params = setup_model("xattn-kv")
    run_loop(params, make_step(model), cfg, checkpoint_dir=tmp_path)
    trained = {n: p.detach().clone() for n, p in params.items()}
    step = make_step(model)
    again = run_loop(params, step, cfg, checkpoint_dir=tmp_path)
    assert step.calls == [] and again.resumed_from == 2
    assert all(torch.equal(trained[n], params[n]) for n in params)


def test_no_checkpoint_dir_trains_without_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, params = setup_model("xattn-kv")
    before = {n: p.detach().clone() for n, p in params.items()}
    result = run_loop(params, make_step(model), loop_config(steps=2, hook_every=0))
    assert result.steps == 2 and result.resumed_from == 0
    assert any(not torch.equal(before[n], params[n]) for n in params)
    assert list(tmp_path.iterdir()) == []


def test_extra_state_round_trips(tmp_path):
    cfg = loop_config(steps=4, hook_every=0)
    model, params = setup_model("xattn-kv")
    mask = {"mask": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    with pytest.raises(StopRequested):
        run_loop(params, make_step(model, interrupt_at=2), cfg, checkpoint_dir=tmp_path,
                 extra_state=lambda: mask)
    got = {}
    run_loop(params, make_step(model), cfg, checkpoint_dir=tmp_path, extra_state=lambda: mask,
             load_extra_state=got.update)
    assert set(got) == {"mask"} and torch.equal(got["mask"], mask["mask"])


def test_step_generator_depends_on_seed_and_step():
    a = torch.randn(4, generator=step_generator(0, 5))
    assert torch.equal(a, torch.randn(4, generator=step_generator(0, 5)))
    assert not torch.equal(a, torch.randn(4, generator=step_generator(0, 6)))
    assert not torch.equal(a, torch.randn(4, generator=step_generator(1, 5)))


def test_lr_schedule():
    cfg = LoopConfig(steps=10, lr=1.0, warmup=2, schedule="cosine")
    factors = [lr_factor(s, cfg) for s in range(10)]
    assert factors[:3] == [0.5, 1.0, 1.0]
    assert all(a >= b for a, b in zip(factors[2:], factors[3:], strict=False))
    assert factors[-1] == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(torch.pi * 7 / 8)).item()))
    assert lr_factor(5, LoopConfig(steps=10, lr=1.0)) == 1.0


def test_optimizers_use_the_fused_kernels_and_keep_the_update_rules():
    """make_optimizer picks torch's fused kernels (speed); the updates stay Adam's, AdamW's and
    SGD's, worked out by hand for two steps of w = [1, -2] with gradients g1 = [0.5, -1], g2 = [1, 1]."""
    lr, b1, b2, eps, wd = 0.1, 0.9, 0.999, 1e-8, 0.5
    g1, g2 = torch.tensor([0.5, -1.0]), torch.tensor([1.0, 1.0])

    def adam_by_hand(w, decoupled_decay: float = 0.0):
        m = v = torch.zeros(2)
        for step, g in enumerate((g1, g2), start=1):
            w = w * (1 - lr * decoupled_decay)
            m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
            w = w - lr * (m / (1 - b1**step)) / ((v / (1 - b2**step)).sqrt() + eps)
        return w

    w0 = torch.tensor([1.0, -2.0])
    sgd_decay = w0 - lr * (g1 + wd * w0)
    expected = {"adam": (0.0, adam_by_hand(w0)), "adamw": (wd, adam_by_hand(w0, wd)),
                "sgd": (wd, sgd_decay - lr * (g2 + wd * sgd_decay))}
    for kind, (decay, want) in expected.items():
        p = torch.nn.Parameter(w0.clone())
        optimizer = make_optimizer([p], LoopConfig(steps=2, lr=lr, optimizer=kind, weight_decay=decay))
        assert optimizer.defaults["fused"] is True, kind
        for g in (g1, g2):
            p.grad = g.clone()
            optimizer.step()
        assert torch.allclose(p.detach(), want, atol=1e-6), (kind, p, want)


# ---- checkpoint files ----------------------------------------------------------------------


def small_state(value: float) -> dict[str, torch.Tensor]:
    return {"param.w": torch.full((3,), value), "scalar": torch.tensor(value)}


def test_pointer_is_written_last(tmp_path, monkeypatch):
    order = []
    real_replace = os.replace

    def recording_replace(src, dst):
        order.append(os.path.basename(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", recording_replace)
    ckpt.save_checkpoint(tmp_path, 4, small_state(4.0), {"note": "x"})
    assert order == ["ckpt-00000004.safetensors", ckpt.POINTER]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000004.safetensors", ckpt.POINTER]


def test_crash_before_pointer_keeps_previous_checkpoint(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, 2, small_state(2.0), {"note": "two"})

    def crash(path, text):
        raise KeyboardInterrupt("killed while writing the pointer")

    monkeypatch.setattr(ckpt, "atomic_write_text", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 4, small_state(4.0), {"note": "four"})
    monkeypatch.undo()
    # the new tensors file exists but is not named by the pointer: the old checkpoint loads
    assert (tmp_path / "ckpt-00000004.safetensors").exists()
    tensors, info = ckpt.load_checkpoint(tmp_path)
    assert info["step"] == 2 and info["note"] == "two"
    assert torch.equal(tensors["param.w"], torch.full((3,), 2.0))


def test_leftover_tmp_and_stale_files_do_not_break_loading(tmp_path):
    ckpt.save_checkpoint(tmp_path, 6, small_state(6.0), {"note": "six"})
    # a stale older checkpoint, a half-written new one and a half-written pointer
    ckpt.atomic_save_tensors(small_state(1.0), tmp_path / "ckpt-00000001.safetensors")
    (tmp_path / "ckpt-00000008.safetensors.tmp").write_bytes(b"\x00\x01garbage")
    (tmp_path / (ckpt.POINTER + ".tmp")).write_text('{"step": 8, "file": "ckpt-000')
    tensors, info = ckpt.load_checkpoint(tmp_path)
    assert info["step"] == 6 and info["file"] == "ckpt-00000006.safetensors"
    assert torch.equal(tensors["param.w"], torch.full((3,), 6.0))
    # the next save replaces the .tmp files and removes stale checkpoints
    ckpt.save_checkpoint(tmp_path, 8, small_state(8.0), {"note": "eight"})
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "ckpt-00000001.safetensors" not in names and "ckpt-00000006.safetensors" not in names
    assert "ckpt-00000008.safetensors" in names and ckpt.POINTER in names
    assert ckpt.load_checkpoint(tmp_path)[1]["step"] == 8


def test_empty_folder_has_no_checkpoint(tmp_path):
    assert ckpt.load_checkpoint(tmp_path) is None
    assert ckpt.load_checkpoint(tmp_path / "missing") is None


@pytest.mark.parametrize("make", [
    lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.8, 0.99)),
    lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1, amsgrad=True),
    lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
])
def test_optimizer_state_round_trips_through_safetensors(tmp_path, make):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = make(list(net.parameters()))
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
    tensors, info = ckpt.optimizer_to_tensors(opt)
    assert tensors and all(torch.is_tensor(v) for v in tensors.values())
    ckpt.save_checkpoint(tmp_path, 3, tensors, {"optimizer": info})
    loaded, info2 = ckpt.load_checkpoint(tmp_path)

    twin = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    twin.load_state_dict(net.state_dict())
    opt2 = make(list(twin.parameters()))
    ckpt.optimizer_from_tensors(opt2, loaded, info2["optimizer"])
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["state"].keys() == s2["state"].keys()
    for idx in s1["state"]:
        assert s1["state"][idx].keys() == s2["state"][idx].keys()
        for key, value in s1["state"][idx].items():
            other = s2["state"][idx][key]
            if torch.is_tensor(value):
                assert torch.equal(value, other) and value.dtype == other.dtype, key
            else:
                assert value == other, key
    # the next step is identical
    x = torch.randn(5, 4)
    for o, n in ((opt, net), (opt2, twin)):
        o.zero_grad()
        n(x).pow(2).sum().backward()
        o.step()
    for a, b in zip(net.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".safetensors"]


def test_loop_never_pickles(tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("torch.save/torch.load (pickle) used")

    model, params = setup_model("xattn-kv")
    monkeypatch.setattr(torch, "save", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    cfg = loop_config(steps=4, hook_every=0, ema_decay=0.9)
    with pytest.raises(StopRequested):
        run_loop(params, make_step(model, interrupt_at=3), cfg, checkpoint_dir=tmp_path)
    run_loop(params, make_step(model), cfg, checkpoint_dir=tmp_path)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert sorted(p.name for p in files) == ["ckpt-00000004.safetensors", ckpt.POINTER]
    assert not [p for p in files if p.suffix in (".pt", ".pkl", ".pickle", ".bin", ".tmp")]
    tensors, info = ckpt.load_checkpoint(tmp_path)
    assert info["step"] == 4
    assert any(k.startswith("optim.") for k in tensors)
    assert {k for k in tensors if k.startswith("param.")} == {f"param.{n}" for n in params}
    assert {k for k in tensors if k.startswith("ema.")} == {f"ema.{n}" for n in params}


# ---- divergence ------------------------------------------------------------------------------


def test_non_finite_loss_stops_before_the_update_and_keeps_the_last_checkpoint(tmp_path):
    from diffunlearn.engine.loop import TrainingDiverged

    model, params = setup_model("xattn-kv")
    good = make_step(model)

    def step(k, gen):
        logs = good(k, gen)
        return {**logs, "loss": float("nan")} if k == 4 else logs

    cfg = loop_config(steps=8, hook_every=0)
    with pytest.raises(TrainingDiverged) as info:
        run_loop(params, step, cfg, checkpoint_dir=tmp_path)
    assert (info.value.step, info.value.checkpoint_step) == (5, 4)  # step index 4 is the fifth step
    assert "loss is nan" in str(info.value)
    tensors, saved = ckpt.load_checkpoint(tmp_path)
    assert saved["step"] == 4
    # the optimizer never applied the diverged step: the weights are those after four steps
    reference_model, reference = setup_model("xattn-kv")
    run_loop(reference, make_step(reference_model), loop_config(steps=4, hook_every=0))
    for n in params:
        assert torch.equal(params[n], reference[n]), n
        assert torch.equal(tensors[f"param.{n}"], reference[n]), n


def test_non_finite_weights_never_reach_a_checkpoint(tmp_path):
    from diffunlearn.engine.loop import TrainingDiverged

    model, params = setup_model("xattn-kv")
    name = sorted(params)[0]
    good = make_step(model)

    def step(k, gen):
        logs = good(k, gen)
        if k == 3:  # a finite loss, then weights that overflow (as a huge learning rate makes them)
            with torch.no_grad():
                params[name].fill_(float("inf"))
        return logs

    with pytest.raises(TrainingDiverged, match=f"weight {name}") as info:
        run_loop(params, step, loop_config(steps=8, hook_every=0, grad_clip=None), checkpoint_dir=tmp_path)
    assert info.value.step == 4 and info.value.checkpoint_step == 2
    tensors, saved = ckpt.load_checkpoint(tmp_path)
    assert saved["step"] == 2 and all(bool(t.isfinite().all()) for t in tensors.values())


def test_truncated_checkpoint_is_a_checkpoint_error(tmp_path):
    ckpt.save_checkpoint(tmp_path, 2, small_state(2.0), {"note": "two"})
    path = tmp_path / "ckpt-00000002.safetensors"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ckpt.CheckpointError, match="corrupt checkpoint"):
        ckpt.load_checkpoint(tmp_path)
