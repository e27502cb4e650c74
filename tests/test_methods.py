"""One common test over the method registry, plus each method's distinctive piece."""

from __future__ import annotations

import pytest
import torch

from diffunlearn.config import ConfigError
from diffunlearn.data.tasks import UnlearningTask
from diffunlearn.engine.loop import LoopConfig, run_loop
from diffunlearn.methods import methods
from diffunlearn.runs import resolve_erase


@pytest.mark.parametrize("name", methods.names())
def test_every_method_trains_only_its_group_and_round_trips(name, tiny_model_dir, tmp_path):
    from diffunlearn.backends.diffusers_t2i import T2IModel

    resolved = resolve_erase(name, ["dotted"], model=tiny_model_dir,
                             overrides=["method.steps=3", "method.epochs=null", "method.batch_size=2",
                                        "task.images_per_pair=1"])
    assert resolved.profile == "testbed"  # built by build_testbed, so a testbed-kind model
    model = T2IModel.from_pretrained(tiny_model_dir)
    task = UnlearningTask.create(["dotted"], images_per_pair=1)
    method = methods.get(name)(resolved.method_config, model, task)
    before = {n: p.detach().clone() for n, p in model.unet.named_parameters()}
    params = model.set_trainable(method.param_group())
    method.setup()
    cfg = LoopConfig(steps=method.resolved_steps(), lr=1e-2, progress=False)
    result = run_loop(params, method.step, cfg)
    assert result.curves and all(torch.isfinite(torch.tensor(r["loss"])) for r in result.curves)

    after = dict(model.unet.named_parameters())
    changed = {n for n in after if not torch.equal(after[n], before[n])}
    assert changed, "no weight moved"
    assert changed <= set(params), f"weights outside {method.param_group()} changed"

    model.save_pretrained(tmp_path / "model", changed_only=True)
    reloaded = T2IModel.from_pretrained(tmp_path / "model")
    for n, p in reloaded.unet.named_parameters():
        assert torch.equal(p, after[n]), n


@pytest.mark.parametrize("name", methods.names())
def test_every_method_rejects_unknown_and_bad_keys(name, tiny_model_dir):
    with pytest.raises(ConfigError, match="unknown config key 'method.no_such_key'"):
        resolve_erase(name, ["dotted"], model=tiny_model_dir, overrides=["method.no_such_key=1"])
    with pytest.raises(ConfigError, match="method.lr"):
        resolve_erase(name, ["dotted"], model=tiny_model_dir, overrides=["method.lr=-1"])


@pytest.mark.parametrize("name", methods.names())
def test_every_method_has_both_profiles_that_validate(name, tiny_model_dir):
    cls = methods.get(name)
    assert set(cls.profiles) == {"paper", "testbed"}
    for profile in ("paper", "testbed"):
        resolved = resolve_erase(name, ["dotted"], model=tiny_model_dir, overrides=[f"method.profile={profile}"])
        assert resolved.profile == profile
    assert cls.__doc__ or cls.__module__.__doc__


def test_esd_variants_choose_the_official_groups(tiny_model_dir):
    groups = {}
    for name in ("esd-x", "esd-u", "esd-all", "esd-x-strict"):
        resolved = resolve_erase(name, ["dotted"], model=tiny_model_dir)
        groups[name] = methods.get(name)(resolved.method_config, None, None).param_group()
    assert groups == {"esd-x": "xattn", "esd-u": "noxattn", "esd-all": "full", "esd-x-strict": "xattn-kv"}


def test_core_epochs_count_passes_over_d_f(tiny_model_dir):
    resolved = resolve_erase("core", ["dotted"], model=tiny_model_dir, overrides=["method.profile=paper"])
    task = UnlearningTask.create(["dotted"], images_per_pair=3)
    method = methods.get("core")(resolved.method_config, None, task)
    # paper: 25 epochs over 11 pairs x 3 images at batch 4
    assert method.resolved_steps() == -(-25 * 33 // 4)


def test_core_ablations_are_configurations(tiny_model_dir):
    terms = {}
    for target in ("teacher", "student-sg", "ascent"):
        resolved = resolve_erase("core", ["dotted"], model=tiny_model_dir, overrides=[f"method.target={target}",
                                                                                      "method.retain_target=gaussian"])
        forget, retain = methods.get("core")(resolved.method_config, None, None).terms()
        terms[target] = forget
        assert retain.target == "gaussian"
    assert terms["teacher"].target == "teacher" and terms["teacher"].target_prompt == "anchor"
    assert terms["student-sg"].target == "student-sg"
    assert terms["ascent"].weight == -1.0 and terms["ascent"].target == "gaussian"
