"""One common test over the method registry, plus each method's distinctive piece."""

from __future__ import annotations

import pytest
import torch

from diffunlearn.config import ConfigError
from diffunlearn.data.tasks import UnlearningTask
from diffunlearn.engine.loop import LoopConfig, run_loop
from diffunlearn.methods import methods
from diffunlearn.runs.resolve import resolve_erase

# a few steps of work for each method on the tiny model
SMOKE = {"retrain": ["method.pretrain_steps=2", "method.pretrain_images_per_pair=1"],
         "salun": ["method.mask_batches=1"], "erasediff": ["method.inner_steps=1"],
         "sdd": ["method.generation_steps=3"], "advanchor": ["method.max_iters=2"],
         "mace": ["method.steps=2"]}


@pytest.mark.parametrize("name", methods.names())
def test_every_method_trains_only_its_group_and_round_trips(name, tiny_model_dir, tmp_path):
    _trains_only_its_group_and_round_trips(name, tiny_model_dir, "dotted", tmp_path)


@pytest.mark.parametrize("name", methods.names())
def test_every_method_runs_on_a_latent_model_and_a_multi_token_concept(name, tiny_sd_model_dir, tmp_path):
    """The Stable Diffusion layout (VAE latents, CLIP BPE): `checkered` is two tokens there."""
    _trains_only_its_group_and_round_trips(name, tiny_sd_model_dir, "checkered", tmp_path)


def _trains_only_its_group_and_round_trips(name, model_dir, concept, tmp_path):
    from diffunlearn.backends.diffusers_t2i import T2IModel

    steps = [] if methods.get(name).closed_form else ["method.steps=3", "method.epochs=null"]
    resolved = resolve_erase(name, [concept], model=model_dir,
                             overrides=[*steps, "method.batch_size=2", "task.images_per_pair=1", *SMOKE.get(name, [])])
    assert resolved.profile == "testbed"  # built by build_testbed(_sd), so a testbed-kind model
    model = T2IModel.from_pretrained(model_dir)
    task = UnlearningTask.create([concept], images_per_pair=1, image_size=model.pixel_size)
    method = methods.get(name)(resolved.method_config, model, task)
    before = {n: p.detach().clone() for n, p in model.unet.named_parameters()}
    params = model.set_trainable(method.param_group())
    method.setup()
    if method.closed_form:
        logs = method.apply_closed_form()
        assert all(torch.isfinite(torch.tensor(v)) for v in logs.values())
    else:
        cfg = LoopConfig(steps=method.resolved_steps(), lr=1e-2, progress=False)
        result = run_loop(params, method.step, cfg)
        assert result.curves and all(torch.isfinite(torch.tensor(r["loss"])) for r in result.curves)

    after = dict(model.unet.named_parameters())
    changed = {n for n in after if not torch.equal(after[n], before[n])}
    assert changed, "no weight moved"
    assert changed <= set(params), f"weights outside {method.param_group()} changed"

    model.save_pretrained(tmp_path / "model", changed_only=not getattr(method, "full_model", False))
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


def test_retrain_reports_the_pretraining_it_ran_and_none_when_cached(tiny_model_dir, tmp_path, monkeypatch):
    from diffunlearn.backends.diffusers_t2i import T2IModel

    monkeypatch.setenv("DIFFUNLEARN_CACHE", str(tmp_path))
    resolved = resolve_erase("retrain", ["dotted"], model=tiny_model_dir, overrides=SMOKE["retrain"])
    costs = []
    for _ in range(2):
        method = methods.get("retrain")(resolved.method_config, T2IModel.from_pretrained(tiny_model_dir),
                                        UnlearningTask.create(["dotted"], images_per_pair=1))
        method.apply_closed_form()
        costs.append(method.cost())
    batch = method.recipe().train.batch_size
    assert costs[0] == {"steps": 2, "resumed_from_step": 0, "pretrain_cached": False, "unet_forward": 2,
                        "unet_forward_images": 2 * batch, "unet_backward": 2}
    assert costs[1] == {"steps": 0, "pretrain_cached": True}


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


def test_salun_mask_keeps_the_configured_fraction_of_the_most_salient_weights(tiny_model):
    from diffunlearn.methods.salun import saliency_mask

    task = UnlearningTask.create(["dotted"], images_per_pair=1)
    tiny_model.set_trainable("xattn")
    mask = saliency_mask(tiny_model, task, batch_size=2, batches=2, fraction=0.3, seed=0)
    total = sum(m.numel() for m in mask.values())
    kept = sum(float(m.sum()) for m in mask.values())
    assert kept == round(0.3 * total)
    assert set(mask) == {n for n, _ in tiny_model.named_trainable()}
    again = saliency_mask(tiny_model, task, batch_size=2, batches=2, fraction=0.3, seed=0)
    assert all(torch.equal(mask[n], again[n]) for n in mask)


def test_salun_moves_only_masked_weights(tiny_model_dir):
    from diffunlearn.backends.diffusers_t2i import T2IModel

    resolved = resolve_erase("salun", ["dotted"], model=tiny_model_dir,
                             overrides=["method.epochs=null", "method.steps=2", "method.batch_size=2",
                                        "method.mask_batches=1", "method.param_group=xattn"])
    model = T2IModel.from_pretrained(tiny_model_dir)
    method = methods.get("salun")(resolved.method_config, model, UnlearningTask.create(["dotted"], images_per_pair=1))
    params = model.set_trainable("xattn")
    before = {n: p.detach().clone() for n, p in params.items()}
    method.setup()
    run_loop(params, method.step, LoopConfig(steps=2, lr=1e-2, optimizer="sgd", progress=False))
    for n, p in params.items():
        moved = p.detach() != before[n]
        assert not (moved & (method.mask[n] == 0)).any(), n


def test_erasediff_lambda_on_a_hand_computable_case():
    from diffunlearn.methods.erasediff import lambda_t

    grad_r = torch.tensor([1.0, 0.0])
    grad_g = torch.tensor([0.0, 2.0])  # orthogonal: lambda = eta_a
    assert lambda_t(grad_r, grad_g, "paper", 0.1) == pytest.approx(0.1)
    grad_g = torch.tensor([-2.0, 0.0])  # opposed: grad_g . grad_r = -2, ||grad_g||^2 = 4
    assert lambda_t(grad_r, grad_g, "paper", 0.1) == pytest.approx(0.1 + 0.5)
    grad_g = torch.tensor([4.0, 0.0])  # aligned and large: (0.1*16 - 4) / 16 < 0 -> 0
    assert lambda_t(grad_r, grad_g, "paper", 0.1) == 0.0
    assert lambda_t(grad_r, torch.tensor([1.0, 1.0]), "cos", 0.9) == pytest.approx(0.9 - 2**-0.5)
    assert lambda_t(grad_r, grad_g, "fixed", 0.1) == 0.1


def test_erasediff_step_follows_retain_plus_lambda_forget(tiny_model_dir):
    from diffunlearn.backends.diffusers_t2i import T2IModel
    from diffunlearn.engine.loop import step_generator

    resolved = resolve_erase("erasediff", ["dotted"], model=tiny_model_dir,
                             overrides=["method.batch_size=2", "method.param_group=xattn-kv"])
    model = T2IModel.from_pretrained(tiny_model_dir)
    method = methods.get("erasediff")(resolved.method_config, model, UnlearningTask.create(["dotted"],
                                                                                          images_per_pair=1))
    model.set_trainable("xattn-kv")
    logs = method.step(0, step_generator(0, 0))
    assert logs["lambda_t"] >= 0 and logs["g"] > 0  # K descent steps on L_f lower it
    assert abs(logs["cos_update_retain"]) <= 1 + 1e-5 and abs(logs["cos_update_forget"]) <= 1 + 1e-5
    assert all(p.grad is not None for _, p in model.named_trainable())


def test_uce_closed_form_matches_a_direct_least_squares_solve():
    from diffunlearn.methods.uce import uce_solution

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 5, generator=g, dtype=torch.float64)
    erase = torch.randn(2, 5, generator=g, dtype=torch.float64)
    targets = torch.randn(6, 2, generator=g, dtype=torch.float64)
    preserve = torch.randn(3, 5, generator=g, dtype=torch.float64)
    lamb, s_e, s_p = 0.5, 1.5, 0.7
    got = uce_solution(weight, erase, targets, preserve, lamb, s_e, s_p)
    # min lamb ||W' - W||^2 + s_e sum ||W' c_i - v_i||^2 + s_p sum ||W' c_j - W c_j||^2, as stacked rows
    design = torch.cat([lamb**0.5 * torch.eye(5, dtype=torch.float64), s_e**0.5 * erase, s_p**0.5 * preserve])
    wanted = torch.cat([lamb**0.5 * weight.T, s_e**0.5 * targets.T, s_p**0.5 * (weight @ preserve.T).T])
    direct = torch.linalg.lstsq(design, wanted).solution.T
    torch.testing.assert_close(got, direct)


def test_uce_maps_the_concept_onto_its_guide(tiny_model_dir):
    from diffunlearn.backends.diffusers_t2i import T2IModel
    from diffunlearn.methods.uce import last_token_embeddings

    resolved = resolve_erase("uce", ["dotted"], model=tiny_model_dir, overrides=["method.lamb=1e-4",
                                                                                 "method.preserve_scale=0"])
    model = T2IModel.from_pretrained(tiny_model_dir)
    method = methods.get("uce")(resolved.method_config, model, UnlearningTask.create(["dotted"]))
    c, guide = last_token_embeddings(model, ["dotted"]), last_token_embeddings(model, ["pattern"])
    _, to_k, _ = model.xattn_kv_layers()[0]
    target = (to_k.weight @ guide.T).detach().clone()
    model.set_trainable("xattn-kv")
    method.apply_closed_form()
    torch.testing.assert_close(to_k.weight @ c.T, target, rtol=1e-2, atol=1e-3)


def test_esd_data_free_trains_on_states_sampled_by_the_frozen_model(tiny_model_dir, monkeypatch):
    from diffunlearn.backends.diffusers_t2i import T2IModel
    from diffunlearn.engine.loop import step_generator

    resolved = resolve_erase("esd", ["dotted"], model=tiny_model_dir,
                             overrides=["method.mode=data-free", "method.generation_steps=4", "method.batch_size=2"])
    model = T2IModel.from_pretrained(tiny_model_dir)
    method = methods.get("esd")(resolved.method_config, model, UnlearningTask.create(["dotted"], images_per_pair=1))
    model.set_trainable("xattn")
    calls = []
    original = T2IModel.sample

    def spy(self, prompts, seeds, **kwargs):
        calls.append((list(prompts), kwargs))
        return original(self, prompts, seeds, **kwargs)

    monkeypatch.setattr(T2IModel, "sample", spy)
    logs = method.step(0, step_generator(0, 0))
    assert logs["loss"] > 0
    (prompts, kwargs), = calls
    assert all("dotted" in p for p in prompts)
    assert kwargs["stop_at"] is not None and kwargs["steps"] == 4 and kwargs["guidance"] == 3.0
    assert set(kwargs["params"]) == set(model.teacher_params())  # sampled by the frozen original


def test_shs_trims_the_configured_share_of_most_sensitive_weights(tiny_model):
    from diffunlearn.methods.shs import snip_scores, trim_by_connection_sensitivity

    task = UnlearningTask.create(["dotted"], images_per_pair=1)
    tiny_model.set_trainable("xattn")
    before = {n: p.detach().clone() for n, p in tiny_model.named_trainable()}
    scores = snip_scores(tiny_model, task, 2, 1, seed=0)
    trimmed = trim_by_connection_sensitivity(tiny_model, task, 2, 1, sparsity=0.9, seed=0)
    total = sum(m.numel() for m in trimmed.values())
    count = sum(int(m.sum()) for m in trimmed.values())
    assert abs(count - 0.1 * total) <= 0.01 * total + 1
    lowest_trimmed = min(float(scores[n][m].min()) for n, m in trimmed.items() if m.any())
    highest_kept = max(float(scores[n][~m].max()) for n, m in trimmed.items() if (~m).any())
    assert lowest_trimmed >= highest_kept  # exactly the most sensitive ones
    for n, p in tiny_model.named_trainable():
        assert torch.equal(p[~trimmed[n]], before[n][~trimmed[n]])


@pytest.mark.parametrize(("values", "met", "updates"), [([-0.9, -0.5, 0.1], True, 2), ([0.2], True, 0),
                                                       ([-0.9] * 10, False, 4)])
def test_advanchor_stops_once_the_cosine_reaches_zero(tiny_model_dir, values, met, updates):
    from diffunlearn.backends.diffusers_t2i import T2IModel

    resolved = resolve_erase("advanchor", ["dotted"], model=tiny_model_dir, overrides=["method.max_iters=4"])
    model = T2IModel.from_pretrained(tiny_model_dir)
    method = methods.get("advanchor")(resolved.method_config, model, UnlearningTask.create(["dotted"]))
    model.set_trainable("xattn")
    method.setup()
    sequence = iter(values)
    seen = []

    def fake_loss(x_t, t, prompts, e_adv):
        seen.append(1)
        return sum(v.sum() for v in e_adv.values()) * 0 + next(sequence)

    method.adversarial_loss = fake_loss
    assert method.build_anchor(None, None, ["an image of circle in dotted style"]) is met
    assert method.adv_iterations[-1] == updates
    assert len(seen) == (updates + 1 if met else 4)


def test_advanchor_perturbs_only_the_concept_token(tiny_model_dir):
    from diffunlearn.backends.diffusers_t2i import T2IModel

    resolved = resolve_erase("advanchor", ["dotted"], model=tiny_model_dir)
    model = T2IModel.from_pretrained(tiny_model_dir)
    method = methods.get("advanchor")(resolved.method_config, model, UnlearningTask.create(["dotted"]))
    prompt = "an image of circle in dotted style"
    vector = torch.ones(model.encode([""]).shape[-1])
    diff = method.anchor_cond([prompt], {"dotted": vector}) - model.encode([prompt])
    changed = (diff.abs().sum(-1) > 0)[0].nonzero().flatten().tolist()
    assert changed == model.token_positions(prompt, "dotted")


def test_mace_attention_loss_counts_only_concept_tokens_inside_the_mask():
    from diffunlearn.methods.mace import attention_in_mask

    probs = torch.zeros(1, 1, 4, 3)  # batch, heads, 2x2 pixels, 3 tokens
    probs[0, 0, :, 1] = torch.tensor([0.5, 0.5, 0.2, 0.2])
    probs[0, 0, :, 2] = 0.9  # not a concept token
    mask = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])  # only the first pixel
    loss = attention_in_mask({"layer": [probs]}, mask, [[1]])
    assert float(loss) == pytest.approx(0.25)


def test_mace_concept_focal_sampling_matches_the_official_density():
    import math

    from diffunlearn.methods.mace import cfis_probabilities

    probs = cfis_probabilities(1000)
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    density = [sigmoid(0.05 * (t - 200)) - sigmoid(0.05 * (t - 400)) for t in range(1000)]
    expected = torch.tensor(density) / sum(density)
    assert torch.allclose(probs, expected.float(), atol=1e-7)
    assert float(probs[200:401].sum()) > 0.8
    scaled = cfis_probabilities(100)  # the band follows the model's number of timesteps
    assert float(scaled[20:41].sum()) > 0.8 and float(scaled.sum()) == pytest.approx(1.0)


def test_mace_result_is_a_plain_model_with_fused_loras(tiny_model_dir, tmp_path):
    from diffunlearn.backends.diffusers_t2i import T2IModel

    resolved = resolve_erase("mace", ["circle"], model=tiny_model_dir,
                             overrides=["method.steps=3", "method.batch_size=2"])
    model = T2IModel.from_pretrained(tiny_model_dir)
    method = methods.get("mace")(resolved.method_config, model, UnlearningTask.create(["circle"], images_per_pair=1))
    names = {n for n, _ in model.unet.named_parameters()}
    model.set_trainable("xattn-kv")
    method.setup()
    method.apply_closed_form()
    assert {n for n, _ in model.unet.named_parameters()} == names  # adapters removed
    assert set(model.teacher_params()) == set(model.param_group("xattn-kv"))
    original = T2IModel.from_pretrained(tiny_model_dir)
    assert any(not torch.equal(p, dict(original.unet.named_parameters())[n]) for n, p in model.unet.named_parameters())
    for n, p in model.teacher_params().items():  # the teacher is still the original model
        assert torch.equal(p, dict(original.unet.named_parameters())[n])


def test_lora_delta_is_the_change_of_the_layer_output(tiny_model):
    target = tiny_model.attention_projections("xattn-kv")[0]
    base = dict(tiny_model.unet.named_modules())[target].weight.detach().clone()
    tiny_model.add_lora("a", [target], rank=1, init=False)  # random A and B: a nonzero update
    layer = dict(tiny_model.unet.named_modules())[target]
    x = torch.randn(3, base.shape[1])
    delta = tiny_model.lora_deltas("a")[target]
    assert delta.abs().sum() > 0
    torch.testing.assert_close(layer(x) - layer.base_layer(x), x @ delta.T)
    torch.testing.assert_close(layer.base_layer.weight, base)
