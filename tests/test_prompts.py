"""A real model is judged by prompts about the user's own subject: built from the trigger and the
class word (given, or inferred from the captions), style prompts when the captions name no class;
the mini world keeps its own prompts, and the mini world's prompts on a real model are refused."""

from __future__ import annotations

import pytest
from PIL import Image

from conftest import run_cli
from klein_sweep.evaluation.prompts import character_prompts, infer_class_word, style_prompts
from klein_sweep.mini import prompts as mini


@pytest.mark.parametrize("captions, word", [
    (["photo of [trigger] woman smiling", "[trigger] woman in a cafe", "photo of ohwx, a woman on a beach"], "woman"),
    (["photo of a [trigger] dog on grass", "a [trigger] dog", "[trigger] in the snow"], "dog"),  # 2 of 3 name it
    (["a painting in [trigger] style", "[trigger] style, a city at night", "photo of [trigger]"], None),  # a style
    (["photo of [trigger] man", "photo of [trigger] woman", "photo of [trigger] boy", "photo of [trigger] girl"], None),  # no majority
])
def test_the_class_word_is_the_word_after_the_trigger_in_most_captions(captions, word):
    assert infer_class_word(captions, "ohwx").word == word


def folder_of(tmp_path, caption: str, n: int = 4):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(n):
        Image.new("RGB", (1024, 1024), (40 * i, 90, 160)).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(caption)
    return folder


def dry_run(tmp_path, folder, *extra):
    return run_cli("+sweep=lr_vs_steps", "sweep.dry_run=true", "model=flux2_klein_base_9b", "data=folder",
                   f"data.path={folder}", "data.trigger=ohwx", *extra, cwd=tmp_path)


def test_a_9b_dry_run_prints_prompts_for_the_users_character(tmp_path):
    proc = dry_run(tmp_path, folder_of(tmp_path, "photo of ohwx woman"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "class word 'woman' inferred from the captions (it follows the trigger 'ohwx' in 4 of 4)" in out
    trigger, prior = character_prompts("woman")
    for prompt in [p.replace("[trigger]", "ohwx") for p in trigger] + prior:
        assert f"\n    {prompt}\n" in proc.stdout
    assert "photo of ohwx woman in a cafe" in proc.stdout and "\n    photo of a woman\n" in proc.stdout  # the leak probe
    assert "creature" not in proc.stdout
    # the plan: recipe, seeds, resolution, steps, which checkpoints get the full recipe
    assert "screened with seeds [0] at 512 px, 50 steps, CFG 4" in proc.stdout
    assert "the full recipe (4 seeds at 512 px, 50 steps, CFG 4) where it decides" in proc.stdout
    assert "every checkpoint (500, 1000, 1500, 2000, 2500)" in proc.stdout


def test_captions_without_a_class_word_get_style_prompts_and_class_word_overrides(tmp_path):
    folder = folder_of(tmp_path, "a city street in ohwx style")
    proc = dry_run(tmp_path, folder)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "evaluation prompts for a style" in proc.stdout + proc.stderr
    trigger, prior = style_prompts()
    assert all(f"\n    {p.replace('[trigger]', 'ohwx')}\n" in proc.stdout for p in trigger + prior)
    told = dry_run(tmp_path, folder, "data.class_word=cat")
    assert "class word 'cat' (data.class_word)" in told.stdout + told.stderr and "\n    photo of ohwx cat in a cafe\n" in told.stdout


def test_the_mini_worlds_prompts_on_a_real_model_are_refused_before_anything_is_written(tmp_path):
    folder = folder_of(tmp_path, "photo of ohwx woman")
    proc = run_cli("+sweep=lr_vs_steps", "model=flux2_klein_base_9b", "data=folder", f"data.path={folder}",
                   f"eval.trigger_prompts=['{mini.TRIGGER_PROMPTS[0]}']", cwd=tmp_path)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("klein_sweep: error")]
    assert len(lines) == 1 and "eval.trigger_prompts" in lines[0] and "mini world" in lines[0], proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]  # no sweeps/, no mlflow.db, no outputs/


def test_the_mini_world_keeps_its_own_prompts():
    from klein_sweep.config import build_settings, compose_config

    e = build_settings(compose_config(["eval=default"])).eval
    assert (e.trigger_prompts, e.prior_prompts) == (mini.TRIGGER_PROMPTS, mini.PRIOR_PROMPTS)
    mine = build_settings(compose_config(["eval=default", "eval.prior_prompts=['a blue circle creature']"])).eval
    assert mine.prior_prompts == ["a blue circle creature"] and mine.trigger_prompts == mini.TRIGGER_PROMPTS
