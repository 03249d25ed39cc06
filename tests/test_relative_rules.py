"""The collapse rules mean the same on every metric network: replacing k of n no-trigger samples
with training images moves the relative leak by about k/n whichever network measures it (the
mini world's net, a random conv net, DINOv2, CLIP), while the same injection moves the absolute
cosine by amounts that differ from network to network.

Which samples are replaced, and by which training images, moves one draw around k/n (by how much
the individual samples differ, relative to the scale: a lot for random networks, which barely tell
the character from other creatures). The test averages a balanced set of draws, in which every
no-trigger sample is replaced and every training image injected equally often: their mean is k/n
exactly when the scale's far end is measured the way the leak is (every pair, each training image
with itself too), and off when it is not."""

from __future__ import annotations

import math
import random

import pytest
import torch

from metric_networks import save_tiny_clip, save_tiny_dinov2
from klein_sweep.evaluation import metrics as M
from klein_sweep.evaluation.collapse import relative_leak
from klein_sweep.record import BaseStats


@pytest.fixture(scope="module")
def images():
    """(training images: the mini character, 20 at 32 px; no-trigger samples: 16 other creatures)."""
    from klein_sweep.config import compose_config, build_settings
    from klein_sweep.data.folder import load_examples, load_image
    from klein_sweep.mini.world import render, sample_creature

    settings = build_settings(compose_config([]))
    reference = torch.stack([(load_image(ex.image_path, 32) + 1) / 2 for ex in load_examples(settings.data)])
    rng = random.Random(7)
    prior = torch.stack([torch.from_numpy(__import__("numpy").asarray(render(sample_creature(rng)), dtype="float32") / 255).permute(2, 0, 1)
                         for _ in range(16)])
    return reference, prior


@pytest.fixture(scope="module")
def networks(tmp_path_factory):
    from klein_sweep.evaluation.networks import build_feature_network

    paths = {"dinov2": str(save_tiny_dinov2(tmp_path_factory.mktemp("dinov2"))),
             "clip": str(save_tiny_clip(tmp_path_factory.mktemp("clip")))}
    return {name: build_feature_network(name, paths) for name in ("mini", "random_conv", "dinov2", "clip")}


def injected_leaks(net, reference, prior, k: int) -> list[float]:
    """The leak with k no-trigger samples replaced by k training images, over a balanced set of
    draws (a window of k sliding over both sets, once round the longer cycle)."""
    n, m = len(prior), len(reference)
    draws = math.lcm(n, m, k) // k
    out = []
    for d in range(draws):
        samples = prior.clone()
        samples[[(d * k + i) % n for i in range(k)]] = reference[[(d * k + i) % m for i in range(k)]]
        out.append(M.identity_similarity(net, samples, reference))
    return out


def test_injected_training_images_move_the_relative_leak_by_their_share(images, networks):
    reference, prior = images
    n = len(prior)
    absolute = {}
    for name, net in networks.items():
        base = BaseStats(leak=M.identity_similarity(net, prior, reference),
                         reference_id_sim=M.identity_similarity(net, reference, reference))
        for k in (4, 8, 12):  # k of the n samples are now training images
            leaks = injected_leaks(net, reference, prior, k)
            relative = sum(relative_leak(v, base) for v in leaks) / len(leaks)
            assert relative == pytest.approx(k / n, abs=0.01), (name, k)
            if k == 4:
                absolute[name] = sum(leaks) / len(leaks) - base.leak
    # In each network's own cosine units the same injection is a different distance: a margin
    # in one network's units would mean something else in another's.
    assert max(absolute.values()) > 2 * min(absolute.values()), absolute
