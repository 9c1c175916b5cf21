"""Width-nested sub-models (HeteroFL, Diao et al., ICLR 2021, Sec. 3): slicing, aggregation, narrow copies."""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch
from torch import nn

from fedml_progfed.core.staged_model import count_parameters, state_shapes
from fedml_progfed.core.width import (
    add_scaler,
    covered_mean,
    leading_slice,
    narrow_shapes,
    narrow_state,
    scaled,
    static_batch_norm,
)
from fedml_progfed.errors import FieldError
from fedml_progfed.models import build_model, models_with
from fedml_progfed.models.registry import CAPABILITIES, WIDTH, BuildSpec, narrow_copy

MNIST, CIFAR = (1, 28, 28), (3, 32, 32)
RATIOS = (1.0, 1 / 2, 1 / 4, 1 / 8, 1 / 16)
#: Model -> (input shape, options, ratios to check); resnet152 at base width 16 to stay fast.
CASES = {
    "convnet": (MNIST, {}, RATIOS),
    "convnet_emnist": (MNIST, {}, RATIOS),
    "resnet18": (MNIST, {}, RATIOS),
    "resnet152": (MNIST, {"base_width": 16}, RATIOS),
    "resnet34_small": (MNIST, {}, RATIOS),
    "vgg16": (CIFAR, {}, (1.0, 1 / 2, 1 / 16)),
    "vgg19": (CIFAR, {}, (1.0, 1 / 16)),
}


@lru_cache(maxsize=None)
def full_model(name: str) -> nn.Module:
    shape, options, _ = CASES[name]
    torch.manual_seed(0)
    return build_model(name, shape, 10, **options)


# --------------------------------------------------------------------------- scaled, leading_slice


@pytest.mark.parametrize(
    "width,ratio,multiple,expected",
    [
        (64, 1.0, 1, 64), (64, 1 / 2, 1, 32), (64, 1 / 16, 1, 4), (32, 1 / 16, 1, 2),
        (10, 0.3, 1, 3), (10, 0.25, 1, 3),  # ceil, as HeteroFL
        (100, 0.07, 1, 7),  # 100 * 0.07 = 7.000000000000001 in floats: still 7
        (3, 0.1, 1, 1),  # never below 1
        (16, 1 / 16, 2, 2), (16, 1 / 8, 2, 2), (24, 1 / 4, 2, 6), (20, 0.15, 2, 4), (2, 1 / 64, 2, 2),
    ],
)
def test_scaled_is_ceil_rounded_up_to_the_multiple(width: int, ratio: float, multiple: int, expected: int) -> None:
    assert scaled(width, ratio, multiple) == expected


@pytest.mark.parametrize(
    "args", [(64, 0.0), (64, 1.5), (64, -0.5), (64, float("nan")), (64, True), (0, 0.5), (64, 0.5, 0)]
)
def test_scaled_rejects_bad_arguments(args: tuple) -> None:
    with pytest.raises(ValueError):
        scaled(*args)


def test_leading_slice_is_a_view_of_the_leading_block() -> None:
    full = torch.arange(24.0).reshape(2, 3, 4)
    piece = leading_slice(full, (1, 2, 3))
    assert piece.tolist() == [[[0.0, 1.0, 2.0], [4.0, 5.0, 6.0]]]
    piece.zero_()
    assert full[0, :2, :3].abs().sum() == 0 and full[1].sum() == sum(range(12, 24))
    assert leading_slice(torch.tensor(3.0), ()).item() == 3.0  # 0-dim buffers (num_batches_tracked)
    with pytest.raises(ValueError, match="rank"):
        leading_slice(full, (1, 2))
    with pytest.raises(ValueError, match="larger"):
        leading_slice(full, (1, 4, 4))


# --------------------------------------------------------------------------- covered_mean


def test_covered_mean_on_two_clients_by_hand() -> None:
    """A (weight 1) holds w[:2, :2], B (weight 3) w[:3, :3] of a 3x4 w; b is A's only; nobody holds c."""
    full = {"w": (3, 4), "b": (4,), "c": (2,)}
    a = {"w": torch.full((2, 2), 2.0), "b": torch.tensor([0.1, 0.2, 0.3, 0.4])}
    b = {"w": torch.full((3, 3), 6.0), "x": torch.ones(5)}  # names outside `names` are ignored
    mean = covered_mean(full, ["w", "b", "c"], [(1.0, a), (3.0, b)])
    assert set(mean) == {"w", "b", "c"}
    expected_w = torch.tensor(
        [
            [5.0, 5.0, 6.0, 0.0],  # (1 * 2 + 3 * 6) / 4 = 5 where both hold it; B's own 6; nobody: 0
            [5.0, 5.0, 6.0, 0.0],
            [6.0, 6.0, 6.0, 0.0],
        ]
    )
    assert torch.equal(mean["w"], expected_w)
    assert torch.equal(mean["b"], a["b"])  # one client only: its value, not averaged with zeros
    assert torch.equal(mean["c"], torch.zeros(2))


def test_one_client_elements_take_its_value_exactly_whatever_the_weights() -> None:
    generator = torch.Generator().manual_seed(0)
    mine, theirs = torch.randn(4, 6, generator=generator), torch.randn(2, 3, generator=generator)
    mean = covered_mean({"w": (5, 6)}, ["w"], [(0.1, {"w": mine}), (0.7, {"w": theirs})])["w"]
    assert torch.equal(mean[2:4], mine[2:4]) and torch.equal(mean[:2, 3:], mine[:2, 3:])
    torch.testing.assert_close(mean[:2, :3], (0.1 * mine[:2, :3] + 0.7 * theirs) / 0.8)
    assert torch.equal(mean[4], torch.zeros(6))
    # Weight-0 contributions cover nothing.
    assert torch.equal(covered_mean({"w": (2,)}, ["w"], [(0.0, {"w": torch.ones(2)})])["w"], torch.zeros(2))


def test_covered_mean_rejects_what_does_not_fit() -> None:
    with pytest.raises(ValueError, match="larger"):
        covered_mean({"w": (2, 2)}, ["w"], [(1.0, {"w": torch.ones(3, 2)})])
    with pytest.raises(ValueError, match="rank"):
        covered_mean({"w": (2, 2)}, ["w"], [(1.0, {"w": torch.ones(2)})])
    with pytest.raises(ValueError, match="no full shape"):
        covered_mean({"w": (2, 2)}, ["v"], [])
    with pytest.raises(ValueError, match=">= 0"):
        covered_mean({"w": (2,)}, ["w"], [(-1.0, {"w": torch.ones(2)})])


def test_a_half_width_update_lands_in_its_slice_and_nowhere_else() -> None:
    """Server slices, client trains, the server adds covered_mean of the delta: only the slice moves."""
    torch.manual_seed(1)
    server = build_model("convnet", MNIST, 10)
    client = narrow_copy(server, 0.5)
    shapes = narrow_shapes(server, client)
    before = {k: v.clone() for k, v in server.state_dict().items()}
    client.load_state_dict(narrow_state(server.state_dict(), shapes))
    sent = {k: v.clone() for k, v in client.state_dict().items()}
    with torch.no_grad():
        for p in client.parameters():
            p.add_(torch.randn_like(p))  # "local training"
    delta = {k: client.state_dict()[k] - sent[k] for k in sent}
    full_shapes = state_shapes(server)
    update = covered_mean(full_shapes, list(full_shapes), [(1.0, delta)])
    with torch.no_grad():
        for k, v in server.state_dict().items():
            v.add_(update[k])
    after = server.state_dict()
    moved = 0
    for k, shape in shapes.items():
        inside = torch.zeros(full_shapes[k], dtype=torch.bool)
        inside[tuple(slice(0, d) for d in shape)] = True
        assert torch.equal(after[k][~inside], before[k][~inside]), k
        assert torch.equal(leading_slice(after[k], shape), leading_slice(before[k], shape) + delta[k]), k
        moved += int(inside.sum())
    assert moved == sum(p.numel() for p in client.parameters())  # convnet has no buffers


# --------------------------------------------------------------------------- the registry's WIDTH models


def test_every_image_classifier_declares_width() -> None:
    assert WIDTH in CAPABILITIES and "HeteroFL" in CAPABILITIES[WIDTH]
    assert models_with(WIDTH) == tuple(CASES)


def test_build_model_records_how_it_built() -> None:
    model = build_model("resnet18", MNIST, 7, base_width=16)
    assert model.build_spec == BuildSpec("resnet18", MNIST, 7, 4, (("base_width", 16),))
    assert build_model("convnet", CIFAR, 10, 2).build_spec.num_stages == 2


@pytest.mark.parametrize("name", list(CASES))
def test_narrow_copies_keep_the_keys_and_nest_the_shapes(name: str) -> None:
    full = full_model(name)
    shape, _, ratios = CASES[name]
    full_shapes = state_shapes(full)
    previous = count_parameters(full, full.num_stages) + 1
    for ratio in ratios:
        narrow = narrow_copy(full, ratio)
        shapes = narrow_shapes(full, narrow)  # same keys, every dim <= the full one
        assert list(shapes) == list(full_shapes)
        if ratio == 1.0:
            assert shapes == full_shapes
        # Input channels and classes never scale.
        assert narrow.feature_shapes(shape)[0][1:] == full.feature_shapes(shape)[0][1:]
        params = count_parameters(narrow, narrow.num_stages)
        assert params < previous, ratio
        previous = params
        if ratio < 1.0:
            x = torch.randn(2, *shape)
            assert all(narrow.forward_stage(x, s).shape == (2, 10) for s in range(1, narrow.num_stages + 1))


def test_hidden_widths_scale_and_full_width_is_unchanged() -> None:
    narrow = narrow_copy(full_model("convnet"), 1 / 4)
    assert [f[0] for f in narrow.feature_shapes(MNIST)] == [8, 16, 16, 16]
    assert count_parameters(build_model("convnet", CIFAR, 10, width_ratio=1.0), 4) == 122_570
    small = narrow_copy(full_model("resnet34_small"), 1 / 16)  # base 16 -> 1, rounded up to GN's 2 groups
    assert [f[0] for f in small.feature_shapes(MNIST)] == [2, 2, 4, 8]
    bottleneck = narrow_copy(full_model("resnet152"), 1 / 8)  # base_width 16 carried over
    assert [f[0] for f in bottleneck.feature_shapes(MNIST)] == [8, 16, 32, 64]


def test_ratios_compose() -> None:
    full = full_model("convnet")
    twice = narrow_copy(narrow_copy(full, 0.5), 0.5)
    assert state_shapes(twice) == state_shapes(narrow_copy(full, 0.25))
    assert dict(twice.build_spec.options)["width_ratio"] == 0.25


@pytest.mark.parametrize("name,ratio", [("convnet", 0.5), ("convnet_emnist", 0.25), ("vgg16", 0.5)])
def test_a_narrow_model_is_the_full_one_with_the_rest_zero(name: str, ratio: float) -> None:
    """Leading slices nest functionally: padding a narrow model's tensors with zeros gives the same logits.

    This fails if any layer's input is not laid out as the previous layer's leading
    channels (e.g. a channel-major flatten feeding fc1 or the VGG classifier). Not for the
    ResNets: group norm's groups span different channels at different widths.
    """
    full = full_model(name)
    shape = CASES[name][0]
    narrow = narrow_copy(full, ratio)
    with torch.no_grad():  # non-trivial batch-norm statistics and affine parameters
        for module in narrow.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1), module.running_var.uniform_(0.5, 2)
                module.weight.uniform_(0.5, 2), module.bias.uniform_(-1, 1)
    padded = build_model(name, shape, 10)
    full_shapes = state_shapes(padded)
    padded.load_state_dict(covered_mean(full_shapes, list(full_shapes), [(1.0, narrow.state_dict())]))
    narrow.eval(), padded.eval()
    x = torch.randn(3, *shape)
    for stage in range(1, full.num_stages + 1):
        torch.testing.assert_close(padded.forward_stage(x, stage), narrow.forward_stage(x, stage))


def test_narrowing_a_model_without_width_scaling_names_it() -> None:
    unet = build_model("unet3d", (4, 16, 16, 32), 3, base_width=4)
    with pytest.raises(FieldError) as info:
        narrow_copy(unet, 0.5)
    assert info.value.field == "model" and "unet3d" in str(info.value) and "resnet34_small" in str(info.value)
    unbuilt = full_model("convnet").__class__(list(full_model("convnet").blocks), nn.Linear(64, 10), MNIST, 10)
    with pytest.raises(FieldError, match="build_model"):
        narrow_copy(unbuilt, 0.5)


@pytest.mark.parametrize("ratio", [0.0, 1.5, -1.0, True, "half"])
def test_ratios_outside_zero_one_are_rejected(ratio: object) -> None:
    with pytest.raises(FieldError) as info:
        narrow_copy(full_model("convnet"), ratio)  # type: ignore[arg-type]
    assert info.value.field == "width_ratio"
    with pytest.raises(FieldError) as info:
        build_model("vgg16", CIFAR, 10, width_ratio=ratio)
    assert info.value.field == "width_ratio"


def test_narrow_copy_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    narrow_copy(full_model("convnet"), 0.5)
    assert torch.equal(torch.rand(3), expected)


# --------------------------------------------------------------------------- scaler, static batch norm


def test_scaler_divides_while_training_and_is_identity_in_eval() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 2)))
    x = torch.randn(5, 3)
    with torch.no_grad():
        plain = model(x)
        by_hand = model[2](model[1](model[0](x) / 0.25))  # the output layer "2" is skipped
    handles = add_scaler(model, 0.25, skip=("2",))
    assert len(handles) == 1
    with torch.no_grad():
        torch.testing.assert_close(model.train()(x), by_hand)
        assert torch.equal(model.eval()(x), plain)
    for handle in handles:
        handle.remove()
    with torch.no_grad():
        assert torch.equal(model.train()(x), plain)


def test_scaler_hooks_every_conv_and_linear_outside_the_heads() -> None:
    model = narrow_copy(full_model("convnet"), 0.5)
    assert len(add_scaler(model, 0.5, skip=("heads",))) == 4  # conv1..conv3, fc1
    assert len(add_scaler(narrow_copy(full_model("convnet"), 0.5), 0.5)) == 4 + 4  # and the 4 heads
    with pytest.raises(ValueError):
        add_scaler(model, 0.0)


def test_static_batch_norm_normalises_with_the_batch_in_eval() -> None:
    model = narrow_copy(full_model("vgg16"), 1 / 16)
    assert any(k.endswith("running_mean") for k in state_shapes(model))  # cached before
    assert static_batch_norm(model) == 13
    assert not any(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in model.state_dict())
    assert state_shapes(model) == {k: tuple(v.shape) for k, v in model.state_dict().items()}  # cache dropped
    assert static_batch_norm(model) == 0
    model.eval()
    x = torch.randn(4, *CIFAR)
    with torch.no_grad():
        alone, together = model(x[:2]), model(x)[:2]
    assert not torch.allclose(alone, together)  # batch statistics, also in eval
    tracked = narrow_copy(full_model("vgg16"), 1 / 16).eval()
    with torch.no_grad():
        torch.testing.assert_close(tracked(x[:2]), tracked(x)[:2])  # running statistics: batch-independent
    assert static_batch_norm(narrow_copy(full_model("resnet18"), 1 / 16)) == 0  # group norm: untouched
