"""The CE/IR term framework (objectives.py) on a tiny seeded model."""

from __future__ import annotations

import torch

from diffunlearn.data import canvas
from diffunlearn.data.tasks import UnlearningTask
from diffunlearn.engine.loop import step_generator
from diffunlearn.objectives import Term, compute_loss, draw_batch, term_losses


def _setup(tiny_model, group="xattn"):
    task = UnlearningTask.create(["dotted"], images_per_prompt=2)
    tiny_model.set_trainable(group)
    return task


def test_esd_target_equals_the_official_codes_form_with_g_eta_plus_one(tiny_model):
    task = _setup(tiny_model)
    with torch.no_grad():  # move the student away from the teacher so the terms differ
        for _, p in tiny_model.named_trainable():
            p.add_(0.05 * torch.randn_like(p))
    term = Term("esd", images="forget", prompt="forget", target="esd", eta=1.0)
    batch = draw_batch(tiny_model, task, "forget", 3, step_generator(0, 0))
    loss = term_losses([term], tiny_model, [batch], step_generator(0, 1))["esd"]

    x_t = tiny_model.add_noise(batch.x0, batch.noise, batch.t)
    cond_f = tiny_model.encode(batch.prompts["forget"])
    cond_0 = tiny_model.encode([""] * 3)
    e_f = tiny_model.teacher_eps(x_t, batch.t, cond_f)
    e_0 = tiny_model.teacher_eps(x_t, batch.t, cond_0)
    g = 2.0  # rohitgandikota/erasing's negative_guidance default
    official = e_f - g * (e_f - e_0)
    expected = (tiny_model.eps(x_t, batch.t, cond_f) - official).pow(2).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)


def test_batched_terms_equal_separate_forwards(tiny_model):
    task = _setup(tiny_model)
    with torch.no_grad():
        for _, p in tiny_model.named_trainable():
            p.add_(0.05 * torch.randn_like(p))
    terms = [
        Term("forget", images="forget", prompt="forget", target="teacher", target_prompt="anchor"),
        Term("retain", images="retain", prompt="retain", target="teacher", weight=0.5),
        Term("mem", images="anchor", prompt="forget", target="gaussian"),
        Term("sg", images="forget", prompt="forget", target="student-sg", target_prompt="empty", norm="l2"),
    ]
    batches = [draw_batch(tiny_model, task, t.images, 2, step_generator(1, i)) for i, t in enumerate(terms)]
    together = term_losses(terms, tiny_model, batches, step_generator(2, 0))
    for term, batch in zip(terms, batches, strict=True):
        alone = term_losses([term], tiny_model, [batch], step_generator(2, 0))[term.name]
        torch.testing.assert_close(together[term.name], alone, rtol=1e-4, atol=1e-6)


def test_teacher_target_is_zero_loss_before_training(tiny_model):
    task = _setup(tiny_model)
    term = Term("retain", images="retain", prompt="retain", target="teacher")
    total, logs = compute_loss([term], tiny_model, task, 4, step_generator(0, 0))
    assert float(total.detach()) < 1e-10 and logs["loss_retain"] < 1e-10


def test_anchor_images_show_the_anchor_concept_under_forget_prompts(tiny_model):
    task = UnlearningTask.create(["dotted"], images_per_prompt=2, anchor_scheme="fixed:grid")
    batch = draw_batch(tiny_model, task, "anchor", 6, step_generator(0, 0))
    for prompt, anchor_prompt in zip(batch.prompts["forget"], batch.prompts["anchor"], strict=True):
        assert "dotted" in prompt and "grid" in anchor_prompt
    # every drawn image is one of the grid-style images of D_u'
    objects = [p.split(" ")[3] for p in batch.prompts["forget"]]
    grid_images = torch.cat([torch.from_numpy(canvas.render_batch([("grid", o)] * 2, [0, 1])[0]) for o in objects])
    for img in batch.x0:
        assert any(torch.equal(img, g) for g in grid_images)


def test_weights_and_signs_sum(tiny_model):
    task = _setup(tiny_model)
    terms = [Term("a", images="forget", prompt="forget", target="gaussian", weight=-1.0),
             Term("b", images="retain", prompt="retain", target="gaussian", weight=2.0)]
    total, logs = compute_loss(terms, tiny_model, task, 2, step_generator(0, 0))
    assert abs(float(total.detach()) - (-logs["loss_a"] + 2 * logs["loss_b"])) < 1e-5


def test_generated_states_stop_after_zero_to_n_minus_one_ddim_steps_as_official_esd(tiny_model, monkeypatch):
    from diffunlearn.objectives import generate_batch

    # esd_sd.py: run_till_timestep = random.randint(0, 49), inclusive, for 50 steps: the state after k
    # of the N steps for k = 0..N-1 (k = 0: the initial noise), trained at timesteps[k]
    task = _setup(tiny_model)
    assert tiny_model.ddim_timesteps(4) == [750, 500, 250, 0]
    monkeypatch.setattr(type(tiny_model), "sample", lambda self, prompts, seeds, **kw: torch.zeros(len(prompts), 3))
    stops = {}
    for first_stop in (0, 1):
        term = Term("esd", images="generated", prompt="forget", target="esd", generation_steps=4, first_stop=first_stop)
        stops[first_stop] = {int(generate_batch(tiny_model, term, task, 2, step_generator(0, k)).t[0])
                             for k in range(64)}
    assert stops[0] == {750, 500, 250, 0}
    assert stops[1] == {500, 250, 0}
    from diffunlearn.methods.esd import Esd, EsdConfig

    assert Esd(EsdConfig(mode="data-free"), None, None).terms()[0].first_stop == 0


def test_stopping_at_the_first_timestep_returns_the_initial_noise(tiny_model):
    seeds = [3, 4]
    x = tiny_model.sample(["an image of circle in dotted style", ""], seeds, steps=4, stop_at=750)
    assert torch.equal(x, tiny_model.initial_noise(seeds))
