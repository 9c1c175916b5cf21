"""The clip bounds all uploaded tensors together, whatever their number (so whatever the stage)."""

from __future__ import annotations

import math

import pytest
import torch

from fedml_progfed.privacy.clip import clip_to_norm, l2_norm


def test_the_whole_update_is_clipped_as_one_vector_for_any_number_of_tensors():
    generator = torch.Generator().manual_seed(0)
    for count in (1, 3, 12, 40):  # more tensors as a model grows
        update = {f"t{i}": torch.randn(5, 7, generator=generator) * 3 for i in range(count)}
        clipped, norm = clip_to_norm(update, 2.0)
        assert norm == math.sqrt(sum(float(t.double().pow(2).sum()) for t in update.values()))
        assert l2_norm(clipped) <= 2.0 * (1 + 1e-6)
        # one scale for every tensor: the direction is kept
        scale = 2.0 / norm
        assert all(torch.allclose(clipped[k], update[k] * scale) for k in update)


def test_an_update_inside_the_bound_and_integer_tensors_are_untouched_a_non_finite_one_is_left_to_the_checks():
    update = {"w": torch.tensor([0.3, 0.4]), "count": torch.tensor([7])}
    clipped, norm = clip_to_norm(update, 1.0)
    assert norm == pytest.approx(0.5) and torch.equal(clipped["w"], update["w"]) and torch.equal(clipped["count"], update["count"])
    broken = {"w": torch.tensor([float("nan"), 1.0])}
    kept, norm = clip_to_norm(broken, 1.0)
    assert math.isnan(norm) and kept["w"] is broken["w"]
