"""Data-parallel training (engine/distributed.py): two CPU processes on the gloo backend, each on
half of every batch, take the same steps as one process on the whole batch."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

STEPS, BATCH = 3, 4


def train(model_dir: str, out: str) -> None:
    """A few CORE steps (forget and retain terms through compute_loss) on the tiny model; the
    final trained weights and the logged curves go to `out` (process 0 only)."""
    from safetensors.torch import save_file

    from diffunlearn.backends.diffusers_t2i import T2IModel
    from diffunlearn.data.tasks import UnlearningTask
    from diffunlearn.engine.distributed import is_main, world
    from diffunlearn.engine.loop import LoopConfig, run_loop
    from diffunlearn.methods import methods
    from diffunlearn.runs.resolve import resolve_erase

    torch.set_num_threads(1)
    resolved = resolve_erase("core", ["dotted"], model=model_dir,
                             overrides=["method.epochs=null", f"method.steps={STEPS}", f"method.batch_size={BATCH}"])
    model = T2IModel.from_pretrained(model_dir)
    task = UnlearningTask.create(["dotted"], images_per_prompt=2, image_size=model.pixel_size)
    method = methods.get("core")(resolved.method_config, model, task)
    params = model.set_trainable(method.param_group())
    method.setup()
    result = run_loop(params, method.step, LoopConfig(steps=STEPS, lr=0.5, optimizer="sgd", seed=3, log_every=1,
                                                      progress=False))
    (Path(out) / f"counters-{world()[0]}.json").write_text(json.dumps(model.counters))
    if is_main():
        save_file({n: p.detach().contiguous() for n, p in params.items()}, str(Path(out) / "weights.safetensors"))
        (Path(out) / "curves.json").write_text(json.dumps(result.curves))


def _worker(rank: int, world: int, init_file: str, model_dir: str, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        train(model_dir, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # ~30 s: two interpreters import torch and diffusers
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    train(str(tiny_model_dir), str(tmp_path / "one"))
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tiny_model_dir), str(tmp_path / "two")), nprocs=2)

    one, two = (load_file(str(tmp_path / k / "weights.safetensors")) for k in ("one", "two"))
    start = load_file(str(tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    assert set(one) == set(two)
    assert any(not torch.allclose(one[n], start[n]) for n in one)  # the steps moved the weights
    for name in one:
        assert torch.allclose(one[name], two[name], atol=1e-6, rtol=1e-5), name
    # each process put only its half of every batch through the UNet
    images = json.loads((tmp_path / "one" / "counters-0.json").read_text())["unet_forward_images"]
    for rank in (0, 1):
        counters = json.loads((tmp_path / "two" / f"counters-{rank}.json").read_text())
        assert counters["unet_forward_images"] == images // 2
    curves_one, curves_two = (json.loads((tmp_path / k / "curves.json").read_text()) for k in ("one", "two"))
    for a, b in zip(curves_one, curves_two, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


def test_a_batch_splits_into_contiguous_equal_shares(monkeypatch):
    """Process r of N holds rows [r n/N, (r+1) n/N); a batch that does not split is refused."""
    from diffunlearn.engine import distributed
    from diffunlearn.objectives import TermBatch

    monkeypatch.setattr(distributed, "world", lambda: (1, 2))
    rows = distributed.shard_rows(4)
    assert rows == slice(2, 4)
    batch = TermBatch(torch.arange(4.0).view(4, 1), torch.zeros(4, 1), torch.tensor([5, 6, 7, 8]),
                      {"forget": ["a", "b", "c", "d"]})
    part = batch.shard(rows)
    assert part.x0.flatten().tolist() == [2.0, 3.0] and part.t.tolist() == [7, 8]
    assert part.prompts["forget"] == ["c", "d"]
    assert part.full == 4
    with pytest.raises(ValueError, match="make batch_size a multiple of 2"):
        distributed.shard_rows(3)


@pytest.mark.slow
def test_accelerate_launch_trains_an_erase_run_on_two_processes(sd_pipeline_dir, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` (gloo when there is no GPU) runs one erase
    run: one run directory, written by process 0, with the weights of a single-process run."""
    import shutil
    import subprocess
    import sys

    from safetensors.torch import load_file

    from diffunlearn.backends.model_dir import CHANGED_UNET_WEIGHTS

    launcher = shutil.which("accelerate")
    if launcher is None:
        pytest.skip("accelerate's launcher is not on PATH")
    args = ["erase", "core", "--model", str(sd_pipeline_dir), "--forget", "van gogh", "--retain", "claude monet",
            "--threads", "1", "eval.enabled=false", "method.steps=2", "method.batch_size=2", "task.images_per_prompt=2"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    two = subprocess.run([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "diffunlearn.cli", *args,
                          "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stderr.count("starts in") == 1  # one process claimed the run directory
    one = subprocess.run([sys.executable, "-m", "diffunlearn.cli", *args, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = (load_file(str(tmp_path / k / "model" / CHANGED_UNET_WEIGHTS)) for k in ("one", "two"))
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
