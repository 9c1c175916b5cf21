"""BraTS NIfTI reading, normalisation, errors, patch loaders and the federated split (tiny synthetic volumes)."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fedml_progfed.data import (
    EvalBatches,
    FederatedData,
    PatchBatches,
    load_brats_cases,
    load_brats_federated,
    write_brats_demo,
)
from fedml_progfed.data.brats import MODALITIES, load_brats_case
from fedml_progfed.config import explain
from fedml_progfed.errors import DataError, FieldError

SHAPE = (32, 32, 32)
NUM_CASES = 6


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("brats")
    write_brats_demo(out, NUM_CASES, SHAPE, seed=0)
    return out


@pytest.fixture(scope="module")
def cases(demo_dir: Path):
    return load_brats_cases(demo_dir)


def _raw(case_dir: Path, kind: str) -> np.ndarray:
    return np.asarray(nib.load(str(case_dir / f"{case_dir.name}_{kind}.nii.gz")).dataobj)


def _copy_case(demo_dir: Path, dest: Path, index: int = 0) -> Path:
    name = f"BraTS2021_SYNTH_{index:05d}"
    shutil.copytree(demo_dir / name, dest / name)
    return dest / name


def _one_line_error(root: Path, case: str) -> str:
    with pytest.raises(DataError) as info:
        load_brats_cases(root)
    message = str(info.value)
    assert case in message and "\n" not in message
    return message


# --------------------------------------------------------------------------- demo writer


def test_demo_writes_exact_layout(demo_dir: Path) -> None:
    dirs = sorted(p for p in demo_dir.iterdir() if p.is_dir())
    assert [p.name for p in dirs] == [f"BraTS2021_SYNTH_{i:05d}" for i in range(NUM_CASES)]
    assert "SYNTHETIC" in (demo_dir / "SYNTHETIC_README.txt").read_text()
    for case_dir in dirs:
        expected = {f"{case_dir.name}_{k}.nii.gz" for k in (*MODALITIES, "seg")}
        assert {p.name for p in case_dir.iterdir()} == expected
        for kind in MODALITIES:
            img = nib.load(str(case_dir / f"{case_dir.name}_{kind}.nii.gz"))
            assert img.get_data_dtype() == np.int16 and img.shape == SHAPE
        assert nib.load(str(case_dir / f"{case_dir.name}_seg.nii.gz")).get_data_dtype() == np.uint8


def test_demo_labels_are_brats_and_nested(demo_dir: Path) -> None:
    for i in range(NUM_CASES):
        case_dir = demo_dir / f"BraTS2021_SYNTH_{i:05d}"
        seg = _raw(case_dir, "seg")
        brain = np.stack([_raw(case_dir, k) for k in MODALITIES]).any(axis=0)
        assert set(np.unique(seg).tolist()) == {0, 1, 2, 4}
        assert not (seg[~brain]).any()
        # Core (1, 4) lies inside the oedema envelope: every in-brain 6-neighbour of a core voxel is tumour.
        core = np.isin(seg, (1, 4))
        padded_seg, padded_brain = np.pad(seg, 1), np.pad(brain, 1)
        for axis in range(3):
            for shift in (-1, 1):
                nb_seg = np.roll(padded_seg, shift, axis)[1:-1, 1:-1, 1:-1]
                nb_brain = np.roll(padded_brain, shift, axis)[1:-1, 1:-1, 1:-1]
                assert np.all(nb_seg[core & nb_brain] > 0)


def test_demo_is_deterministic_per_seed(tmp_path: Path) -> None:
    write_brats_demo(tmp_path / "a", 1, SHAPE, seed=3)
    write_brats_demo(tmp_path / "b", 1, SHAPE, seed=3)
    write_brats_demo(tmp_path / "c", 1, SHAPE, seed=4)
    name = "BraTS2021_SYNTH_00000"
    for kind in (*MODALITIES, "seg"):
        assert np.array_equal(_raw(tmp_path / "a" / name, kind), _raw(tmp_path / "b" / name, kind))
    assert not np.array_equal(_raw(tmp_path / "a" / name, "flair"), _raw(tmp_path / "c" / name, "flair"))


# --------------------------------------------------------------------------- reading


def test_load_cases_sorted_shapes_and_regions(demo_dir: Path, cases) -> None:
    assert [c.name for c in cases] == [f"BraTS2021_SYNTH_{i:05d}" for i in range(NUM_CASES)]
    full = load_brats_cases(demo_dir, crop_foreground=False)
    for case, whole in zip(cases, full):
        assert case.image.dtype == np.float32 and case.label.dtype == np.float32
        assert case.image.shape[0] == 4 and case.label.shape[0] == 3
        assert case.image.shape[1:] == case.label.shape[1:] and all(n <= 32 for n in case.spatial_shape)
        assert whole.spatial_shape == SHAPE  # nibabel's (X, Y, Z), not transposed
        seg = _raw(demo_dir / case.name, "seg")
        np.testing.assert_array_equal(whole.label[0], np.isin(seg, (1, 2, 4)))
        np.testing.assert_array_equal(whole.label[1], np.isin(seg, (1, 4)))
        np.testing.assert_array_equal(whole.label[2], seg == 4)
        # Cropping keeps every tumour voxel.
        assert case.label.sum() == whole.label.sum()


def test_zscore_over_brain_background_zero(demo_dir: Path) -> None:
    case = load_brats_cases(demo_dir, crop_foreground=False)[0]
    raw = np.stack([_raw(demo_dir / case.name, k) for k in MODALITIES])
    brain = raw.any(axis=0)
    for c in range(4):
        values = case.image[c][brain]
        assert abs(values.mean()) < 1e-4 and abs(values.std() - 1.0) < 1e-4
        assert not case.image[c][~brain].any()
    # Modality order flair, t1, t1ce, t2: the channel is a monotone map of the matching file.
    for c, kind in enumerate(MODALITIES):
        assert np.corrcoef(case.image[c][brain], _raw(demo_dir / case.name, kind)[brain])[0, 1] > 0.999


def test_hgg_lgg_layout_and_plain_nii(demo_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "HGG").mkdir()
    (tmp_path / "LGG").mkdir()
    _copy_case(demo_dir, tmp_path / "LGG", 1)
    case_dir = _copy_case(demo_dir, tmp_path / "HGG", 0)
    flair = case_dir / f"{case_dir.name}_flair.nii.gz"
    with gzip.open(flair) as src:
        (case_dir / f"{case_dir.name}_flair.nii").write_bytes(src.read())
    flair.unlink()
    assert [c.name for c in load_brats_cases(tmp_path)] == ["BraTS2021_SYNTH_00000", "BraTS2021_SYNTH_00001"]


# --------------------------------------------------------------------------- errors: one line naming the case


def test_missing_modality(demo_dir: Path, tmp_path: Path) -> None:
    case_dir = _copy_case(demo_dir, tmp_path)
    (case_dir / f"{case_dir.name}_t1ce.nii.gz").unlink()
    assert "t1ce" in _one_line_error(tmp_path, case_dir.name)


def test_shape_mismatch(demo_dir: Path, tmp_path: Path) -> None:
    case_dir = _copy_case(demo_dir, tmp_path)
    nib.save(nib.Nifti1Image(np.ones((32, 32, 30), np.int16), np.eye(4)), str(case_dir / f"{case_dir.name}_t2.nii.gz"))
    assert "shape" in _one_line_error(tmp_path, case_dir.name)


def test_unknown_label_is_listed(demo_dir: Path, tmp_path: Path) -> None:
    case_dir = _copy_case(demo_dir, tmp_path)
    seg = _raw(case_dir, "seg").copy()
    seg[seg == 4] = 3
    seg[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(seg, np.eye(4)), str(case_dir / f"{case_dir.name}_seg.nii.gz"))
    assert "[3, 7]" in _one_line_error(tmp_path, case_dir.name)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_gzip(demo_dir: Path, tmp_path: Path, damage: str) -> None:
    case_dir = _copy_case(demo_dir, tmp_path)
    path = case_dir / f"{case_dir.name}_flair.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x1f\x8b" + b"not a gzip stream" * 20)
    assert "flair" in _one_line_error(tmp_path, case_dir.name)


def test_empty_and_missing_dir(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for root in (tmp_path / "empty", tmp_path / "nope"):
        with pytest.raises(DataError) as info:
            load_brats_cases(root)
        message = str(info.value)
        assert str(root) in message and "make-brats-demo" in message and "\n" not in message


# --------------------------------------------------------------------------- loaders


def test_patch_batches_shapes_and_determinism(cases) -> None:
    loader = PatchBatches(cases, (16, 16, 16), batch_size=4, client_index=2)
    assert len(loader) == 2 and loader.num_samples == len(loader.dataset) == NUM_CASES
    assert loader.batch_size == 4 and loader.client_index == 2
    torch.manual_seed(0)
    first = list(loader)
    assert [tuple(x.shape) for x, _ in first] == [(4, 4, 16, 16, 16), (2, 4, 16, 16, 16)]
    assert [tuple(y.shape) for _, y in first] == [(4, 3, 16, 16, 16), (2, 3, 16, 16, 16)]
    assert all(x.dtype == torch.float32 and y.dtype == torch.float32 for x, y in first)
    torch.manual_seed(0)
    again = list(loader)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    torch.manual_seed(1)
    other = list(loader)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other))


def test_patch_rng_drawn_at_iter_and_foreground(cases) -> None:
    loader = PatchBatches(cases, (8, 8, 8), batch_size=3, fg_prob=1.0)
    torch.manual_seed(0)
    it = iter(loader)
    state = torch.get_rng_state()
    batches = list(it)
    assert torch.equal(state, torch.get_rng_state())  # no RNG use after iter()
    # fg_prob=1: every patch is centred on a tumour voxel.
    assert all(bool((y[i, 0] > 0).any()) for _, y in batches for i in range(len(y)))


def test_patch_larger_than_volume_is_zero_padded(cases) -> None:
    loader = PatchBatches(cases[:1], (40, 40, 40), batch_size=1, fg_prob=0.0)
    x, y = next(iter(loader))
    assert tuple(x.shape) == (1, 4, 40, 40, 40) and tuple(y.shape) == (1, 3, 40, 40, 40)
    assert float(x.abs().sum()) == pytest.approx(float(np.abs(cases[0].image).sum()), rel=1e-5)
    assert float(y.sum()) == float(cases[0].label.sum())


def test_eval_batches_modes(cases) -> None:
    full = list(EvalBatches(cases, "full"))
    assert len(full) == NUM_CASES
    assert all(x.shape == (1, 4, *c.spatial_shape) and y.shape == (1, 3, *c.spatial_shape) for (x, y), c in zip(full, cases))
    crop = EvalBatches(cases, "center_crop", (20, 20, 20))
    assert len(crop) == NUM_CASES and crop.batch_size == 1
    assert all(x.shape == (1, 4, 20, 20, 20) and y.shape == (1, 3, 20, 20, 20) for x, y in crop)
    with pytest.raises(ValueError, match="eval_size"):
        EvalBatches(cases, "center_crop")


# --------------------------------------------------------------------------- federated split


def test_federated_split_covers_all_cases_once(demo_dir: Path) -> None:
    fed = load_brats_federated(demo_dir, 2, 2, seed=0, patch_size=(16, 16, 16), eval_mode="full", test_fraction=0.3)
    assert isinstance(fed, FederatedData) and fed.name == "brats"
    assert fed.input_shape == (4, 16, 16, 16) and fed.num_classes == 3
    train_num, test_num, train_global, test_global, local_num, train_local, test_local, classes = fed.as_list()
    assert (train_num, test_num, classes) == (4, 2, 3)
    assert sorted(local_num) == [0, 1] and sum(local_num.values()) == 4 and min(local_num.values()) >= 1
    train_names = [c.name for k in sorted(train_local) for c in train_local[k].dataset]
    test_names = [c.name for c in test_global.dataset]
    assert sorted(train_names + test_names) == [f"BraTS2021_SYNTH_{i:05d}" for i in range(NUM_CASES)]
    for k in (0, 1):
        assert train_local[k].client_index == test_local[k].client_index == k
        assert [c.name for c in test_local[k].dataset] == [c.name for c in train_local[k].dataset]
        assert test_local[k].mode == "full"
    assert {c.name for c in train_global.dataset} == set(train_names)
    same = load_brats_federated(demo_dir, 2, 2, seed=0, patch_size=(16, 16, 16), test_fraction=0.3)
    assert [c.name for c in same.test_global.dataset] == test_names


def test_federated_too_many_clients(demo_dir: Path) -> None:
    with pytest.raises(FieldError) as err:
        load_brats_federated(demo_dir, 6, 1, seed=0, patch_size=(16, 16, 16))
    line = explain(err.value)
    assert line.startswith("train_args.client_num_in_total: 6 clients but") and "6 cases" in line and "\n" not in line


@pytest.mark.parametrize(
    "patch_size,eval_size,key",
    [((16, 16), None, "data_args.patch_size"), ((16, 0, 16), None, "data_args.patch_size"),
     ((16, 16, 16), (8, 8), "data_args.eval_size")],
)
def test_federated_bad_shape_fails_before_reading(tmp_path: Path, patch_size, eval_size, key: str) -> None:
    # An empty folder: a shape error must come first, before any case is looked for.
    with pytest.raises(FieldError) as err:
        load_brats_federated(tmp_path, 2, 1, seed=0, patch_size=patch_size, eval_size=eval_size)
    assert explain(err.value).startswith(f"{key}: ") and "three positive integers" in str(err.value)


def test_single_case_error_names_case(demo_dir: Path, tmp_path: Path) -> None:
    case_dir = _copy_case(demo_dir, tmp_path, 2)
    (case_dir / f"{case_dir.name}_seg.nii.gz").unlink()
    with pytest.raises(DataError, match="BraTS2021_SYNTH_00002"):
        load_brats_case(case_dir)
