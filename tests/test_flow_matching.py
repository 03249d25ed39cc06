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
