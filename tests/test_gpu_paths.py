"""What a GPU run switches on, checked on CPU: gradient checkpointing gives the same gradients
(also under substituted weights and through captured attention), attention runs on PyTorch's
SDPA kernel and MACE's capture agrees with it, bf16 autocast, and --device."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from diffunlearn.cli import app

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def model(sd_pipeline_dir):
    from diffunlearn.backends.diffusers_t2i import T2IModel

    return T2IModel.from_pretrained(sd_pipeline_dir)


def _inputs(model, n: int = 2):
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(n, *model.image_shape, generator=gen), torch.tensor([100, 800]),
            model.encode(["a painting by van gogh", "a photo"]))


def _grads(model, substitute: bool, capture: bool) -> dict[str, torch.Tensor]:
    params = model.set_trainable("xattn-kv")
    x, t, cond = _inputs(model)
    phi = {n: (p.detach() * 1.01).requires_grad_(True) for n, p in params.items()}
    if capture:
        with model.capture_attention() as store:
            model.eps(x, t, cond)
        loss = sum(p.pow(2).sum() for maps in store.values() for p in maps)
    else:
        out = model.eps(x, t, cond, params=phi if substitute else None)
        loss = out.pow(2).mean()
    chosen = phi if substitute else params
    if capture:  # attention maps depend on the keys only
        chosen = {n: p for n, p in chosen.items() if ".to_k." in n}
    return dict(zip(chosen, torch.autograd.grad(loss, list(chosen.values())), strict=True))


@pytest.mark.parametrize("case", ["plain", "substituted weights", "captured attention"])
def test_gradient_checkpointing_gives_the_same_gradients(model, case):
    substitute, capture = case == "substituted weights", case == "captured attention"
    plain = _grads(model, substitute, capture)
    model.gradient_checkpointing = True
    assert model.unet.is_gradient_checkpointing
    checkpointed = _grads(model, substitute, capture)
    assert model.gradient_checkpointing  # still on after a substituted forward
    for name, grad in plain.items():
        assert grad.abs().sum() > 0, name
        assert torch.allclose(checkpointed[name], grad, atol=1e-6, rtol=1e-5), name


def test_attention_runs_on_sdpa_and_the_capture_agrees_with_it(model):
    """diffusers' default processor (AttnProcessor2_0: torch's scaled_dot_product_attention) is
    what sampling and training use; MACE's capturing processor computes the same output with
    explicit softmax maps (rows summing to one), and the SDPA processors come back afterwards."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    assert all(isinstance(p, AttnProcessor2_0) for p in model.unet.attn_processors.values())
    x, t, cond = _inputs(model)
    with torch.no_grad():
        sdpa = model.eps(x, t, cond)
        with model.capture_attention() as store:
            captured = model.eps(x, t, cond)
    assert torch.allclose(captured, sdpa, atol=1e-5)
    maps = [m for ms in store.values() for m in ms]
    assert maps and all(m.shape[-1] == 77 for m in maps)  # attention over the 77 CLIP tokens
    assert all(torch.allclose(m.sum(-1), torch.ones(()), atol=1e-5) for m in maps)
    assert all(isinstance(p, AttnProcessor2_0) for p in model.unet.attn_processors.values())


def test_bf16_autocast_runs_the_unet_in_bf16_and_returns_float32(model):
    x, t, cond = _inputs(model)
    seen = []
    hook = model.unet.conv_in.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    model.set_precision(bf16=True)
    out = model.eps(x, t, cond)
    hook.remove()
    assert seen == [torch.bfloat16] and out.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.unet.parameters())  # master weights stay float32


def test_device_is_checked_before_anything_loads(tiny_model_dir, tmp_path):
    from diffunlearn.runs.common import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    result = CliRunner().invoke(app, ["erase", "core", "--forget", "dotted", "--model", str(tiny_model_dir),
                                      "--device", "tpu", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--device" in result.stderr and not (tmp_path / "x").exists()
    if not torch.cuda.is_available():
        result = CliRunner().invoke(app, ["erase", "core", "--forget", "dotted", "--model", str(tiny_model_dir),
                                          "--device", "cuda", "--out", str(tmp_path / "y")])
        assert result.exit_code == 2 and "CUDA is not available" in result.stderr
        assert not (tmp_path / "y").exists()


def test_the_gpu_benchmark_says_in_one_line_why_it_has_nothing_to_measure(capsys, tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "sd_gpu.py"
    spec = importlib.util.spec_from_file_location("sd_gpu", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--model", str(tmp_path / "no-weights")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    expected = "no Stable Diffusion weights" if torch.cuda.is_available() else "no CUDA GPU here"
    assert expected in lines[0]
