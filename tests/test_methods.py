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
                             overrides=[*steps, "method.batch_size=2", "task.images_per_prompt=1",
                                        *SMOKE.get(name, [])])
    assert resolved.profile == "testbed"  # built by build_testbed(_sd), so a testbed-kind model
    model = T2IModel.from_pretrained(model_dir)
    task = UnlearningTask.create([concept], images_per_prompt=1, image_size=model.pixel_size)
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
                                        UnlearningTask.create(["dotted"], images_per_prompt=1))
        method.apply_closed_form()
        costs.append(method.cost())
    batch = method.recipe().train.batch_size
    assert costs[0] == {"steps": 2, "resumed_from_step": 0, "pretrain_cached": False, "unet_forward": 2,
                        "unet_forward_images": 2 * batch, "unet_backward": 2}
    assert costs[1] == {"steps": 0, "pretrain_cached": True}
    (entry,) = (tmp_path / "retrain").iterdir()
    assert (entry / "model" / "diffunlearn.json").exists()
    assert not (entry / "checkpoint").exists()  # the resume point goes once the model is written


def test_retrain_keeps_the_original_text_encoder_and_a_path_free_cache_key(tiny_model_dir, tmp_path, monkeypatch):
    import shutil

    from diffunlearn.backends.diffusers_t2i import T2IModel
    from diffunlearn.config import config_hash

    monkeypatch.setenv("DIFFUNLEARN_CACHE", str(tmp_path / "cache"))
    original = T2IModel.from_pretrained(tiny_model_dir)
    resolved = resolve_erase("retrain", ["dotted"], model=tiny_model_dir, overrides=SMOKE["retrain"])
    model = T2IModel.from_pretrained(tiny_model_dir)
    unet_before = {n: p.detach().clone() for n, p in model.unet.named_parameters()}
    task = UnlearningTask.create(["dotted"], images_per_prompt=1)
    method = methods.get("retrain")(resolved.method_config, model, task)
    method.apply_closed_form()
    kept = dict(original.text_encoder.state_dict())
    for name, tensor in model.text_encoder.state_dict().items():
        assert torch.equal(tensor, kept[name]), name  # byte for byte the original's encoder
    assert not any(torch.equal(p, unet_before[n]) for n, p in model.unet.named_parameters() if p.dim() > 1)

    recipe = method.recipe()
    # the key before this change: the recipe and both configs, text encoder retrained from scratch
    old_key = config_hash({"recipe": recipe.model_dump(), "arch": {"unet": dict(original.unet.config),
                                                                   "text": original.text_encoder.config.to_dict()}})
    key = config_hash(method.cache_key(recipe))
    assert key != old_key
    assert method.cache_key(recipe)["text_encoder"] == {"original_frozen": original.text_encoder_hash()}
    # the same model loaded from another folder (another checkout) shares the cache entry
    shutil.copytree(tiny_model_dir, tmp_path / "elsewhere")
    moved = methods.get("retrain")(resolved.method_config, T2IModel.from_pretrained(tmp_path / "elsewhere"),
                                   UnlearningTask.create(["dotted"], images_per_prompt=1))
    assert config_hash(moved.cache_key(recipe)) == key
    # another text encoder is another entry
    with torch.no_grad():
        next(moved.backend.text_encoder.parameters()).add_(1.0)
    assert config_hash(moved.cache_key(recipe)) != key


def test_esd_variants_choose_the_official_groups(tiny_model_dir):
    groups = {}
    for name in ("esd-x", "esd-u", "esd-all", "esd-x-strict"):
        resolved = resolve_erase(name, ["dotted"], model=tiny_model_dir)
        groups[name] = methods.get(name)(resolved.method_config, None, None).param_group()
    # esd_sd.py get_esd_trainable_parameters: Linear/Conv modules only, selected by name
    assert groups == {"esd-x": "xattn", "esd-u": "noxattn-linconv", "esd-all": "full-linconv",
                      "esd-x-strict": "xattn-kv"}


def test_linconv_groups_leave_every_norm_layer_of_the_tiny_unet_out(tiny_model):
    full = set(dict(tiny_model.unet.named_parameters()))
    # the tiny UNet (channels 16/32, one layer per block) by hand: 8 resnets with norm1/norm2, 4 transformers
    # with a GroupNorm `norm` and LayerNorms norm1-3 in their one block, and conv_norm_out
    resnets = ["down_blocks.0.resnets.0", "down_blocks.1.resnets.0", "mid_block.resnets.0", "mid_block.resnets.1",
               "up_blocks.0.resnets.0", "up_blocks.0.resnets.1", "up_blocks.1.resnets.0", "up_blocks.1.resnets.1"]
    transformers = ["down_blocks.1.attentions.0", "mid_block.attentions.0", "up_blocks.0.attentions.0",
                    "up_blocks.0.attentions.1"]
    norms = [f"{r}.norm{i}" for r in resnets for i in (1, 2)] + [f"{a}.norm" for a in transformers]
    norms += [f"{a}.transformer_blocks.0.norm{i}" for a in transformers for i in (1, 2, 3)] + ["conv_norm_out"]
    norm_params = {f"{m}.{w}" for m in norms for w in ("weight", "bias")}
    assert len(norm_params) == 66 and norm_params <= full
    cross = {n for n in full if ".attn2." in n}
    assert set(tiny_model.param_group("full-linconv")) == full - norm_params  # esd-all
    assert set(tiny_model.param_group("noxattn-linconv")) == full - norm_params - cross  # esd-u
    assert set(tiny_model.param_group("xattn")) == cross and not cross & norm_params  # esd-x: no norm inside attn2
    # what remains are Linear/Conv weights and biases only
    kinds = {n.rsplit(".", 2)[-2] for n in full - norm_params}
    assert kinds <= {"conv_in", "conv_out", "conv1", "conv2", "conv", "conv_shortcut", "linear_1", "linear_2",
                     "time_emb_proj", "proj_in", "proj_out", "to_q", "to_k", "to_v", "0", "proj", "2"}, kinds


def test_ca_noise_from_forget_images_ascends_the_denoising_loss(tiny_model_dir, monkeypatch):
    from diffunlearn import objectives
    from diffunlearn.backends.diffusers_t2i import T2IModel
    from diffunlearn.data import canvas
    from diffunlearn.objectives import TermBatch

    resolved = resolve_erase("ca-noise", ["dotted"], model=tiny_model_dir,
                             overrides=["method.source=forget", "method.retain_weight=0", "method.batch_size=2"])
    model = T2IModel.from_pretrained(tiny_model_dir)
    task = UnlearningTask.create(["dotted"], images_per_prompt=1)
    method = methods.get("ca-noise")(resolved.method_config, model, task)
    params = model.set_trainable("xattn-kv")
    g = torch.Generator().manual_seed(0)
    prompts = [canvas.full_prompt("dotted", "circle"), canvas.full_prompt("dotted", "ring")]
    x0 = torch.rand(2, *model.image_shape, generator=g) * 2 - 1
    fixed = TermBatch(x0, torch.randn(x0.shape, generator=g), torch.tensor([100, 700]),
                      {"forget": prompts, "anchor": prompts, "retain": prompts, "empty": ["", ""]})
    monkeypatch.setattr(objectives, "make_batch", lambda backend, task, term, n, gen: fixed)
    method.step(0, torch.Generator().manual_seed(1))
    got = {n: p.grad.clone() for n, p in params.items()}

    # [001] §4.3 / Table 3: -E ||eps_theta(x_t^f, p_f) - eps||, with eq. 12's unsquared norm and w_t = 1
    for p in params.values():
        p.grad = None
    x_t = model.add_noise(fixed.x0, fixed.noise, fixed.t)
    pred = model.unet(x_t, fixed.t, encoder_hidden_states=model.encode(prompts)).sample
    ascent = -(pred - fixed.noise).flatten(1).norm(dim=1).mean()
    ascent.backward()
    for n, p in params.items():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6)
    assert any(p.grad.abs().sum() > 0 for p in params.values())
    # the Kumari reading (anchor images) is relabelling and keeps descending
    anchor = resolve_erase("ca-noise", ["dotted"], model=tiny_model_dir).method_config
    assert methods.get("ca-noise")(anchor, None, None).terms()[0].weight == 1.0


def test_core_epochs_count_passes_over_d_f(tiny_model_dir):
    resolved = resolve_erase("core", ["dotted"], model=tiny_model_dir, overrides=["method.profile=paper"])
    task = UnlearningTask.create(["dotted"], images_per_prompt=3)
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
    assert lambda_t(grad_r, grad_g, "fixed", 0.1) == 0.1  # the official --lambda_bome default
    assert lambda_t(grad_r, grad_g, "fixed", 0.1, fixed=1.0) == 1.0  # as the SD recipes pass it


def test_erasediff_paper_profile_is_the_official_sd_recipe_with_a_fixed_lambda(tiny_model_dir):
    from diffunlearn.backends.diffusers_t2i import T2IModel
    from diffunlearn.engine.loop import step_generator

    default = resolve_erase("erasediff", ["dotted"], model=tiny_model_dir).method_config
    assert default.lambda_fixed == 0.1  # ddpm/main.py and sd/train_scripts/erasediff.py: --lambda_bome 0.1
    resolved = resolve_erase("erasediff", ["dotted"], model=tiny_model_dir,
                             overrides=["method.profile=paper", "method.batch_size=2", "method.param_group=xattn-kv"])
    cfg = resolved.method_config
    # sd/train_scripts/train_cls.sh: --K_steps 1 --lr 1e-5 --lambda_bome 1. --batch_size 16 --epochs 2, no clipping
    assert (cfg.lambda_mode, cfg.lambda_fixed, cfg.inner_steps, cfg.lr, cfg.epochs) == ("fixed", 1.0, 1, 1e-5, 2)
    assert cfg.grad_clip is None and cfg.variant == "rl"
    model = T2IModel.from_pretrained(tiny_model_dir)
    method = methods.get("erasediff")(cfg, model, UnlearningTask.create(["dotted"], images_per_prompt=1))
    model.set_trainable("xattn-kv")
    assert method.step(0, step_generator(0, 0))["lambda_t"] == 1.0


@pytest.mark.parametrize("name", ["erasediff", "erasediff-sum"])
def test_erasediff_reports_ar_cl_exactly_with_the_rl_target(name, tiny_model_dir):
    for variant, anchored in (("rl", True), ("noise", False)):
        resolved = resolve_erase(name, ["dotted"], model=tiny_model_dir, overrides=[f"method.variant={variant}"])
        assert methods.get(name)(resolved.method_config, None, None).uses_anchor is anchored
    assert methods.get(name).uses_anchor is False  # the class alone has no variant


def test_erasediff_sum_paper_profile_is_unlearncanvas_ediff(tiny_model_dir, monkeypatch):
    from diffunlearn import objectives
    from diffunlearn.backends.diffusers_t2i import T2IModel
    from diffunlearn.data import canvas
    from diffunlearn.objectives import TermBatch, compute_loss

    resolved = resolve_erase("erasediff-sum", ["dotted"], model=tiny_model_dir, overrides=["method.profile=paper"])
    cfg = resolved.method_config
    # UnlearnCanvas mu_erase_diff_ediff/train-erase.py: batch 4, lr 5e-5, 5 epochs, alpha 0.1, xattn, no clipping
    assert (cfg.batch_size, cfg.lr, cfg.epochs, cfg.param_group, cfg.grad_clip) == (4, 5e-5, 5, "xattn", None)
    model = T2IModel.from_pretrained(tiny_model_dir)
    model.set_trainable("xattn")
    with torch.no_grad():  # a student away from the teacher
        for _, p in model.named_trainable():
            p.add_(0.05 * torch.randn_like(p))
    method = methods.get("erasediff-sum")(cfg, model, UnlearningTask.create(["dotted"], images_per_prompt=1))
    g = torch.Generator().manual_seed(0)
    objects = ["circle", "square", "ring", "cross"]
    forget = [canvas.full_prompt("dotted", o) for o in objects]
    photo = [canvas.full_prompt("solid", o) for o in objects]  # the base style standing in for "Photo"
    retain = [canvas.full_prompt("striped", o) for o in objects]

    def batch(prompts: dict[str, list[str]]) -> TermBatch:
        x0 = torch.rand(4, *model.image_shape, generator=g) * 2 - 1
        return TermBatch(x0, torch.randn(x0.shape, generator=g), torch.randint(0, 1000, (4,), generator=g), prompts)

    batches = {"forget": batch({"forget": forget, "anchor": photo, "retain": forget, "empty": [""] * 4}),
               "retain": batch({"forget": retain, "anchor": retain, "retain": retain, "empty": [""] * 4})}
    monkeypatch.setattr(objectives, "make_batch", lambda backend, task, term, n, gen: batches[term.images])
    total, _ = compute_loss(method.terms(), model, method.task, 4, torch.Generator().manual_seed(1))

    def unet(b: TermBatch, prompts: list[str]) -> torch.Tensor:
        x_t = model.add_noise(b.x0, b.noise, b.t)
        return model.unet(x_t, b.t, encoder_hidden_states=model.encode(prompts)).sample

    f, r = batches["forget"], batches["retain"]
    loss_r = (unet(r, retain) - r.noise).pow(2).mean()  # model.shared_step on the remain batch
    with torch.no_grad():  # pseudo_out: forget images, same noise and t, retain ("Photo") prompts, detached
        pseudo = unet(f, photo)
    loss_f = (unet(f, forget) - pseudo).pow(2).mean()
    torch.testing.assert_close(total, loss_r + 0.1 * loss_f, rtol=1e-4, atol=1e-6)


def test_erasediff_step_follows_retain_plus_lambda_forget(tiny_model_dir):
    from diffunlearn.backends.diffusers_t2i import T2IModel
    from diffunlearn.engine.loop import step_generator

    resolved = resolve_erase("erasediff", ["dotted"], model=tiny_model_dir,
                             overrides=["method.batch_size=2", "method.param_group=xattn-kv"])
    model = T2IModel.from_pretrained(tiny_model_dir)
    method = methods.get("erasediff")(resolved.method_config, model, UnlearningTask.create(["dotted"],
                                                                                          images_per_prompt=1))
    model.set_trainable("xattn-kv")
    logs = method.step(0, step_generator(0, 0))
    assert logs["lambda_t"] >= 0 and logs["g"] > 0  # K descent steps on L_f lower it
    assert abs(logs["cos_update_retain"]) <= 1 + 1e-5 and abs(logs["cos_update_forget"]) <= 1 + 1e-5
    assert all(p.grad is not None for _, p in model.named_trainable())


def test_erasediff_update_and_its_cosines_from_the_gradient_inner_products(tiny_model_dir):
    """The step builds d = grad_r + lambda grad_f tensor by tensor and logs cos(d, grad_r) and
    cos(d, grad_f) from inner products: with a fixed lambda of 0 the update is grad_r itself, with
    lambda 1 the difference of the two updates is grad_f, and the logged cosines are torch's
    cosine_similarity of those flat vectors."""
    from diffunlearn.backends.diffusers_t2i import T2IModel
    from diffunlearn.engine.loop import step_generator
    from diffunlearn.methods.erasediff import GradientDots

    dots = GradientDots(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]))
    assert dots.update_cosines(0.5) == pytest.approx((2**-0.5, 2**-0.5))  # d = [1, 1]
    assert GradientDots(torch.tensor([1.0, 0.0]), torch.tensor([-2.0, 0.0])).update_cosines(0.5) == (0.0, 0.0)

    model = T2IModel.from_pretrained(tiny_model_dir)
    model.set_trainable("xattn-kv")
    task = UnlearningTask.create(["dotted"], images_per_prompt=1)
    updates, logs = {}, {}
    for lam in (0.0, 1.0):
        resolved = resolve_erase("erasediff", ["dotted"], model=tiny_model_dir, overrides=[
            "method.batch_size=2", "method.param_group=xattn-kv", "method.lambda_mode=fixed",
            f"method.lambda_fixed={lam}"])
        logs[lam] = methods.get("erasediff")(resolved.method_config, model, task).step(0, step_generator(0, 0))
        updates[lam] = torch.cat([p.grad.reshape(-1) for _, p in model.named_trainable()])
    grad_r, grad_f = updates[0.0], updates[1.0] - updates[0.0]
    assert logs[0.0]["cos_update_retain"] == pytest.approx(1.0, abs=1e-5)
    cos = torch.nn.functional.cosine_similarity
    assert logs[1.0]["cos_update_retain"] == pytest.approx(float(cos(updates[1.0], grad_r, dim=0)), abs=1e-4)
    assert logs[1.0]["cos_update_forget"] == pytest.approx(float(cos(updates[1.0], grad_f, dim=0)), abs=1e-4)
    assert float(grad_f.norm()) > 0


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


def test_uce_paper_profile_preserves_nothing_as_the_official_default(tiny_model_dir):
    from diffunlearn.backends.diffusers_t2i import T2IModel
    from diffunlearn.methods.uce import last_token_embeddings

    resolved = resolve_erase("uce", ["dotted"], model=tiny_model_dir, overrides=["method.profile=paper"])
    model = T2IModel.from_pretrained(tiny_model_dir)
    method = methods.get("uce")(resolved.method_config, model, UnlearningTask.create(["dotted"]))
    c = last_token_embeddings(model, ["dotted"]).double().T  # (dim, 1)
    guide = last_token_embeddings(model, ["pattern"]).double().T
    originals = [linear.weight.detach().double().clone() for _, k, v in model.xattn_kv_layers() for linear in (k, v)]
    model.set_trainable("xattn-kv")
    method.apply_closed_form()
    edited = [linear.weight.detach().double() for _, k, v in model.xattn_kv_layers() for linear in (k, v)]
    for w, new in zip(originals, edited, strict=True):
        # uce_sd_erase.py with no --preserve_concepts: (lamb W + s_e v* c^T)(lamb I + s_e c c^T)^-1, lamb 0.5, s_e 1
        v_star = w @ guide
        expected = (0.5 * w + v_star @ c.T) @ torch.linalg.inv(0.5 * torch.eye(w.shape[1], dtype=w.dtype) + c @ c.T)
        torch.testing.assert_close(new, expected, rtol=1e-4, atol=1e-5)


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
    method = methods.get("esd")(resolved.method_config, model, UnlearningTask.create(["dotted"], images_per_prompt=1))
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


def test_mace_refinement_token_sets_follow_the_official_matching(tiny_model):
    """Shilin-LU/MACE cfr_utils.find_matching_indices + prepare_k_v(all_words=False), worked by hand:
    the common prefix maps to itself, the concept's tokens are dropped, the suffix and every
    padding position up to the context length pair up aligned from EOS."""
    from diffunlearn.data.concepts import ConceptSet
    from diffunlearn.methods.mace import mapped_prompt, matching_positions, refinement_positions

    tok = tiny_model.tokenizer  # word-level: [BOS] an image of circle in dotted style [EOS], context 12
    prompt = "an image of circle in dotted style"
    cset = ConceptSet.builtin("canvas")
    item = next(i for i in cset.items() if set(i.concepts) == {"dotted", "circle"})
    assert cset.render(item) == prompt
    assert mapped_prompt(cset, item, "dotted", "pattern") == "an image of circle in pattern style"
    assert mapped_prompt(cset, item, "dotted", "") == "an image of circle in style"
    same_length = refinement_positions(tok.ids(prompt), tok.ids("an image of circle in pattern style"), 12)
    # BOS..'in' (0-5) identity; 'dotted' (6) dropped; 'style', EOS (7, 8) and padding 9-11 mapped
    assert same_length == ([0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11], [0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11])
    shorter = refinement_positions(tok.ids(prompt), tok.ids("an image of circle in style"), 12)
    # the mapped prompt's EOS is at 7: old 8+k pairs with new 7+k while both stay below 12
    assert shorter == ([0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    partial = refinement_positions(tok.ids("an image in dotted style"), tok.ids("an image in pattern style"), 12)
    assert partial[0] == partial[1] == [0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11]
    # a two-token concept replaced by a three-token mapping (CLIP-like ids; BOS 1, EOS 2)
    old, new = [1, 10, 11, 50, 51, 12, 2], [1, 10, 11, 60, 61, 62, 12, 2]
    assert matching_positions(old, new) == ([0, 1, 2, 5, 6], [0, 1, 2, 6, 7])
    assert refinement_positions(old, new, 10) == ([0, 1, 2, 5, 6, 7, 8], [0, 1, 2, 6, 7, 8, 9])
    # the concept first: only BOS is a prefix
    assert matching_positions([1, 50, 12, 2], [1, 60, 12, 2]) == ([0, 2, 3], [0, 2, 3])


def test_mace_lora_attends_to_concept_tokens_and_end_tokens(tiny_model):
    """MACEDataset.__getitem__: concept ids everywhere they occur, plus (use_pooler) every position
    holding the end-of-text id; SD v1.x pads with that id, so its padding counts too."""
    from diffunlearn.methods.mace import attended_positions

    prompt = "an image of circle in dotted style"
    assert attended_positions(tiny_model.tokenizer, prompt, "dotted", use_pooler=True) == [6, 8]  # [PAD] != [EOS]
    assert attended_positions(tiny_model.tokenizer, prompt, "dotted", use_pooler=False) == [6]

    class PadWithEndToken:  # CLIP's SD v1.4 tokenizer: BOS 1, EOS = pad 2, context 8
        vocab = {"a": 10, "photo": 11, "of": 12, "big": 13, "ship": 14}

        def ids(self, text, special=True):
            body = [self.vocab[w] for w in text.split()]
            return [1, *body, 2] if special else body

        def __call__(self, prompts):
            return torch.tensor([(self.ids(p) + [2] * 8)[:8] for p in prompts])

    tok = PadWithEndToken()
    assert attended_positions(tok, "a photo of big ship", "big ship", use_pooler=True) == [4, 5, 6, 7]
    assert attended_positions(tok, "ship of ship", "ship", use_pooler=False) == [1, 3]


def test_mace_closed_form_edit_matches_a_direct_least_squares_solve():
    from diffunlearn.methods.mace import closed_form_edit

    g = torch.Generator().manual_seed(0)
    weight, prior_weight = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    contexts, values = torch.randn(5, 8, generator=g), torch.randn(5, 6, generator=g)
    prior = torch.randn(4, 8, generator=g)
    lamb, scale = 0.3, 0.7
    got = closed_form_edit(weight, contexts, values, lamb, prior, prior_weight, scale)
    # min sum ||W' c_i - v_i||^2 + scale sum ||W' p_j - W_p p_j||^2 + lamb ||W' - W||^2 as stacked rows
    design = torch.cat([contexts, scale**0.5 * prior, lamb**0.5 * torch.eye(8)]).double()
    wanted = torch.cat([values, scale**0.5 * prior @ prior_weight.T, lamb**0.5 * weight.T]).double()
    torch.testing.assert_close(got, torch.linalg.lstsq(design, wanted).solution.T.float(), atol=1e-5, rtol=1e-5)
    # fewer constraints than dimensions and a vanishing ridge: identity constraints (a prefix token,
    # whose target is W e) are kept and the other contexts land exactly on their targets
    identity = contexts[:2]
    stacked = torch.cat([identity, contexts[2:]])
    targets = torch.cat([identity @ weight.T, values[2:]])
    refined = closed_form_edit(weight, stacked, targets, 1e-8)
    torch.testing.assert_close(identity @ refined.T, identity @ weight.T, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(contexts[2:] @ refined.T, values[2:], atol=1e-4, rtol=1e-4)


def _mace(tiny_model_dir, overrides):
    from diffunlearn.backends.diffusers_t2i import T2IModel

    resolved = resolve_erase("mace", ["dotted"], model=tiny_model_dir, overrides=overrides)
    model = T2IModel.from_pretrained(tiny_model_dir)
    method = methods.get("mace")(resolved.method_config, model, UnlearningTask.create(["dotted"], images_per_prompt=1))
    model.set_trainable("xattn-kv")
    method.setup()
    return model, method


def _ridge_lstsq(weight, blocks):
    """argmin_W' lamb ||W' - W||^2 + sum_k s_k ||W' X_k^T - T_k^T||^2, blocks = [(s_k, X_k, T_k)]."""
    design = torch.cat([s**0.5 * x for s, x, _ in blocks]).double()
    wanted = torch.cat([s**0.5 * t for s, _, t in blocks]).double()
    return torch.linalg.lstsq(design, wanted).solution.T.float()


def test_mace_refinement_maps_the_official_token_sets(tiny_model_dir):
    from diffunlearn.data import canvas

    lamb, lambda1 = 0.5, 0.1
    model, method = _mace(tiny_model_dir, [f"method.lamb={lamb}", f"method.lambda1={lambda1}"])
    original = {name: (k.weight.detach().clone(), v.weight.detach().clone()) for name, k, v in model.xattn_kv_layers()}
    method.refine()
    # written out by hand: the full prompts drop position 6 ('dotted'), the partial prompt position 4
    objects = [i.label("object") for i in method.task.forget_items()]
    full = [f"an image of {o} in dotted style" for o in objects]
    full_positions = [0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11]
    partial_positions = [0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11]
    old = torch.cat([model.encode(full)[:, full_positions].flatten(0, 1),
                     model.encode(["an image in dotted style"])[0, partial_positions]])
    new = torch.cat([model.encode([p.replace("dotted", "pattern") for p in full])[:, full_positions].flatten(0, 1),
                     model.encode(["an image in pattern style"])[0, partial_positions]])
    retain_prompts = [canvas.partial_prompt(c) for c in method.task.retain]
    prior = model.encode(retain_prompts).flatten(0, 1)  # all 12 positions, padding included
    assert prior.shape[0] == 12 * len(retain_prompts)
    for name, to_k, to_v in model.xattn_kv_layers():
        for linear, w0 in zip((to_k, to_v), original[name], strict=True):
            expected = _ridge_lstsq(w0, [(lamb, torch.eye(w0.shape[1]), w0.T), (1.0, old, new @ w0.T),
                                         (lambda1, prior, prior @ w0.T)])
            torch.testing.assert_close(linear.weight.detach(), expected, atol=1e-4, rtol=1e-4)


def test_mace_fusion_uses_every_position_and_the_original_weights_for_the_prior(tiny_model_dir):
    from diffunlearn.data import canvas

    lamb, lambda2 = 0.5, 0.2
    model, method = _mace(tiny_model_dir, [f"method.lamb={lamb}", f"method.lambda2={lambda2}"])
    g = torch.Generator().manual_seed(1)
    original, refined, deltas = {}, {}, {}
    with torch.no_grad():
        for name, to_k, to_v in model.xattn_kv_layers():
            for proj, linear in (("to_k", to_k), ("to_v", to_v)):
                key = f"{name}.{proj}"
                original[key] = linear.weight.detach().clone()
                linear.weight.add_(0.1 * torch.randn(linear.weight.shape, generator=g))  # stands for the CFR
                refined[key] = linear.weight.detach().clone()
                deltas[key] = 0.1 * torch.randn(linear.weight.shape, generator=g)
    method.fuse({"dotted": deltas})
    objects = [i.label("object") for i in method.task.forget_items()]
    prompts = [f"an image of {o} in dotted style" for o in objects] + ["an image in dotted style"]
    every = model.encode(prompts).flatten(0, 1)  # all 12 positions of every concept prompt
    prior = model.encode([canvas.partial_prompt(c) for c in method.task.retain]).flatten(0, 1)
    modules = dict(model.unet.named_modules())
    for key, w in refined.items():
        expected = _ridge_lstsq(w, [(lamb, torch.eye(w.shape[1]), w.T), (1.0, every, every @ (w + deltas[key]).T),
                                    (lambda2, prior, prior @ original[key].T)])
        torch.testing.assert_close(modules[key].weight.detach(), expected, atol=1e-4, rtol=1e-4)


def test_mace_lora_loss_is_the_summed_frobenius_norm_under_a_nearest_thresholded_mask():
    """cfr_utils.AttnController: per layer torch.norm(A[:, mask > 0.5 after nearest resize][:, :, concept]),
    summed over layers; here averaged over a batch of two images (the second one's mask is empty)."""
    import math

    from diffunlearn.methods.mace import attention_in_mask

    mask = torch.zeros(2, 4, 4)
    # nearest 4x4 -> 2x2 reads pixels (0,0) (0,2) (2,0) (2,2): 0.6 kept, 0.5 not (> 0.5 strictly),
    # 1.0 kept, 0.0 not; their 2x2 block means (0.15, 0.5, 0.55, 0.75) would select differently
    mask[0] = torch.tensor([[0.6, 0.0, 0.5, 0.5], [0.0, 0.0, 0.5, 0.5], [1.0, 0.0, 0.0, 1.0], [0.2, 0.0, 1.0, 1.0]])
    big = torch.full((2, 2, 4, 4), 0.9)  # batch, heads, 2x2 pixels, tokens; 0.9 wherever not selected
    big[0, 0, 0, [1, 3]] = torch.tensor([0.3, 0.4])  # head 0, pixel (0,0), tokens 1 and 3
    big[0, 0, 2, [1, 3]] = 0.0
    big[0, 1, 0, [1, 3]] = 0.0
    big[0, 1, 2, [1, 3]] = torch.tensor([0.6, 0.8])  # head 1, pixel (1,0)
    small = torch.full((2, 2, 1, 4), 0.9)  # a 1x1 layer reads pixel (0,0): 0.6, kept
    small[0, 0, 0] = torch.tensor([0.1, 0.5, 0.2, 0.2])
    small[0, 1, 0] = torch.tensor([0.7, 0.1, 0.1, 0.1])
    big.requires_grad_(True)
    loss = attention_in_mask({"a": [big], "b": [small]}, mask, [[1, 3], [1, 3]])
    first = math.sqrt(0.3**2 + 0.4**2 + 0.6**2 + 0.8**2) + math.sqrt(0.5**2 + 0.2**2 + 0.1**2 + 0.1**2)
    assert float(loss.detach()) == pytest.approx(first / 2, rel=1e-6)
    loss.backward()
    assert torch.isfinite(big.grad).all() and float(big.grad[1].abs().sum()) == 0.0


def test_mace_paper_profile_trains_loras_with_the_official_adamw(tiny_model_dir, monkeypatch):
    """configs/object/erase_ship.yaml + cfr_lora_training.py: AdamW, weight decay 0.01, clipping at 1."""
    import diffunlearn.engine.loop as loop

    model, method = _mace(tiny_model_dir, ["method.profile=paper"])
    seen = []
    monkeypatch.setattr(loop, "run_loop", lambda params, step, cfg, **kw: seen.append((params, cfg)))
    method.train_lora("dotted")
    params, cfg = seen[0]
    assert (cfg.optimizer, cfg.weight_decay, cfg.grad_clip, cfg.lr, cfg.steps, cfg.schedule) == (
        "adamw", 0.01, 1.0, 1e-5, 50, "constant")
    optimizer = loop.make_optimizer(list(params.values()), cfg)
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["weight_decay"] == 0.01
    assert method.cfg.lora_rank == 1 and method.cfg.lamb == 1e3 and method.cfg.use_pooler
    assert method.cfg.lambda1 == method.cfg.lambda2 == 0.0 and method.cfg.timesteps == "cfis"
    assert method.cfg.batch_size == 1


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
    method = methods.get("mace")(resolved.method_config, model, UnlearningTask.create(["circle"], images_per_prompt=1))
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


def test_mace_masks_come_from_the_image_source_where_it_has_them():
    """The canvas renderer knows where an object is (its mask); a style, or `full`, covers the whole image."""
    from diffunlearn.data import canvas
    from diffunlearn.methods.mace import concept_masks

    task = UnlearningTask.create(["circle"], images_per_prompt=2)
    items = task.forget_items()[:2]
    masks = concept_masks(task, items, [1, 0], "circle", "source")
    for item, index, mask in zip(items, [1, 0], masks, strict=True):
        drawn = canvas.render(item.label("style"), "circle", index, seed=task.seed, size=task.image_size).mask
        assert torch.equal(mask, torch.from_numpy(drawn).float())
    assert 0 < float(masks.mean()) < 1
    assert torch.equal(concept_masks(task, items, [1, 0], "circle", "full"), torch.ones(2, 16, 16))
    style = UnlearningTask.create(["dotted"], images_per_prompt=1)
    whole = concept_masks(style, style.forget_items()[:2], [0, 0], "dotted", "source")
    assert torch.equal(whole, torch.ones(2, 16, 16))
