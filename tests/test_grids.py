"""The sample grids people look at in MLflow: a row per prompt, a column per seed, 32-px samples
enlarged crisply to a readable size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from klein_sweep.evaluation.sampling import labelled_grid


def test_each_tile_is_its_prompt_and_seed_enlarged_with_nearest_neighbour():
    prompts, seeds = ["photo of sks creature", "a creature on a sky background"], [0, 1, 2]
    images = torch.rand(len(prompts) * len(seeds), 3, 32, 32)
    grid = np.asarray(labelled_grid(images, prompts, seeds, min_tile=128))
    expected_tiles = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    # Locate each tile by its exact content: prompt-major order, 4x enlarged, no blending.
    for i, tile in enumerate(expected_tiles):
        big = tile.repeat(4, axis=0).repeat(4, axis=1)
        hits = [(y, x) for y in range(grid.shape[0] - 127) for x in range(grid.shape[1] - 127)
                if (grid[y, x] == big[0, 0]).all() and (grid[y : y + 128, x : x + 128] == big).all()]
        assert len(hits) == 1, i
        (y, x), (row, col) = hits[0], divmod(i, len(seeds))
        if col:  # columns left to right by seed, rows top to bottom by prompt
            assert x > prev_x
        prev_x = x
        if row and col == 0:
            assert y > first_row_y
        if i == 0:
            first_row_y = y
    # the labels take room left of and above the tiles, and are drawn (not blank)
    assert grid[:, :100].min() < 128 and grid.shape[1] > 3 * 128 + 100


def test_the_grid_refuses_a_count_that_does_not_match_prompts_times_seeds():
    with pytest.raises(ValueError, match="5 images for 2 prompts x 3 seeds"):
        labelled_grid(torch.rand(5, 3, 32, 32), ["a", "b"], [0, 1, 2])
