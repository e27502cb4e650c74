"""The diffusers backend and model folders, on a tiny seeded testbed model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import TINY_ARCH, build_tiny_model

from diffunlearn.backends.base import PARAM_GROUPS, Backend
from diffunlearn.backends.diffusers_t2i import T2IModel
from diffunlearn.backends.model_dir import (
    CHANGED_UNET_WEIGHTS,
    META_FILE,
    UNET_WEIGHTS,
    ModelDirError,
    check_model_dir,
    model_content_hash,
    read_safetensors_header,
)
from diffunlearn.registry import UnknownNameError

PROMPT = "an image of circle in striped style"


pytestmark = pytest.mark.usefixtures("one_thread")


def probe_inputs(model: T2IModel, n: int = 2):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, *model.image_shape, generator=g)
    t = torch.tensor([50, 700][:n] + [300] * max(0, n - 2))
    cond = model.encode([PROMPT, "an image of ring"][:n] + [""] * max(0, n - 2))
    return x, t, cond


@torch.no_grad()
def perturb(params: dict[str, torch.nn.Parameter], scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(1)
    for p in params.values():
        p.add_(scale * torch.randn(p.shape, generator=g))


def copy_model_dir(src, dst):
    shutil.copytree(src, dst)
    return dst


# ---- files ---------------------------------------------------------------------------------


def test_protocol_and_meta(tiny_model):
    assert isinstance(tiny_model, Backend)
    assert tiny_model.image_shape == (3, TINY_ARCH["image_size"], TINY_ARCH["image_size"])
    assert tiny_model.meta["kind"] == "testbed" and tiny_model.meta["latent"] is False
    assert tiny_model.content_hash() == "unsaved"


def test_save_load_round_trip_gives_identical_eps(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "m")
    meta = check_model_dir(tmp_path / "m")
    assert meta["kind"] == "testbed" and meta["guidance_scale"] == TINY_ARCH["guidance_scale"]
    loaded = T2IModel.from_pretrained(tmp_path / "m")
    assert loaded.path == tmp_path / "m"
    assert loaded.meta == tiny_model.meta
    x, t, _ = probe_inputs(tiny_model)
    cond = tiny_model.encode([PROMPT, ""])
    assert torch.equal(loaded.encode([PROMPT, ""]), cond)
    assert loaded.tokenizer.ids(PROMPT) == tiny_model.tokenizer.ids(PROMPT)
    with torch.no_grad():
        assert torch.equal(loaded.eps(x, t, cond), tiny_model.eps(x, t, cond))
    for (n1, p1), (n2, p2) in zip(tiny_model.unet.state_dict().items(), loaded.unet.state_dict().items(),
                                  strict=True):
        assert n1 == n2 and torch.equal(p1, p2)


def test_check_model_dir_missing_folder(tmp_path):
    with pytest.raises(ModelDirError, match="model folder not found"):
        check_model_dir(tmp_path / "nothing")
    with pytest.raises(ModelDirError, match="model folder not found"):
        T2IModel.from_pretrained(tmp_path / "nothing")


def test_check_model_dir_accepts_good_folder(tiny_model_dir):
    assert check_model_dir(tiny_model_dir)["kind"] == "testbed"


def test_check_model_dir_missing_unet_weights(tiny_model_dir, tmp_path):
    path = copy_model_dir(tiny_model_dir, tmp_path / "m")
    (path / UNET_WEIGHTS).unlink()
    with pytest.raises(ModelDirError, match=f"missing {UNET_WEIGHTS}"):
        check_model_dir(path)
    with pytest.raises(ModelDirError):
        T2IModel.from_pretrained(path)


def test_check_model_dir_not_a_model_folder(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "readme.txt").write_text("hello")
    with pytest.raises(ModelDirError, match="is not a model folder: missing unet/config.json"):
        check_model_dir(tmp_path / "m")


@pytest.mark.parametrize("which", [UNET_WEIGHTS, "text_encoder/model.safetensors"])
def test_check_model_dir_truncated_safetensors(tiny_model_dir, tmp_path, which):
    path = copy_model_dir(tiny_model_dir, tmp_path / "m")
    data = (path / which).read_bytes()
    (path / which).write_bytes(data[: len(data) - 100])
    with pytest.raises(ModelDirError, match="truncated") as info:
        check_model_dir(path)
    assert which.split("/")[0] in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"abc", "shorter than its header"),
        ((10**12).to_bytes(8, "little") + b"{}", "bad header length"),
        ((0).to_bytes(8, "little") + b"{}", "bad header length"),
        ((6).to_bytes(8, "little") + b"{nope}", "corrupt safetensors"),
        ((2).to_bytes(8, "little") + b"{}" + b"xx", "size does not match"),
        ((2).to_bytes(8, "little") + b"[]", "malformed header"),
        ((8).to_bytes(8, "little") + b'{"a": 1}', "malformed header"),
        ((19).to_bytes(8, "little") + b'{"a": {"dtype": 1}}', "malformed header"),
    ],
)
def test_corrupt_safetensors(tiny_model_dir, tmp_path, content, reason):
    path = copy_model_dir(tiny_model_dir, tmp_path / "m")
    (path / UNET_WEIGHTS).write_bytes(content)
    with pytest.raises(ModelDirError, match=reason):
        check_model_dir(path)


def test_read_safetensors_header_lists_tensors(tiny_model_dir, tiny_model):
    header = read_safetensors_header(tiny_model_dir / UNET_WEIGHTS)
    names = {k for k in header if k != "__metadata__"}
    assert names == set(tiny_model.unet.state_dict())
    name = "conv_in.weight"
    assert header[name]["shape"] == list(tiny_model.unet.conv_in.weight.shape)
    assert header[name]["dtype"] == "F32"


@pytest.mark.parametrize("which", ["unet/config.json", "text_encoder/config.json", META_FILE])
def test_check_model_dir_bad_json(tiny_model_dir, tmp_path, which):
    path = copy_model_dir(tiny_model_dir, tmp_path / "m")
    (path / which).write_text('{"sample_size": 16,')
    with pytest.raises(ModelDirError, match="corrupt") as info:
        check_model_dir(path)
    assert which.split("/")[-1] in str(info.value)


def test_content_hash_stable_and_sensitive(tmp_path):
    model = build_tiny_model(0)
    model.save_pretrained(tmp_path / "a")
    model.save_pretrained(tmp_path / "b")
    build_tiny_model(0).save_pretrained(tmp_path / "c")  # same seed, same weights
    h = model_content_hash(tmp_path / "a")
    assert len(h) == 16
    assert model_content_hash(tmp_path / "b") == h
    assert model_content_hash(tmp_path / "c") == h
    # the hash ignores where the folder is and its diffunlearn.json
    shutil.copytree(tmp_path / "a", tmp_path / "moved")
    (tmp_path / "moved" / META_FILE).write_text(json.dumps({"kind": "testbed", "note": "x"}))
    assert model_content_hash(tmp_path / "moved") == h
    # loading and saving again keeps the hash: it depends on the weights and configs only
    loaded = T2IModel.from_pretrained(tmp_path / "a")
    assert loaded.content_hash() == h
    loaded.save_pretrained(tmp_path / "resaved")
    assert model_content_hash(tmp_path / "resaved") == h
    # one changed weight changes it
    with torch.no_grad():
        loaded.unet.conv_out.bias[0] += 1e-3
    loaded.save_pretrained(tmp_path / "changed")
    assert model_content_hash(tmp_path / "changed") != h


# ---- parameter groups and the teacher ------------------------------------------------------


def test_param_groups_partition(tiny_model):
    groups = {g: set(tiny_model.param_group(g)) for g in PARAM_GROUPS}
    full = set(dict(tiny_model.unet.named_parameters()))
    assert groups["full"] == full
    assert groups["xattn"] and groups["noxattn"] and groups["xattn-kv"]
    assert not groups["xattn"] & groups["noxattn"]
    assert groups["xattn"] | groups["noxattn"] == full
    assert groups["xattn-kv"] < groups["xattn"]
    assert all(".attn2." in n for n in groups["xattn"])
    assert all(".attn2." not in n for n in groups["noxattn"])
    assert any(".attn1." in n for n in groups["noxattn"])  # self-attention is not cross-attention
    kv = {n for n in groups["xattn"] if ".attn2.to_k." in n or ".attn2.to_v." in n}
    assert groups["xattn-kv"] == kv
    assert any(".attn2.to_q." in n for n in groups["xattn"] - groups["xattn-kv"])
    assert any(".attn2.to_out." in n for n in groups["xattn"] - groups["xattn-kv"])
    # 4 cross-attention layers (down 1, mid 1, up 2), each with a K and a V weight
    assert len(tiny_model.xattn_kv_layers()) == 4
    assert len(groups["xattn-kv"]) == 8
    # the group values are the live parameters, not copies
    params = dict(tiny_model.unet.named_parameters())
    for name, p in tiny_model.param_group("xattn-kv").items():
        assert p is params[name]


def test_xattn_kv_layers_match_group(tiny_model):
    kv = tiny_model.param_group("xattn-kv")
    ids = {id(p) for p in kv.values()}
    for name, to_k, to_v in tiny_model.xattn_kv_layers():
        assert name.endswith("attn2")
        assert id(to_k.weight) in ids and id(to_v.weight) in ids
        assert to_k.in_features == TINY_ARCH["text_dim"]


def test_unknown_param_group(tiny_model):
    with pytest.raises(UnknownNameError) as info:
        tiny_model.param_group("xatn")
    assert "did you mean 'xattn'" in str(info.value)
    assert "xattn-kv" in str(info.value) and "noxattn" in str(info.value)
    with pytest.raises(UnknownNameError):
        tiny_model.set_trainable("everything")


@pytest.mark.parametrize("group", ["xattn", "xattn-kv", "noxattn"])
def test_set_trainable_freezes_the_rest_and_teacher_is_the_original(group, tiny_model):
    model = tiny_model
    x, t, cond = probe_inputs(model)
    with torch.no_grad():
        before = model.eps(x, t, cond)
    assert torch.equal(model.teacher_eps(x, t, cond), before)  # no snapshot yet: the model itself

    params = model.set_trainable(group)
    assert set(params) == set(model.param_group(group))
    assert {n for n, _ in model.named_trainable()} == set(params)
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    # the teacher is a snapshot of only that group, in separate memory
    teacher = model.teacher_params()
    assert set(teacher) == set(params)
    for n, p in params.items():
        assert torch.equal(teacher[n], p) and teacher[n].data_ptr() != p.data_ptr()
        assert not teacher[n].requires_grad
    assert torch.equal(model.teacher_eps(x, t, cond), before)

    # gradients reach only the group
    model.eps(x, t, cond).pow(2).mean().backward()
    for n, p in model.unet.named_parameters():
        assert (p.grad is not None) == (n in params), n
    assert any(p.grad.abs().sum() > 0 for p in params.values())

    perturb(params)
    with torch.no_grad():
        after = model.eps(x, t, cond)
    assert not torch.allclose(after, before, atol=1e-4)  # the student changed
    assert torch.equal(model.teacher_eps(x, t, cond), before)  # the teacher did not
    # and it still equals a fresh copy of the original model
    fresh = build_tiny_model(0)
    with torch.no_grad():
        assert torch.equal(fresh.eps(x, t, cond), before)


def test_snapshot_again_moves_the_teacher(tiny_model):
    x, t, cond = probe_inputs(tiny_model)
    params = tiny_model.set_trainable("xattn-kv")
    perturb(params)
    with torch.no_grad():
        now = tiny_model.eps(x, t, cond)
    tiny_model.snapshot_teacher(params)
    assert torch.equal(tiny_model.teacher_eps(x, t, cond), now)


# ---- text ----------------------------------------------------------------------------------


def test_encode_is_deterministic_and_cached(tiny_model):
    calls = []
    handle = tiny_model.text_encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        a = tiny_model.encode([PROMPT, "", PROMPT])
        assert calls == [2]  # unique prompts, one batched forward
        assert a.shape == (3, TINY_ARCH["max_length"], TINY_ARCH["text_dim"])
        assert torch.equal(a[0], a[2]) and not torch.equal(a[0], a[1])
        b = tiny_model.encode([PROMPT, ""])
        assert calls == [2]  # served from the cache
        assert torch.equal(b, a[:2])
        tiny_model.encode(["an image of ring", PROMPT])
        assert calls == [2, 1]  # only the new prompt is encoded
    finally:
        handle.remove()
    assert not a.requires_grad
    # a second model with the same weights encodes identically (no hidden randomness)
    assert torch.equal(build_tiny_model(0).encode([PROMPT, ""]), a[:2])
    # and the cache agrees with an uncached forward
    with torch.no_grad():
        direct = tiny_model.text_encoder(tiny_model.tokenizer([PROMPT]))[0]
    assert torch.equal(direct[0], a[0])


def test_token_positions(tiny_model):
    tok = tiny_model.tokenizer
    ids = tok.ids(PROMPT)
    assert ids[0] == tok.special_id("[BOS]") and ids[-1] == tok.special_id("[EOS]")
    assert len(tok.ids("striped", special=False)) == 1
    assert tiny_model.token_positions(PROMPT, "striped") == [6]
    assert ids[6] == tok.ids("striped", special=False)[0]
    assert tiny_model.token_positions(PROMPT, "circle") == [4]
    assert tiny_model.token_positions(PROMPT, "style") == [7]
    assert tiny_model.token_positions(PROMPT, "square") == []
    assert tiny_model.token_positions("An Image of CIRCLE", "circle") == [4]  # lowercased
    # padding: the tokenizer output has max_length columns, the concept id at the position
    row = tok([PROMPT])[0]
    assert row.shape == (TINY_ARCH["max_length"],)
    assert int(row[6]) == tok.ids("striped", special=False)[0]
    assert int(row[-1]) == tok.pad_id


# ---- sampling ------------------------------------------------------------------------------


def test_sample_deterministic_and_batch_independent(tiny_model):
    prompts = [PROMPT, "an image of ring", "", "an image in wavy style"]
    seeds = [11, 12, 13, 14]
    a = tiny_model.sample(prompts, seeds, steps=3, batch_size=4)
    assert a.shape == (4, *tiny_model.image_shape)
    assert a.min() >= -1 and a.max() <= 1
    b = tiny_model.sample(prompts, seeds, steps=3, batch_size=4)
    assert torch.equal(a, b)
    one = tiny_model.sample(prompts, seeds, steps=3, batch_size=1)
    assert torch.allclose(one, a, atol=1e-5, rtol=0)
    # a different seed gives a different image; the same seed in another batch the same one
    other = tiny_model.sample([PROMPT, PROMPT], [99, 11], steps=3)
    assert not torch.allclose(other[0], a[0], atol=1e-3)
    assert torch.allclose(other[1], a[0], atol=1e-5, rtol=0)


def test_initial_noise_per_seed(tiny_model):
    a = tiny_model.initial_noise([1, 2])
    b = tiny_model.initial_noise([2])
    assert torch.equal(a[1], b[0]) and not torch.equal(a[0], a[1])


def test_sample_stop_at_returns_intermediate_state(tiny_model):
    model = tiny_model
    steps, guidance = 4, 2.0
    assert model.ddim_timesteps(steps) == [750, 500, 250, 0]
    seeds = [3, 4]
    prompts = [PROMPT, ""]
    after1 = model.sample(prompts, seeds, steps=steps, guidance=guidance, stop_at=500)
    after2 = model.sample(prompts, seeds, steps=steps, guidance=guidance, stop_at=250)
    final = model.sample(prompts, seeds, steps=steps, guidance=guidance, return_model_space=True)
    assert after1.shape == after2.shape == final.shape == (2, *model.image_shape)
    assert not torch.allclose(after1, after2) and not torch.allclose(after2, final)
    # stop_at=600 also stops after the first step (the next timestep, 500, is <= 600)
    assert torch.equal(model.sample(prompts, seeds, steps=steps, guidance=guidance, stop_at=600), after1)
    # a reference DDIM step with classifier-free guidance from the same noise
    x = model.initial_noise(seeds)
    cond, uncond = model.encode(prompts), model.encode(["", ""])
    with torch.no_grad():
        tt = torch.full((2,), 750, dtype=torch.long)
        e_u, e_c = model.eps(x, tt, uncond), model.eps(x, tt, cond)
    e = e_u + guidance * (e_c - e_u)
    abar, abar_prev = model.alphas_cumprod[750], model.alphas_cumprod[500]
    x0 = ((x - (1 - abar).sqrt() * e) / abar.sqrt()).clamp(-1, 1)
    e = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
    expected = abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * e
    assert torch.allclose(after1, expected, atol=1e-5, rtol=0)
    # the intermediate state is noisy, not an image clamped to [-1, 1]
    assert after1.abs().max() > 1.0


def test_sample_with_teacher_params(tiny_model):
    seeds, prompts = [5], [PROMPT]
    original = tiny_model.sample(prompts, seeds, steps=2)
    params = tiny_model.set_trainable("xattn")
    perturb(params, scale=0.5)
    changed = tiny_model.sample(prompts, seeds, steps=2)
    assert not torch.allclose(changed, original, atol=1e-4)
    teacher = tiny_model.sample(prompts, seeds, steps=2, params=tiny_model.teacher_params())
    assert torch.allclose(teacher, original, atol=1e-6, rtol=0)


# ---- attention capture ---------------------------------------------------------------------


def test_capture_attention(tiny_model):
    model = tiny_model
    x, t, cond = probe_inputs(model)
    attn2 = sorted(name for name, _ in model.unet.named_modules() if name.endswith("attn2"))
    before = dict(model.unet.attn_processors)
    with torch.no_grad():
        plain = model.eps(x, t, cond)
        with model.capture_attention() as store:
            captured = model.eps(x, t, cond)
    assert sorted(store) == attn2 and len(attn2) == 4
    for name, maps in store.items():
        assert len(maps) == 1
        probs = maps[0]
        assert probs.shape[0] == 2 and probs.shape[1] == TINY_ARCH["heads"]
        assert probs.shape[-1] == TINY_ARCH["max_length"]
        assert probs.shape[2] in (8 * 8, 16 * 16), name  # one row per pixel of the feature map
        assert (probs >= 0).all()
        assert torch.allclose(probs.sum(-1), torch.ones(probs.shape[:-1]), atol=1e-5)
    # capturing does not change the output, and the processors come back
    assert torch.allclose(captured, plain, atol=1e-5)
    after = model.unet.attn_processors
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)


def test_capture_attention_restores_after_error(tiny_model):
    before = dict(tiny_model.unet.attn_processors)
    with pytest.raises(RuntimeError, match="boom"), tiny_model.capture_attention():
        raise RuntimeError("boom")
    after = tiny_model.unet.attn_processors
    assert all(after[k] is before[k] for k in before)


# ---- changed-only run folders --------------------------------------------------------------


def test_a_run_model_folder_is_complete_links_its_base_and_holds_the_changed_tensors(tiny_model_dir, tmp_path):
    base_dir = copy_model_dir(tiny_model_dir, tmp_path / "base")
    model = T2IModel.from_pretrained(base_dir)
    base_hash = model_content_hash(base_dir)
    params = model.set_trainable("xattn")
    perturb(params)
    run = tmp_path / "run"
    model.save_pretrained(run, changed_only=True)

    changed = read_safetensors_header(run / CHANGED_UNET_WEIGHTS)
    assert {k for k in changed if k != "__metadata__"} == set(model.param_group("xattn"))
    full = read_safetensors_header(run / UNET_WEIGHTS)
    assert {k for k in full if k != "__metadata__"} == set(model.unet.state_dict())
    # every unchanged file is a hard link to the base's (same data, no disk space), none a symlink
    for part in ("text_encoder/model.safetensors", "tokenizer/tokenizer.json", "unet/config.json",
                 "scheduler/scheduler_config.json", "model_index.json"):
        assert (run / part).stat().st_ino == (base_dir / part).stat().st_ino, part
    assert not [p for p in run.rglob("*") if p.is_symlink()]
    assert not list(run.rglob("*.pt")) and not list(run.rglob("*.bin"))
    meta = json.loads((run / META_FILE).read_text())
    assert meta["base"] == {"path": str(base_dir.resolve()), "hash": base_hash}
    assert sorted(meta["changed_params"]) == sorted(params) and meta["self_contained"] is True
    assert check_model_dir(run)["base"]["hash"] == base_hash
    assert model_content_hash(run) != base_hash

    loaded = T2IModel.from_pretrained(run)
    x, t, cond = probe_inputs(model)
    with torch.no_grad():
        assert torch.equal(loaded.eps(x, t, cond), model.eps(x, t, cond))
        base = T2IModel.from_pretrained(base_dir)
        assert not torch.allclose(base.eps(x, t, cond), model.eps(x, t, cond), atol=1e-4)
    for n, p in model.unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[n], p), n
    assert loaded.meta["base"]["hash"] == base_hash

    # writing a full folder over the run's never writes through a link into the base's files
    loaded.save_pretrained(run)
    assert model_content_hash(base_dir) == base_hash
    # the run's folder stands alone: it loads without its base
    shutil.rmtree(base_dir)
    again = T2IModel.from_pretrained(run)
    assert all(torch.equal(again.unet.state_dict()[n], p) for n, p in model.unet.state_dict().items())


def test_a_run_of_a_run_keeps_the_first_base_and_accumulates_the_changed_tensors(tiny_model_dir, tmp_path):
    model = T2IModel.from_pretrained(tiny_model_dir)
    perturb(model.set_trainable("xattn-kv"))
    model.save_pretrained(tmp_path / "erase", changed_only=True)
    attacked = T2IModel.from_pretrained(tmp_path / "erase")
    perturb(attacked.set_trainable("noxattn"))
    attacked.save_pretrained(tmp_path / "attack", changed_only=True)
    meta = json.loads((tmp_path / "attack" / META_FILE).read_text())
    assert meta["base"]["path"] == str(tiny_model_dir.resolve())
    assert set(meta["changed_params"]) == set(model.param_group("xattn-kv")) | set(model.param_group("noxattn"))
    header = read_safetensors_header(tmp_path / "attack" / CHANGED_UNET_WEIGHTS)
    assert {k for k in header if k != "__metadata__"} == set(meta["changed_params"])


def test_run_folders_of_the_older_changed_tensors_layout_still_load(tiny_model_dir, tmp_path):
    """Older versions wrote only the changed tensors in unet/ and a base reference: such a folder
    loads through its base, and one whose base has gone is reported as such."""
    from safetensors.torch import save_file

    base = copy_model_dir(tiny_model_dir, tmp_path / "base")
    model = T2IModel.from_pretrained(base)
    params = model.set_trainable("xattn-kv")
    perturb(params)
    run = tmp_path / "run"
    (run / "unet").mkdir(parents=True)
    save_file({n: p.detach().contiguous() for n, p in params.items()}, str(run / UNET_WEIGHTS))
    (run / META_FILE).write_text(json.dumps({"base": {"path": str(base), "hash": model_content_hash(base)},
                                             "changed_params": sorted(params)}))
    loaded = T2IModel.from_pretrained(run)
    for n, p in model.unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[n], p), n
    shutil.rmtree(base)
    with pytest.raises(ModelDirError, match="model folder not found"):
        check_model_dir(run)


def test_changed_only_needs_a_base(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="changed_only needs a model loaded from a folder"):
        tiny_model.save_pretrained(tmp_path / "x", changed_only=True)
    assert not (tmp_path / "x" / META_FILE).exists()


# ---- pickles and the content hash ------------------------------------------------------------


def _text_encoder_as_pickle(src, dst):
    """A copy of `src` whose text encoder is given only as pytorch_model.bin (a real state dict)."""
    from safetensors.torch import load_file

    folder = copy_model_dir(src, dst)
    state = load_file(str(folder / "text_encoder" / "model.safetensors"))
    (folder / "text_encoder" / "model.safetensors").unlink()
    torch.save(state, folder / "text_encoder" / "pytorch_model.bin")
    return folder


def test_pickle_weights_need_an_explicit_option(tiny_model_dir, tmp_path):
    folder = _text_encoder_as_pickle(tiny_model_dir, tmp_path / "m")
    with pytest.raises(ModelDirError, match="is a pickle.*--allow-pickle"):
        check_model_dir(folder)
    with pytest.raises(ModelDirError, match="is a pickle"):
        T2IModel.from_pretrained(folder)
    loaded = T2IModel.from_pretrained(folder, allow_pickle=True)
    reference = T2IModel.from_pretrained(tiny_model_dir)
    for name, value in reference.text_encoder.state_dict().items():
        assert torch.equal(loaded.text_encoder.state_dict()[name], value), name


def test_allowed_pickle_is_read_with_weights_only(tiny_model_dir, tmp_path, monkeypatch):
    """Even with --allow-pickle, a pickle that would run code is refused (torch.load(weights_only=True))."""
    folder = copy_model_dir(tiny_model_dir, tmp_path / "m")
    (folder / "text_encoder" / "model.safetensors").unlink()
    (folder / "text_encoder" / "pytorch_model.bin").write_bytes(b"cos\nsystem\n(S'touch pwned'\ntR.")
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelDirError, match="cannot load model folder .*UnpicklingError"):
        T2IModel.from_pretrained(folder, allow_pickle=True)
    assert calls == [True] and not (tmp_path / "pwned").exists()


def test_content_hash_covers_every_weight_file(tiny_model_dir, tmp_path):
    a = _text_encoder_as_pickle(tiny_model_dir, tmp_path / "a")
    b = copy_model_dir(a, tmp_path / "b")
    state = torch.load(b / "text_encoder" / "pytorch_model.bin", weights_only=True)
    name = sorted(state)[0]
    state[name] = state[name] + 1
    torch.save(state, b / "text_encoder" / "pytorch_model.bin")
    assert model_content_hash(a) != model_content_hash(b)
    (b / "notes.md").write_text("not part of the model")
    hash_b = model_content_hash(b)
    (b / "notes.md").write_text("still not")
    assert model_content_hash(b) == hash_b


def test_base_chain_that_loops_is_an_error(tiny_model_dir, tmp_path):
    a, b = copy_model_dir(tiny_model_dir, tmp_path / "a"), copy_model_dir(tiny_model_dir, tmp_path / "b")
    (a / META_FILE).write_text(json.dumps({"base": {"path": str(b), "hash": "x"}}))
    (b / META_FILE).write_text(json.dumps({"base": {"path": "../a", "hash": "x"}}))
    with pytest.raises(ModelDirError, match="loops back"):
        check_model_dir(a)
    (a / META_FILE).write_text(json.dumps({"base": {"path": ".", "hash": "x"}}))
    with pytest.raises(ModelDirError, match="loops back"):
        T2IModel.from_pretrained(a)


def test_load_failures_are_model_dir_errors(tiny_model_dir, tmp_path):
    folder = copy_model_dir(tiny_model_dir, tmp_path / "m")
    config = json.loads((folder / "unet" / "config.json").read_text())
    config["layers_per_block"] = 2  # the weights hold one layer per block
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    check_model_dir(folder)  # nothing a header shows
    with pytest.raises(ModelDirError, match="cannot load model folder"):
        T2IModel.from_pretrained(folder)
