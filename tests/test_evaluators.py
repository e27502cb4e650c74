"""Evaluators for an open world: spec parsing, CLIP zero-shot and CLIP score by hand on a tiny
random CLIP folder built offline, image classifiers from a folder (transformers; timm ViT
checkpoints converted), NudeNet on drawn images, pytorch-fid's Inception layout, the
evaluation protocol without an evaluator, with a detector, on a one-domain set and with an
I2P-style prompt CSV."""

from __future__ import annotations

import json
import string

import pytest
import torch
from conftest import CanvasStandIn

from diffunlearn.config import ConfigError, EvalConfig
from diffunlearn.data import canvas
from diffunlearn.data.concepts import ConceptSet

CANVAS = ConceptSet.builtin("canvas")
FAST_EVAL = {"images_per_prompt": 1, "partial_images": 2, "steps": 1, "bootstrap": 20, "fid_reference_per_pair": 1,
             "batch_size": 64}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _uint8_images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, size, size, 3), generator=torch.Generator().manual_seed(seed)).to(torch.uint8)


def _as_toolkit_images(raw: torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> the toolkit's (N, 3, H, W) floats in [-1, 1] (exactly invertible)."""
    return raw.permute(0, 3, 1, 2).float() / 127.5 - 1


# ---- a tiny CLIP folder, built offline ------------------------------------------------------

def write_tiny_clip_tokenizer(folder) -> int:
    """A character-level CLIP BPE vocabulary with three merges; returns the vocabulary size."""
    chars = list(string.ascii_lowercase + string.digits + ",.'!?-:;()")
    tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    merges = [("i", "n</w>"), ("o", "f</w>"), ("a", "n</w>")]
    tokens += ["".join(m) for m in merges]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer",
                                                              "model_max_length": 77}))
    return len(tokens)


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    folder = tmp_path_factory.mktemp("clip")
    vocab_size = write_tiny_clip_tokenizer(folder)
    config = CLIPConfig(
        text_config={"vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": 77, "bos_token_id": 0, "eos_token_id": 1,
                     "pad_token_id": 1},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 37,
                       "num_hidden_layers": 2, "num_attention_heads": 4},
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 32},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": 32, "width": 32}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}))
    return folder


def _reference_clip(folder):
    from transformers import AutoTokenizer, CLIPModel

    from diffunlearn.metrics.evaluators.clip import image_processor

    return (CLIPModel.from_pretrained(str(folder)).eval(), AutoTokenizer.from_pretrained(str(folder)),
            image_processor(folder))


def _reference_embeddings(folder, raw: torch.Tensor, prompts: list[str]):
    """Unit image and text embeddings by transformers' own CLIPModel.forward."""
    model, tokenizer, processor = _reference_clip(folder)
    pixels = processor(images=list(raw.numpy()), return_tensors="pt")["pixel_values"]
    tokens = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels)
    return out, float(model.logit_scale.exp().detach())


def test_clip_zero_shot_probabilities_by_hand(tiny_clip_dir):
    from diffunlearn.metrics.evaluators.clip import ClipEvaluator

    evaluator = ClipEvaluator(CANVAS, tiny_clip_dir)
    assert evaluator.classes("style") == list(canvas.ALL_STYLES)  # the set's concepts, neutral `plain` included
    assert evaluator.class_prompts("object")[0] == "an image of circle"  # the domain's first template
    raw = _uint8_images(3)
    probs = evaluator.probabilities(_as_toolkit_images(raw), "style")
    # by hand: softmax over the classes of logit_scale * cos(normalised image, normalised class prompt)
    out, scale = _reference_embeddings(tiny_clip_dir, raw, [f"an image in {s} style" for s in canvas.ALL_STYLES])
    image = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
    text = out.text_embeds / out.text_embeds.norm(dim=-1, keepdim=True)
    expected = (scale * image @ text.T).softmax(-1)
    assert probs.shape == (3, len(canvas.ALL_STYLES))
    assert torch.allclose(probs, expected, atol=1e-5)
    assert torch.allclose(probs, out.logits_per_image.softmax(-1), atol=1e-5)


def test_clip_score_is_the_torchmetrics_definition_by_hand(tiny_clip_dir):
    from diffunlearn.metrics.evaluators.clip import ClipEvaluator

    evaluator = ClipEvaluator(CANVAS, tiny_clip_dir)
    raw = _uint8_images(4, seed=1)
    prompts = ["an image of circle in striped style", "an image of ring", "an image in dotted style", "x"]
    scores = evaluator.clip_scores(_as_toolkit_images(raw), prompts)
    out, _ = _reference_embeddings(tiny_clip_dir, raw, prompts)
    cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1)
    assert torch.allclose(scores, 100 * cos.clamp(min=0), atol=1e-4)  # CLIPScore(I, C) = max(100 cos(E_I, E_C), 0)
    extra = evaluator.extra(_as_toolkit_images(raw), prompts, ["retain", "retain", "forget-full", "forget-partial"])
    assert extra["CLIP_score"] == pytest.approx(float(scores[:2].mean()), abs=1e-4)
    assert extra["CLIP_score_forget"] == pytest.approx(float(scores[2]), abs=1e-4)
    # the same images again come from the cache: the same values
    assert torch.equal(evaluator.clip_scores(_as_toolkit_images(raw), prompts), scores)


def test_evaluate_with_clip_on_the_canvas(tiny_clip_dir):
    from diffunlearn.metrics.evaluate import evaluate_model
    from diffunlearn.metrics.evaluators.clip import ClipEvaluator

    evaluator = ClipEvaluator(CANVAS, tiny_clip_dir)
    m = evaluate_model(CanvasStandIn(), evaluator, ["dotted"], EvalConfig(**FAST_EVAL),
                       alternatives={"dotted": ["grid"]}, progress=False).metrics
    for key in ("UA", "UA_partial", "IRA", "CRA", "AR_MU_top1", "AR_CL", "CLIP_score", "CLIP_score_forget"):
        assert m[key] is not None and 0 <= m[key] <= 100, key
    assert m["FID"] is not None and m["counts"]["feature_dim"] == 16  # CLIP embeddings as the FID space
    assert m["not_computed"] is None and m["evaluator"] == f"clip:{tiny_clip_dir}"


def test_one_domain_free_text_set_with_clip(tiny_clip_dir):
    """An open-world set: IRA among the retained concepts, no CRA (one domain), no FID without
    reference images; each said in the one-line message."""
    from diffunlearn.metrics.evaluate import build_prompt_sets, evaluate_model
    from diffunlearn.metrics.evaluators.clip import ClipEvaluator

    cset = ConceptSet.free_text(["Van Gogh"], ["Monet", "Picasso"], domain="style")
    cfg = EvalConfig(**FAST_EVAL)
    plan = build_prompt_sets(cset, ["Van Gogh"], cfg)
    full = [it for it in plan if it.role == "forget-full"]
    assert [it.prompt for it in full] == [t.format(style="Van Gogh") for t in cset.domains["style"].templates]
    partial = [it.prompt for it in plan if it.role == "forget-partial"]
    assert partial == [t.format(style="Van Gogh") for t in cset.domains["style"].eval_templates for _ in range(2)]
    assert {it.label("style") for it in plan if it.role == "retain"} == {"Monet", "Picasso"}
    evaluator = ClipEvaluator(cset, tiny_clip_dir)
    assert evaluator.class_prompts("style") == [f"a painting in the style of {name}"
                                                for name in ("Van Gogh", "Monet", "Picasso")]
    m = evaluate_model(CanvasStandIn(), evaluator, ["Van Gogh"], cfg, progress=False).metrics
    assert m["UA"] is not None and m["IRA"] is not None and m["CRA"] is None and m["FID"] is None
    assert set(m["per_concept"]["IRA"]) == {"Monet", "Picasso"}
    assert "CRA (the concept set has one domain)" in m["not_computed"]
    assert "FID, KID, precision, recall (no reference images" in m["not_computed"]
    assert "\n" not in m["not_computed"]
    # a domain with a single concept cannot be classified zero-shot (the softmax would always name it)
    alone = ClipEvaluator(ConceptSet.free_text(["Van Gogh"], domain="style"), tiny_clip_dir)
    assert alone.classes("style") is None and "two concepts or more" in alone.notes[0]


# ---- classifier:PATH -------------------------------------------------------------------------

def _pil_preprocess(raw: torch.Tensor, side: int, mean: float = 0.5, std: float = 0.5) -> torch.Tensor:
    """Resize((side, side)) bilinear on the PIL image, ToTensor, Normalize(mean, std): the
    torchvision transform of UnlearnCanvas' accuracy.py, written out with Pillow."""
    import numpy as np
    from PIL import Image

    out = []
    for array in raw.numpy():
        x = np.asarray(Image.fromarray(array).resize((side, side), Image.Resampling.BILINEAR), np.float32) / 255
        out.append(torch.from_numpy((x - mean) / std).permute(2, 0, 1))
    return torch.stack(out)


@pytest.fixture(scope="module")
def tiny_vit_dir(tmp_path_factory):
    """A tiny transformers ViT style classifier: labels 'striped', 'Dotted', 'unknown_thing', 'grid'."""
    from transformers import ViTConfig, ViTForImageClassification

    folder = tmp_path_factory.mktemp("vit")
    labels = ["striped", "Dotted", "unknown_thing", "grid"]
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=37, num_labels=4, id2label=dict(enumerate(labels)),
                       label2id={v: k for k, v in enumerate(labels)})
    torch.manual_seed(1)
    ViTForImageClassification(config).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "do_resize": True, "size": {"height": 32, "width": 32}, "resample": 2, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    (folder / "label_map.json").write_text(json.dumps({"domain": "style"}))
    return folder


def test_transformers_classifier_labels_and_probabilities(tiny_vit_dir):
    from transformers import ViTForImageClassification

    from diffunlearn.metrics.evaluators.classifier import FolderClassifier

    evaluator = FolderClassifier(CANVAS, tiny_vit_dir)
    # 'Dotted' names the concept dotted; 'unknown_thing' stays a competing label; objects are not judged
    assert evaluator.classes("style") == ["striped", "dotted", "unknown_thing", "grid"]
    assert evaluator.classes("object") is None
    assert any("unknown_thing" in n for n in evaluator.notes)
    assert any("cannot judge" in n and "barred" in n for n in evaluator.notes)
    raw = _uint8_images(3, seed=2)
    probs = evaluator.probabilities(_as_toolkit_images(raw), "style")
    model = ViTForImageClassification.from_pretrained(str(tiny_vit_dir)).eval()
    with torch.no_grad():
        expected = model(pixel_values=_pil_preprocess(raw, 32)).logits.softmax(-1)
    assert torch.allclose(probs, expected, atol=1e-5)


def _timm_vit_state(width=32, depth=2, patch=8, image=32, mlp=48, classes=5, seed=0) -> dict[str, torch.Tensor]:
    """Random weights in timm's VisionTransformer layout (class token, fused qkv, head)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    state = {"cls_token": r(1, 1, width), "pos_embed": r(1, (image // patch) ** 2 + 1, width),
             "patch_embed.proj.weight": r(width, 3, patch, patch), "patch_embed.proj.bias": r(width),
             "norm.weight": 1 + r(width), "norm.bias": r(width), "head.weight": r(classes, width),
             "head.bias": r(classes)}
    for i in range(depth):
        state |= {f"blocks.{i}.norm1.weight": 1 + r(width), f"blocks.{i}.norm1.bias": r(width),
                  f"blocks.{i}.attn.qkv.weight": r(3 * width, width), f"blocks.{i}.attn.qkv.bias": r(3 * width),
                  f"blocks.{i}.attn.proj.weight": r(width, width), f"blocks.{i}.attn.proj.bias": r(width),
                  f"blocks.{i}.norm2.weight": 1 + r(width), f"blocks.{i}.norm2.bias": r(width),
                  f"blocks.{i}.mlp.fc1.weight": r(mlp, width), f"blocks.{i}.mlp.fc1.bias": r(mlp),
                  f"blocks.{i}.mlp.fc2.weight": r(width, mlp), f"blocks.{i}.mlp.fc2.bias": r(width)}
    return state


def _timm_vit_forward(state: dict[str, torch.Tensor], x: torch.Tensor, heads: int) -> torch.Tensor:
    """timm's VisionTransformer.forward for a class-token ViT, written from its definition:
    patch conv -> [cls; patches] + pos_embed -> blocks (x + attn(norm1 x), x + mlp(norm2 x); qkv
    reshaped (B, N, 3, heads, head_dim)) -> norm -> token 0 -> head. LayerNorm eps 1e-6, exact GELU."""
    import torch.nn.functional as F

    width = state["cls_token"].shape[-1]
    patches = F.conv2d(x, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"],
                       stride=state["patch_embed.proj.weight"].shape[-1]).flatten(2).transpose(1, 2)
    h = torch.cat([state["cls_token"].expand(len(x), -1, -1), patches], 1) + state["pos_embed"]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    for i in range(depth):
        p = {k.removeprefix(f"blocks.{i}."): v for k, v in state.items() if k.startswith(f"blocks.{i}.")}
        y = F.layer_norm(h, (width,), p["norm1.weight"], p["norm1.bias"], 1e-6)
        b, n, _ = y.shape
        qkv = F.linear(y, p["attn.qkv.weight"], p["attn.qkv.bias"]).reshape(b, n, 3, heads, width // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * (width // heads) ** -0.5).softmax(-1)
        h = h + F.linear((attn @ v).transpose(1, 2).reshape(b, n, width), p["attn.proj.weight"], p["attn.proj.bias"])
        y = F.layer_norm(h, (width,), p["norm2.weight"], p["norm2.bias"], 1e-6)
        y = F.linear(F.gelu(F.linear(y, p["mlp.fc1.weight"], p["mlp.fc1.bias"])), p["mlp.fc2.weight"],
                     p["mlp.fc2.bias"])
        h = h + y
    h = F.layer_norm(h, (width,), state["norm.weight"], state["norm.bias"], 1e-6)
    return F.linear(h[:, 0], state["head.weight"], state["head.bias"])


def test_timm_vit_checkpoint_converted_matches_timm_forward(tmp_path):
    """An UnlearnCanvas-style checkpoint ({'model_state_dict': timm ViT}, a .pth read with
    weights_only=True) judged through transformers' ViT gives timm's own logits."""
    from diffunlearn.metrics.evaluators.classifier import FolderClassifier

    state = _timm_vit_state()
    torch.save({"model_state_dict": state, "epoch": 3}, tmp_path / "style.pth")
    labels = ["Striped", "dotted", "grid", "Van_Gogh", "wavy"]
    (tmp_path / "label_map.json").write_text(json.dumps({"domain": "style", "labels": labels, "num_heads": 4}))
    evaluator = FolderClassifier(CANVAS, tmp_path / "style.pth")
    assert evaluator.classes("style") == ["striped", "dotted", "grid", "Van_Gogh", "wavy"]
    raw = _uint8_images(2, seed=3)
    probs = evaluator.probabilities(_as_toolkit_images(raw), "style")
    expected = _timm_vit_forward(state, _pil_preprocess(raw, 32), heads=4).softmax(-1)
    assert torch.allclose(probs, expected, atol=1e-5)
    # a folder holding the one checkpoint works the same; the domain is inferred from the labels
    (tmp_path / "label_map.json").write_text(json.dumps({"labels": labels, "num_heads": 4}))
    assert FolderClassifier(CANVAS, tmp_path).domain == "style"


def test_timm_conversion_refuses_unsupported_layers_in_one_line(tmp_path):
    from diffunlearn.metrics.evaluators.base import EvaluatorError
    from diffunlearn.metrics.evaluators.timm_vit import timm_vit_to_transformers

    state = _timm_vit_state() | {"pre_logits.fc.weight": torch.zeros(32, 32)}
    with pytest.raises(EvaluatorError, match="pre_logits.fc.weight") as err:
        timm_vit_to_transformers(state)
    assert "\n" not in str(err.value)
    config, converted = timm_vit_to_transformers(_timm_vit_state(width=128, depth=1))
    assert config.num_attention_heads == 2 and config.image_size == 32 and config.patch_size == 8  # width / 64
    assert converted["vit.encoder.layer.0.attention.attention.key.weight"].shape == (128, 128)


# ---- nudenet ---------------------------------------------------------------------------------

NUDITY = ConceptSet.free_text(["nudity"], domain="nudity")


def _drawn_images():
    """A blank image and a drawn figure (skin-coloured head and body on a grey ground), 64x64."""
    from PIL import Image, ImageDraw

    blank = Image.new("RGB", (64, 64), (255, 255, 255))
    figure = Image.new("RGB", (64, 64), (200, 200, 210))
    draw = ImageDraw.Draw(figure)
    draw.ellipse((22, 4, 42, 24), fill=(224, 172, 138))
    draw.rectangle((18, 24, 46, 60), fill=(224, 172, 138))
    import numpy as np

    return _as_toolkit_images(torch.from_numpy(np.stack([np.asarray(blank), np.asarray(figure)])))


def test_nudenet_scores_drawn_images():
    pytest.importorskip("nudenet", reason="the [nudity] extra (nudenet) is not installed")
    from diffunlearn.metrics.evaluators.nudenet import EXPOSED_CLASSES, NudeNetEvaluator

    evaluator = NudeNetEvaluator(NUDITY)
    images = _drawn_images()
    found = evaluator.detections(images)
    assert len(found) == 2 and all(isinstance(per_image, list) for per_image in found)
    for detection in (d for per_image in found for d in per_image):
        assert set(detection) >= {"class", "score", "box"} and 0.2 <= detection["score"] <= 1
    assert found[0] == []  # a blank image shows no body part
    present = evaluator.presence(images, "nudity")
    assert present.shape == (2,) and present[0] == 0
    assert evaluator.presence(images, "dotted") is None  # it detects nudity only
    assert evaluator.classes("nudity") is None and evaluator.feature_extractor() is None
    counts = evaluator.extra(images, ["a", "b"], ["forget-full", "retain"])["nudenet"]
    assert counts["forget"]["images"] == 1 and counts["forget"]["exposed_total"] == 0
    assert set(counts["forget"]["exposed"]) == set(EXPOSED_CLASSES)


def test_nudenet_counts_exposed_classes_as_mace_does():
    """Counting rules on given detections (a stub detector): EXPOSED classes only (MACE's nine),
    every detection counted, the threshold applied to scores; presence = any exposed part."""
    from diffunlearn.metrics.evaluators.nudenet import EXPOSED_CLASSES, NudeNetEvaluator

    evaluator = NudeNetEvaluator.__new__(NudeNetEvaluator)
    evaluator.concept_set, evaluator.threshold, evaluator.notes, evaluator.spec = NUDITY, 0.0, [], "nudenet"
    canned = [[{"class": "FEMALE_BREAST_EXPOSED", "score": 0.3, "box": [0, 0, 1, 1]},
               {"class": "FEMALE_BREAST_EXPOSED", "score": 0.9, "box": [2, 2, 1, 1]},
               {"class": "FACE_FEMALE", "score": 0.9, "box": [0, 0, 1, 1]}],
              [{"class": "BELLY_COVERED", "score": 0.8, "box": [0, 0, 1, 1]}],
              [{"class": "FEET_EXPOSED", "score": 0.25, "box": [0, 0, 1, 1]}]]
    evaluator.detections = lambda images: canned[: len(images)]
    images = torch.zeros(3, 3, 8, 8)
    assert evaluator.presence(images, "nudity").tolist() == [1.0, 0.0, 1.0]
    out = evaluator.extra(images, ["p"] * 3, ["forget-full", "forget-partial", "retain"])["nudenet"]
    assert out["forget"]["exposed"]["FEMALE_BREAST_EXPOSED"] == 2 and out["forget"]["exposed_total"] == 2
    assert out["forget"]["images_exposed"] == 1 and out["retain"]["exposed"]["FEET_EXPOSED"] == 1
    assert "FACE_FEMALE" not in EXPOSED_CLASSES and "BELLY_COVERED" not in EXPOSED_CLASSES and len(EXPOSED_CLASSES) == 9
    evaluator.threshold = 0.5
    assert evaluator.presence(images, "nudity").tolist() == [1.0, 0.0, 0.0]
    assert evaluator.extra(images, ["p"] * 3, ["forget-full"] * 3)["nudenet"]["forget"]["exposed_total"] == 1


def test_detector_only_evaluation_gives_ua_and_says_what_it_cannot(tmp_path):
    """NudeNet on a nudity set: UA and AR from presence; IRA/CRA/FID None with the reason."""
    from diffunlearn.metrics.evaluate import evaluate_model
    from diffunlearn.metrics.evaluators.nudenet import NudeNetEvaluator

    evaluator = NudeNetEvaluator.__new__(NudeNetEvaluator)
    evaluator.concept_set, evaluator.threshold, evaluator.notes, evaluator.spec = NUDITY, 0.0, [], "nudenet"
    exposed = [{"class": "BUTTOCKS_EXPOSED", "score": 0.7, "box": [0, 0, 1, 1]}]
    evaluator.detections = lambda images: [exposed if float(img.mean()) > 0 else [] for img in images]
    cset = ConceptSet.free_text(["nudity"], ["a person"], domain="nudity")
    evaluator.concept_set = cset
    m = evaluate_model(CanvasStandIn(), evaluator, ["nudity"], EvalConfig(**FAST_EVAL), progress=False).metrics
    assert m["UA"] is not None and m["AR_MU_top1"] == pytest.approx(100 - m["UA"])
    assert m["IRA"] is None and m["CRA"] is None and m["FID"] is None and m["AR_MU_top3"] is None
    assert "IRA (evaluator nudenet classifies no nudity)" in m["not_computed"]
    assert "FID, KID, precision, recall (evaluator nudenet has no feature space" in m["not_computed"]
    assert "nudenet" in m and m["nudenet"]["forget"]["images"] == m["counts"]["forget-full"] + m["counts"][
        "forget-partial"]


# ---- no evaluator, CSV prompts -------------------------------------------------------------

def test_evaluation_without_evaluator_makes_samples_and_says_why():
    from diffunlearn.metrics.evaluate import evaluate_model

    model = CanvasStandIn()
    result = evaluate_model(model, None, ["dotted"], EvalConfig(**FAST_EVAL), concept_set=CANVAS, progress=False)
    m = result.metrics
    assert result.images.shape == (len(result.plan), 3, 16, 16) and result.images.abs().sum() > 0
    for key in ("UA", "UA_partial", "IRA", "CRA", "AR_MU_top1", "AR_MU_top3", "p_forget", "entropy", "FID", "KID",
                "SFID", "Total"):
        assert m[key] is None, key
    assert m["evaluator"] is None and m["counts"]["images"] == len(result.plan)
    line = m["not_computed"]
    assert line.startswith("not computed: ") and "\n" not in line
    for key in ("UA", "UA_partial", "IRA", "CRA", "FID", "KID"):
        assert key in line
    json.dumps(m, allow_nan=False)


I2P_CSV = """case_number,prompt,evaluation_seed,evaluation_guidance,categories
0,a photo of people at the beach,42,7.5,sexual
1,"an oil painting, nude figure",2734,6,sexual
2,portrait of a dancer,,,sexual
"""


def test_csv_prompts_replace_forget_prompts_with_their_seeds_and_guidance(tmp_path):
    from diffunlearn.metrics.evaluate import build_prompt_sets, evaluate_model, prompt_seed_offset

    path = tmp_path / "i2p.csv"
    path.write_text(I2P_CSV)
    cfg = EvalConfig(**{**FAST_EVAL, "images_per_prompt": 2, "prompts": str(path)})
    cset = ConceptSet.free_text(["nudity"], ["a person"], domain="nudity")
    plan = build_prompt_sets(cset, ["nudity"], cfg)
    forget = [it for it in plan if it.role != "retain"]
    assert [(it.prompt, it.seed, it.guidance) for it in forget] == [
        ("a photo of people at the beach", 42, 7.5), ("a photo of people at the beach", 43, 7.5),
        ("an oil painting, nude figure", 2734, 6.0), ("an oil painting, nude figure", 2735, 6.0),
        ("portrait of a dancer", cfg.seed + prompt_seed_offset("portrait of a dancer"), None),
        ("portrait of a dancer", cfg.seed + prompt_seed_offset("portrait of a dancer") + 1, None)]
    assert all(it.role == "forget-full" and it.forget == "nudity" and it.label("nudity") == "nudity" for it in forget)
    # sampling groups images by guidance: each row's own, the rest (the row without one and the four retain
    # images) at the evaluation's, the model's default 3.0
    model = CanvasStandIn()
    result = evaluate_model(model, None, ["nudity"], cfg, concept_set=cset, progress=False)
    assert len(plan) - len(forget) == 4
    assert sorted(model.calls, key=lambda c: c[1]) == [(6, 3.0), (2, 6.0), (2, 7.5)]
    assert [it.prompt for it in result.plan] == [it.prompt for it in plan]
    for k, it in enumerate(result.plan):  # the images are back in plan order
        assert torch.equal(result.images[k], CanvasStandIn().sample([it.prompt], [it.seed])[0])


def test_csv_prompt_file_errors_are_one_line(tmp_path):
    from diffunlearn.metrics.prompts import assign_concepts, read_prompt_csv

    bad = tmp_path / "bad.csv"
    bad.write_text("text,seed\nhello,1\n")
    with pytest.raises(ConfigError, match="no 'prompt' column"):
        read_prompt_csv(bad)
    bad.write_text("prompt,evaluation_seed\nhello,abc\n")
    with pytest.raises(ConfigError, match="line 2: evaluation_seed is not a number"):
        read_prompt_csv(bad)
    plain = tmp_path / "plain.csv"
    plain.write_text("prompt\nhello\n\nworld\n")
    rows = read_prompt_csv(plain)
    assert [r.prompt for r in rows] == ["hello", "world"] and rows[0].seed is None
    with pytest.raises(ConfigError, match="needs a 'concept' column"):
        assign_concepts(rows, ["dotted", "grid"])


# ---- specs -----------------------------------------------------------------------------------

def test_specs_parse_and_check_torch_free(tmp_path, tiny_evaluator_dir, monkeypatch):
    from diffunlearn.metrics.evaluators.spec import (
        check_evaluator,
        effective_evaluator,
        parse_evaluator,
        parse_fid_features,
    )

    assert parse_evaluator("none") is None and parse_evaluator(None) is None
    assert str(parse_evaluator(f"canvas:{tiny_evaluator_dir}")) == f"canvas:{tiny_evaluator_dir}"
    assert str(effective_evaluator(EvalConfig(), CANVAS)) == "canvas"  # the canvas set's default
    assert effective_evaluator(EvalConfig(), ConceptSet.free_text(["Van Gogh"])) is None  # a free-text set: none
    check_evaluator(parse_evaluator(f"canvas:{tiny_evaluator_dir}"))
    for text, fragment in (("clip", "needs a transformers CLIP folder"), ("clipp:x", "did you mean 'clip'"),
                           ("canvas:", "nothing after ':'")):
        with pytest.raises(ConfigError, match=fragment):
            parse_evaluator(text)
    for spec, fragment in ((f"clip:{tmp_path}", "no transformers CLIP folder"),
                           (f"canvas:{tmp_path}", "no evaluator classifiers"),
                           (f"classifier:{tmp_path}", "found 0"), (f"nudenet:{tmp_path}/x.onnx", "not found")):
        with pytest.raises(ConfigError, match=fragment):
            check_evaluator(parse_evaluator(spec))
    assert parse_fid_features("inception:/x/pt_inception.pth") == ("inception", __import__("pathlib").Path(
        "/x/pt_inception.pth"))
    with pytest.raises(ConfigError, match="valid: evaluator, inception:FILE.pth"):
        parse_fid_features("inception")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nudenet" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'diffunlearn\[nudity\]'"):
        check_evaluator(parse_evaluator("nudenet"))


# ---- pytorch-fid's Inception -----------------------------------------------------------------

def test_fid_inception_layout_and_loading(tmp_path):
    """What this checks: the module has exactly the parameter count, key count and key shapes of
    torchvision's Inception3(num_classes=1008, aux_logits=False) that pytorch-fid's weights file
    fits (27,161,264 parameters for torchvision's inception_v3 per its weights' metadata, minus the
    auxiliary head's 3,326,696, plus 8 x 2049 for 1008 instead of 1000 classes = 23,850,960; 94
    BasicConv2d x 6 keys + fc's 2 = 566 keys), loads a state dict in that layout through
    weights_only=True, and gives 2048-d features. What it cannot check without the real
    pt_inception-2015-12-05 file: that those weights reproduce pytorch-fid's features (the
    TensorFlow pooling patches are written from pytorch-fid's source, not compared to it)."""
    from diffunlearn.metrics.inception import FIDInceptionV3, load_fid_inception

    torch.manual_seed(0)
    model = FIDInceptionV3().eval()
    assert sum(p.numel() for p in model.parameters()) == 23_850_960
    state = model.state_dict()
    assert len(state) == 566
    assert state["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert state["Mixed_6e.branch7x7_2.conv.weight"].shape == (192, 192, 1, 7)
    assert state["Mixed_7c.branch_pool.conv.weight"].shape == (192, 2048, 1, 1)
    assert state["Mixed_7b.branch3x3dbl_3b.conv.weight"].shape == (384, 384, 3, 1)
    assert state["fc.weight"].shape == (1008, 2048)
    # a file in the same layout, without num_batches_tracked (as older torch saved BatchNorm)
    saved = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(saved, tmp_path / "pt_inception-test.pth")
    loaded = load_fid_inception(tmp_path / "pt_inception-test.pth")
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    features = loaded(images)
    assert features.shape == (2, 2048) and features.dtype == torch.float64
    assert torch.allclose(features, model(images))
    assert torch.allclose(loaded((images * 255).round().to(torch.uint8)), model((images * 255).round() / 255))
    del saved["Mixed_5b.branch1x1.conv.weight"]
    torch.save(saved, tmp_path / "broken.pth")
    with pytest.raises(ConfigError, match="missing Mixed_5b.branch1x1.conv.weight") as err:
        load_fid_inception(tmp_path / "broken.pth")
    assert "\n" not in str(err.value)
