"""`python -m klein_sweep.report NAME --recommend data.max_images=N`: the boundary of a study over
the number of images read at the user's own size, from the study and from report.json alone;
sizes outside the measured range refused in one line."""

from __future__ import annotations

import math

import pytest

from sweep_helpers import COMMON, compose_plan, finish

LRS = (1e-4, 2e-4, 4e-4)
SIZES = (5, 10, 20)


def collapse_step(lr: float, images: int) -> int:
    """A boundary in repeats per image: steps ~ lr^-0.6 x images, on the 500-step grid."""
    true = 10 ** (1.1 - 0.6 * math.log10(lr)) * images / 20
    return int(math.ceil(true / 500) * 500)


def rows_until(collapse: int, last: int) -> list[dict]:
    return [{"step": s, "id_sim": 0.3 if s >= collapse else 0.8, "state": "collapsed" if s >= collapse else "good"}
            for s in range(500, min(collapse, last) + 1, 500)]


@pytest.fixture(scope="module")
def images_study(tmp_path_factory):
    """A finished lr x images study (9 trainings to 5000 steps, each collapsed on the grid)."""
    from klein_sweep.record import StudyAttr
    from klein_sweep.report.writer import write_report
    from klein_sweep.sweep.study import open_study
    from klein_sweep.sweep.worker import study_meta

    tmp = tmp_path_factory.mktemp("recommend")
    folder = tmp / "sweeps" / "lr_vs_steps_images"
    common = [a for a in COMMON if not a.startswith("data=")]  # the mini character: 20 images
    plan = compose_plan(["+sweep=lr_vs_steps_images", *common, "sweep.params.train.steps.values=[500,1000,1500,2000,2500,3000,3500,4000,4500,5000]",
                         f"sweep.output_dir={folder}", "tracking=none"])
    study = open_study(plan)
    study.set_user_attr(StudyAttr.META, study_meta(plan).to_json())  # the plan, as a worker records it
    for images in SIZES:
        for lr in LRS:
            finish(study, {"train.lr": lr, "data.max_images": images}, rows_until(collapse_step(lr, images), 5000))
    write_report(folder, study=study)
    return tmp, folder


@pytest.fixture(scope="module")
def committed_report(images_study, tmp_path_factory):
    """The report.json alone, as committed (no study beside it)."""
    import shutil

    tmp = tmp_path_factory.mktemp("committed")
    (tmp / "sweeps" / "lr_vs_steps_images").mkdir(parents=True)
    shutil.copy(images_study[1] / "report.json", tmp / "sweeps" / "lr_vs_steps_images" / "report.json")
    return tmp


def recommend_cli(cwd, *args, capsys):
    import os

    from klein_sweep.report.__main__ import main

    here = os.getcwd()
    os.chdir(cwd)
    try:
        code = main(["lr_vs_steps_images", "--recommend", *args])
    finally:
        os.chdir(here)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_inside_the_range_each_lr_gets_the_band_from_the_study_and_from_report_json_alone(images_study, committed_report, capsys):
    from klein_sweep.report.recommend import basis_from_report, recommend

    tmp, folder = images_study
    code, from_study, err = recommend_cli(tmp, "data.max_images=15", capsys=capsys)
    assert code == 0, err
    basis = basis_from_report(folder / "report.json")
    rows = recommend(basis, {"images": 15.0})
    assert [r.lr for r in rows] == list(LRS)
    for r in rows:
        # between the measured sizes on each side, and a band around the fitted step
        assert r.low <= r.fitted <= r.high
        assert basis.fit.step_at(r.lr, {"images": 10}) < r.fitted < basis.fit.step_at(r.lr, {"images": 20})
        assert r.safe_repeats == pytest.approx(r.low / 15)
        assert f"{r.low:,.0f}" in from_study and f"{r.safe_repeats:,.1f}" in from_study
    assert "images 15" in from_study
    # the committed file alone (no study.db) prints the same
    code, from_json, _ = recommend_cli(committed_report, "data.max_images=15", capsys=capsys)
    assert code == 0 and from_json == from_study


def test_the_report_states_the_exponent_of_the_images_and_what_it_means(images_study):
    import json

    _, folder = images_study
    report = json.loads((folder / "report.json").read_text())
    fit = report["boundary"]["fit"]
    lo, hi = fit["exponent_intervals"]["images"]
    # the parent run's metrics (report.json keeps what the sweep logs there)
    metrics = report["answer"]["metrics"]
    assert (metrics["boundary/exponent_images_low"], metrics["boundary/exponent_images"], metrics["boundary/exponent_images_high"]) == (
        lo, fit["exponents"]["images"], hi)
    assert "boundary/safe_steps/lr_0.0002_images_10" in metrics
    assert lo < 1.0 < hi + 0.15 and hi < 1.5 and lo > 0.5, (lo, hi)  # built as repeats per image (exponent 1)
    text = (folder / "report.md").read_text()
    assert "### Exponents" in text and "- images: +" in text and "| lr | images |" in text
    assert "repeats per image" in text.split("### Exponents")[1].split("###")[0]


@pytest.mark.parametrize("args, expected", [
    (["data.max_images=40"], "data.max_images=40 is outside the range sweep lr_vs_steps_images measured (images from 5 to 20)"),
    (["data.max_images=3"], "data.max_images=3 is outside the range"),
    (["train.rank=32", "data.max_images=10"], "train.rank=32 is outside the range sweep lr_vs_steps_images measured (rank only at 16)"),
    ([], "give data.max_images=N: the sweep measured images from 5 to 20"),
    (["train.lr=1e-4"], "'train.lr=1e-4' is not KEY=VALUE with KEY one of data.max_images, train.rank"),
])
def test_outside_the_range_is_refused_in_one_line(committed_report, capsys, args, expected):
    code, out, err = recommend_cli(committed_report, *args, capsys=capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and expected in err, err
