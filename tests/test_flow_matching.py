import pytest
import torch

from klein_sweep.training import flow_matching as fm


def test_noise_endpoints_and_target_is_velocity():
    x0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    assert torch.allclose(fm.add_noise(x0, eps, torch.zeros(3)), x0)
    assert torch.allclose(fm.add_noise(x0, eps, torch.ones(3)), eps)
    # d x_t / d sigma, by finite difference, equals the target eps - x0
    s, h = torch.tensor([0.3, 0.5, 0.7]), 1e-3
    deriv = (fm.add_noise(x0, eps, s + h) - fm.add_noise(x0, eps, s - h)) / (2 * h)
    assert torch.allclose(deriv, fm.velocity_target(x0, eps), atol=1e-3)


def test_per_sample_sigma_broadcast():
    x0, eps = torch.zeros(2, 1, 1, 1), torch.ones(2, 1, 1, 1)
    xt = fm.add_noise(x0, eps, torch.tensor([0.25, 0.75]))
    assert xt.flatten().tolist() == [0.25, 0.75]


def test_sigma_sampling_ranges_and_shift():
    g = torch.Generator().manual_seed(0)
    u = fm.sample_sigmas(20000, "uniform", generator=g)
    ln = fm.sample_sigmas(20000, "logit_normal", generator=g)
    shifted = fm.sample_sigmas(20000, "logit_normal", shift=3.0, generator=g)
    for s in (u, ln, shifted):
        assert s.min() > 0 and s.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01
    assert abs(ln.median().item() - 0.5) < 0.01 and ln.std() < u.std()  # mass in the middle
    assert shifted.median() > 0.7  # shift 3 maps the median 0.5 to 0.75
    t = torch.linspace(0, 1, 11)
    assert torch.allclose(fm.shift_sigmas(t, 1.0), t)
    assert torch.all(torch.diff(fm.shift_sigmas(t, 3.0)) > 0)


def test_sampling_is_seeded():
    a = fm.sample_sigmas(8, generator=torch.Generator().manual_seed(1))
    b = fm.sample_sigmas(8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_loss_zero_iff_prediction_matches():
    t = torch.randn(2, 5, 3)
    assert fm.flow_loss(t, t).item() == 0.0
    assert abs(fm.flow_loss(t + 1.0, t).item() - 1.0) < 1e-6


def test_the_auto_shift_is_the_pipelines_own():
    """train.timestep_shift=auto trains on the shift FLUX.2's pipeline samples with: exp(mu) of
    diffusers' compute_empirical_mu, at the image's token count and the model's steps."""
    import math

    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    for tokens, steps in [(4096, 50), (1024, 50), (64, 12), (5000, 50), (16, 4)]:
        assert fm.empirical_shift(tokens, steps) == pytest.approx(math.exp(compute_empirical_mu(tokens, steps)), rel=1e-9)


def test_each_model_trains_on_its_resolved_shift(tmp_path):
    from PIL import Image

    from klein_sweep.config import ConfigError, build_settings, compose_config
    from klein_sweep.training.trial import resolve_timestep_shift

    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (1024, 1024), "white").save(folder / "a.png")

    def shift(*overrides):
        return resolve_timestep_shift(build_settings(compose_config(list(overrides))))

    real = ["model=flux2_klein_base_9b", "data=folder", f"data.path={folder}"]
    assert shift(*real) == pytest.approx(7.5636, abs=1e-3)  # 1024 px = 4096 tokens at the base's 50 steps
    assert shift(*real, "data.resolution=512") == pytest.approx(fm.empirical_shift(1024, 50), abs=1e-3)
    assert shift(*real, "train.timestep_shift=3") == 3.0
    assert shift() == 1.0  # the mini world keeps shift 1 (docs/design.md: the boundary moves under auto)
    assert shift("train.timestep_shift=auto") == pytest.approx(fm.empirical_shift(64, 12), abs=1e-3)  # 32 px, 12 steps
    with pytest.raises(ConfigError, match="train.timestep_shift"):
        build_settings(compose_config(["train.timestep_shift=fast"]))


def test_a_shift_moves_training_towards_noise():
    from klein_sweep.config import TrainConfig
    from klein_sweep.data.encoding import EncodedData
    from klein_sweep.training.loop import BatchSampler

    data = EncodedData(latents=torch.zeros(4, 4, 2, 2), prompt_embeds=torch.zeros(4, 3, 8), empty_prompt_embeds=torch.zeros(3, 8))

    def mean_sigma(shift):
        sampler = BatchSampler(data, TrainConfig(batch_size=4, timestep_shift=shift), "cpu")
        return torch.cat([sampler.next().sigmas for _ in range(200)]).mean().item()

    assert mean_sigma(None) == pytest.approx(0.5, abs=0.03)  # logit-normal around the middle
    assert mean_sigma(7.56) > 0.8
