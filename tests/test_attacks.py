"""Attacks on tiny models: the relearning loss, the data protocols, LoRA, erase -> attack."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import TINY_EVAL

import diffunlearn
from diffunlearn.attacks import attacks
from diffunlearn.attacks.base import AttackConfig
from diffunlearn.attacks.relearn import Relearn, RelearnConfig
from diffunlearn.attacks.resurgence import Resurgence, ResurgenceConfig, tercile_groups
from diffunlearn.data import canvas
from diffunlearn.data.tasks import UnlearningTask
from diffunlearn.engine.loop import step_generator
from diffunlearn.metrics.diagnostics import DistanceTracker, text_reach


def small_task(forget=("dotted",)):
    return UnlearningTask.create(list(forget), images_per_prompt=1)


@pytest.mark.parametrize("data", ["retain", "heldout", "generated"])
def test_relearn_data_never_shows_a_forget_concept(tiny_model, one_thread, data):
    task = small_task()
    attack = Relearn(RelearnConfig(data=data, generation_steps=2), tiny_model, task)
    built = attack.prepare()
    assert len(built) == len(task.retain_items()) * task.images_per_prompt  # the size of D_r
    assert "dotted" not in built.concepts()
    assert not any("dotted" in p for p in built.prompts)
    assert built.info["assumption"] == ("i" if data == "retain" else "ii")
    assert built.images.shape[1:] == tiny_model.image_shape and built.images.abs().max() <= 1


def test_relearn_retain_data_is_the_retain_set_and_heldout_is_not(tiny_model):
    task = small_task()
    retain = Relearn(RelearnConfig(data="retain"), tiny_model, task).prepare()
    heldout = Relearn(RelearnConfig(data="heldout"), tiny_model, task).prepare()
    first = task.retain_items()[0]
    first_pair = (first.label("style"), first.label("object"))
    assert torch.equal(retain.images[0], torch.from_numpy(canvas.render(*first_pair, 0).image))
    assert retain.prompts == heldout.prompts
    assert not torch.equal(retain.images, heldout.images)


def test_relearn_loss_is_the_plain_denoising_loss_on_the_chosen_set(tiny_model, one_thread):
    task = small_task()
    attack = Relearn(RelearnConfig(batch_size=3), tiny_model, task)
    data = attack.prepare()
    tiny_model.set_trainable("full")
    logs = attack.step(7, step_generator(0, 7))

    gen = step_generator(0, 7)  # the same draws, by hand
    pick = torch.randint(0, len(data), (3,), generator=gen)
    x0 = data.images[pick]
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, tiny_model.num_train_timesteps, (3,), generator=gen)
    abar = tiny_model.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    with torch.no_grad():
        pred = tiny_model.unet(x_t, t, encoder_hidden_states=tiny_model.encode([data.prompts[int(i)] for i in pick])
                               ).sample
    assert logs["loss"] == pytest.approx(float(((pred - noise) ** 2).mean()), rel=1e-5)


def test_tercile_split_on_a_hand_made_similarity_matrix():
    similarity = {  # candidate -> erased concept -> cosine
        "a": {"x": 0.9, "y": 0.1}, "b": {"x": 0.2, "y": 0.3}, "c": {"x": 0.5, "y": 0.4},
        "d": {"x": 0.0, "y": 0.6}, "e": {"x": 0.8, "y": 0.85}, "f": {"x": 0.1, "y": 0.05},
        "g": {"x": 0.45, "y": 0.7},
    }
    # max over erased: a .9, b .3, c .5, d .6, e .85, f .1, g .7 -> sorted f b c d g e a; 7 = 3 + 2 + 2
    groups, scores = tercile_groups(similarity, "quantile")
    assert scores["a"] == 0.9 and scores["d"] == 0.6
    assert groups == {"low": ["f", "b", "c"], "middle": ["d", "g"], "high": ["e", "a"]}
    # min over erased: a .1, b .2, c .4, d 0, e .8, f .05, g .45; bins of width .8/3 from 0
    groups, scores = tercile_groups(similarity, "equal-width")
    assert groups == {"low": ["d", "f", "a", "b"], "middle": ["c", "g"], "high": ["e"]}


def test_resurgence_protocols_build_the_papers_sets(tiny_model):
    task = small_task()
    random_set = Resurgence(ResurgenceConfig(data="random", concepts=4), tiny_model, task).prepare()
    concepts = random_set.info["concepts"]
    assert len(concepts) == 4 and all(canvas.concept_domain(c) == "style" for c in concepts)
    assert "dotted" not in concepts
    assert len(random_set) == 4 * 5 * 5  # concepts x templates x images per template
    assert random_set.concepts() <= {*concepts, canvas.NEUTRAL_OBJECT}  # each style alone

    ood = Resurgence(ResurgenceConfig(data="out-of-domain", concepts=3), tiny_model, task).prepare()
    assert all(canvas.concept_domain(c) == "object" for c in ood.info["concepts"])
    assert ood.concepts() <= {*ood.info["concepts"], canvas.NEUTRAL_STYLE}

    high = Resurgence(ResurgenceConfig(data="terciles", tercile="high"), tiny_model, task).prepare()
    groups, scores = high.info["groups"], high.info["scores"]
    assert sorted(sum(groups.values(), [])) == sorted(c for c in canvas.STYLES if c != "dotted")
    assert min(scores[c] for c in groups["high"]) >= max(scores[c] for c in groups["low"])
    assert set(high.info["concepts"]) <= set(groups["high"])


def test_lora_leaves_the_base_weights_untouched_until_merged(tiny_model, one_thread):
    from diffunlearn.engine.loop import LoopConfig, run_loop

    task = small_task()
    attack = Resurgence(ResurgenceConfig(mode="lora", lora_rank=2, batch_size=2), tiny_model, task)
    attack.prepare()
    base = {n: p.detach().clone() for n, p in tiny_model.unet.named_parameters()}
    params = attack.trainable()
    assert params and all("lora_" in n for n in params)
    run_loop(params, attack.step, LoopConfig(steps=3, lr=1e-2, progress=False))
    for n, p in tiny_model.unet.named_parameters():
        if "lora_" not in n:  # the base layers, renamed by peft, are unchanged
            assert torch.equal(p, base[n.replace(".base_layer.", ".")]), n
    x = torch.randn(2, *tiny_model.image_shape)
    t = torch.tensor([10, 500])
    cond = tiny_model.encode(["an image of circle in striped style"] * 2)
    with torch.no_grad():
        with_adapter = tiny_model.eps(x, t, cond)
    effective = tiny_model.effective_weights()
    changed = attack.finish()
    assert changed and all(n in base for n in changed)
    assert not any("lora_" in n for n, _ in tiny_model.unet.named_parameters())
    merged = dict(tiny_model.unet.named_parameters())
    assert any(not torch.equal(merged[n], base[n]) for n in changed)
    for n in merged:
        torch.testing.assert_close(merged[n], effective[n])
        if n not in changed:
            assert torch.equal(merged[n], base[n])
    with torch.no_grad():
        torch.testing.assert_close(tiny_model.eps(x, t, cond), with_adapter, rtol=1e-4, atol=1e-5)


def test_distance_tracker_measures_the_way_back():
    original = {"down.attn2.to_k.weight": torch.zeros(2), "down.conv.weight": torch.zeros(3)}
    start = {"down.attn2.to_k.weight": torch.tensor([3.0, 0.0]), "down.conv.weight": torch.tensor([0.0, 4.0, 0.0])}
    tracker = DistanceTracker(original, start, trained=["down.attn2.to_k.weight"])
    at_start = tracker(start)
    assert at_start["dist_full"] == pytest.approx(5.0) and at_start["moved_full"] == 0
    assert at_start["dist_xattn"] == pytest.approx(3.0) and at_start["dist_noxattn"] == pytest.approx(4.0)
    assert at_start["dist_unlearned"] == pytest.approx(5.0)  # both weights differ from the original
    back = tracker({**start, "down.attn2.to_k.weight": torch.zeros(2)})
    assert back["dist_full"] == pytest.approx(4.0) and back["moved_xattn"] == pytest.approx(3.0)
    untouched = DistanceTracker(original, original, trained=["down.conv.weight"])
    away = untouched({**original, "down.conv.weight": torch.ones(3)})
    assert away["dist_unlearned"] == 0 and away["dist_full"] == pytest.approx(3 ** 0.5)


def test_distance_tracker_gives_the_direction_of_travel():
    """toward_g = cos(theta_t - theta_0, theta* - theta_0), worked by hand: the start differs from
    the original by (3, 0) on xattn and (0, 4, 0) on the untrained conv weight."""
    original = {"down.attn2.to_k.weight": torch.zeros(2), "down.conv.weight": torch.zeros(3)}
    start = {"down.attn2.to_k.weight": torch.tensor([3.0, 0.0]), "down.conv.weight": torch.tensor([0.0, 4.0, 0.0])}
    tracker = DistanceTracker(original, start, trained=["down.attn2.to_k.weight"])
    assert tracker(start)["toward_full"] == 0.0  # no move yet: no direction
    back = tracker({**start, "down.attn2.to_k.weight": torch.zeros(2)})
    # step (-3, 0 | 0, 0, 0) against the way back (-3, 0 | 0, -4, 0): 9 / (3 * 5) on the whole UNet
    assert back["toward_xattn"] == pytest.approx(1.0) and back["toward_full"] == pytest.approx(0.6)
    assert back["toward_noxattn"] == 0.0  # nothing of it trained
    sideways = tracker({**start, "down.attn2.to_k.weight": torch.tensor([3.0, 2.0])})
    assert sideways["toward_xattn"] == pytest.approx(0.0)
    away = tracker({**start, "down.attn2.to_k.weight": torch.tensor([6.0, 0.0])})
    assert away["toward_xattn"] == pytest.approx(-1.0) and away["toward_unlearned"] == pytest.approx(-0.6)


def test_text_reach_is_the_share_of_a_concept_inside_the_captions_span():
    """Worked by hand: caption states along e1 (norm 10) and e2 (norm 1) hold 100 and 1 of 101
    units of energy, so at 99% the span is e1 alone (100/101 = 0.9901 already reaches 0.99) and
    at 99.5% it is {e1, e2}. (1, 1, 1) has a third of its energy on e1, two thirds on {e1, e2};
    (0, 0, 2) none of it."""
    states = torch.tensor([[[10.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])  # one caption, two token states
    spread = torch.tensor([[1.0, 1.0, 1.0]])
    assert text_reach(states, spread) == pytest.approx(1 / 3)
    assert text_reach(states, spread, energy=0.995) == pytest.approx(2 / 3)
    both = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 2.0]])
    assert text_reach(states, both, energy=0.995) == pytest.approx((2 / 3 + 0) / 2)
    assert text_reach(states, torch.tensor([[-3.0, 0.0, 0.0]])) == pytest.approx(1.0)  # sign does not matter


def test_every_attack_config_validates_and_has_both_profiles():
    for name in attacks.names():
        cls = attacks.get(name)
        assert issubclass(cls.Config, AttackConfig)
        for profile in ("paper", "testbed"):
            cls.Config(**cls.profiles[profile])


def test_resurgence_paper_profile_fine_tunes_with_lora(tiny_model_dir):
    from diffunlearn.runs.resolve import resolve_attack

    # [000] §4.3: LoRA is the primary fine-tuning algorithm at Stable Diffusion scale
    resolved = resolve_attack("resurgence", tiny_model_dir, forget=["dotted"], overrides=["attack.profile=paper"])
    assert resolved.profile == "paper"
    assert resolved.attack_config.mode == "lora" and resolved.attack_config.lora_rank == 4


def test_erase_then_attack_end_to_end(tiny_model_dir, tiny_evaluator_dir, tmp_path, one_thread):
    erase_out = tmp_path / "erase"
    erase_overrides = ["method.epochs=null", "method.steps=2", "method.batch_size=2", "task.images_per_prompt=1",
                       f"eval.evaluator=canvas:{tiny_evaluator_dir}", *TINY_EVAL]
    erased = diffunlearn.erase("core", ["dotted"], model=tiny_model_dir, out=erase_out, overrides=erase_overrides,
                               progress=False)
    assert (erase_out / "diagnostics.csv").exists()  # distance per group over the unlearning

    overrides = ["attack.steps=4", "attack.eval_every=2", "attack.batch_size=2", "attack.checkpoint_every=2",
                 f"eval.evaluator=canvas:{tiny_evaluator_dir}", *TINY_EVAL]
    run = diffunlearn.attack("relearn", erase_out, overrides=overrides, progress=False)
    out = erase_out / "attacks" / f"relearn-{run.run_id}"
    assert run.out == out
    for name in ("config.yaml", "run.json", "metrics.json", "curves.csv", "attack_curve.csv", "data.json",
                 "samples.png", "model/diffunlearn.json"):
        assert (out / name).exists(), name
    assert not (out / "checkpoint").exists()  # removed once the final model is written
    metrics = json.loads((out / "metrics.json").read_text())
    assert [row["step"] for row in metrics["curve"]] == [0, 2, 4]
    summary = metrics["summary"]
    assert summary["AR_DiMRA_top1"] == max(r["AR_MU_top1"] for r in metrics["curve"][1:])
    assert summary["AR_CL_min"] == min(r["AR_CL"] for r in metrics["curve"][1:])  # CORE has anchors
    assert summary["forget_acc_after"] == metrics["curve"][-1]["AR_MU_top1"] == metrics["after"]["AR_MU_top1"]
    assert summary["distance_to_original_before"] > 0  # the erase moved the weights
    assert 0 <= summary["text_reach"] <= 1 and metrics["data"]["text_reach"] == summary["text_reach"]
    assert metrics["before"]["UA"] == pytest.approx(erased.metrics["after"]["UA"])  # same model, same seeds
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["task"]["forget"] == ["dotted"] and config["task"]["images_per_prompt"] == 1

    # the attacked model loads like any run, and attacking it again chains
    again = diffunlearn.attack("resurgence", out, overrides=[*overrides, "attack.mode=lora", "attack.concepts=2",
                                                             "attack.images_per_prompt=1"], progress=False)
    assert again.metrics["summary"]["steps"] == 4
    assert diffunlearn.attack("relearn", erase_out, overrides=overrides, progress=False).skipped


def test_attack_on_the_original_model_needs_forget(tiny_model_dir, tiny_evaluator_dir, tmp_path, one_thread):
    from diffunlearn.data.tasks import TaskError

    overrides = ["attack.steps=2", "attack.batch_size=2", f"eval.evaluator=canvas:{tiny_evaluator_dir}", *TINY_EVAL,
                 "task.images_per_prompt=1"]
    with pytest.raises(TaskError, match="--forget"):
        diffunlearn.attack("relearn", tiny_model_dir, out=tmp_path / "x", overrides=overrides, progress=False)
    assert not (tmp_path / "x").exists()
    run = diffunlearn.attack("relearn", tiny_model_dir, ["circle"], out=tmp_path / "control",
                             overrides=[*overrides, "attack.data=generated", "attack.generation_steps=2"],
                             progress=False)
    assert run.metrics["summary"]["distance_to_original_before"] == 0  # the original is its own reference
    assert run.metrics["summary"]["moved"] > 0
    assert run.metrics["alternatives"] is None


def test_attack_summary_reads_its_figures_off_the_curve():
    """AR_MU is the first point, AR_DiMRA the largest after step 0 (and its step), the distances
    per group before/after, the share travelled back and the final direction of travel."""
    from diffunlearn.runs.attack import attack_summary

    def row(step, top1, top3, dist, toward):
        return {"step": step, "AR_MU_top1": top1, "AR_MU_top3": top3, "dist_unlearned": dist, "dist_full": dist,
                "moved_full": 4.0 - dist, "dist_xattn": dist / 2, "toward_unlearned": toward}

    rows = [row(0, 5.0, 20.0, 4.0, 0.0), row(50, 30.0, 60.0, 3.0, 0.5), row(100, 10.0, 70.0, 1.0, 0.9)]
    s = attack_summary([{**r, "forget_images": 20} for r in rows])
    assert s["forget_images"] == 20 and s["AR_resolution"] == 5.0  # one of 20 generations = 5 points
    assert (s["AR_MU_top1"], s["AR_DiMRA_top1"], s["AR_DiMRA_top1_step"]) == (5.0, 30.0, 50)
    assert (s["AR_DiMRA_top3"], s["AR_DiMRA_top3_step"], s["AR_final_top1"]) == (70.0, 100, 10.0)
    assert s["travelled_back"] == 3.0 and s["travelled_back_fraction"] == pytest.approx(0.75)
    assert (s["dist_xattn_before"], s["dist_xattn_after"], s["toward_unlearned"]) == (2.0, 0.5, 0.9)
    assert "toward_xattn" not in s  # a group the curve does not hold is left out, not invented
