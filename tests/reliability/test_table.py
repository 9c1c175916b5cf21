"""Every case of the reliability table: one clear error, or a recorded drop with the model as if it never came.

Rows mirror the issue's table of what a new user and a hostile client tried; each
row says what must happen now. Update forgeries are checked against a run that
only ever saw the honest update (bit-identical global model).
"""

from __future__ import annotations

import copy
import dataclasses
import gzip
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from fedml_progfed.cli import main
from fedml_progfed.comm.messages import HEADER_KEY, METRICS_KEY, PAYLOAD_KEY, Message
from fedml_progfed.config import RunConfig
from fedml_progfed.core.staged_model import initialize
from fedml_progfed.data import write_brats_demo
from fedml_progfed.engine import build_client, build_server
from fedml_progfed.errors import InvalidUpdateError
from fedml_progfed.models import build_model
from fedml_progfed.tasks.classification import ClassificationTask
from round_steps import aggregate, broadcast

CPU = torch.device("cpu")


# --------------------------------------------------------------------------- forged and broken updates


def pair(up: str = "float", **progfed):
    config = RunConfig().replace(comm_round=4, client_num_in_total=3, client_num_per_round=2,
                                 progfed={"compression_up": up, **progfed})
    make = lambda: initialize(build_model("convnet", (1, 28, 28), 10, 4), 0)  # noqa: E731
    task = ClassificationTask()
    return build_server(config, make(), task), build_client(config, make(), task)


def upload(server, client, silo: int):
    g = torch.Generator().manual_seed(silo)
    client.receive(broadcast(server, silo))
    client.train([(torch.randn(4, 1, 28, 28, generator=g), torch.randint(0, 10, (4,), generator=g))], CPU, silo)
    return client.upload()


def reheader(wire, **changes):
    message = Message.unpack(wire, "t")
    message.header = dataclasses.replace(message.header, **changes)
    return message.pack()


def replace(wire, name, value):
    forged = dict(wire)
    forged[name] = value
    return forged


def scaled_payload(wire, scale: float):
    """An lq8 payload whose first tensor's max scale is overwritten (CRC restamped, so only the scale is wrong)."""
    import zlib

    data = bytearray(wire[PAYLOAD_KEY].numpy().tobytes())
    struct.pack_into("<f", data, 13 + 4, scale)  # header is 13 bytes; the tensor starts with min f32, max f32
    struct.pack_into("<I", data, 9, zlib.crc32(bytes(data[:9]) + bytes(data[13:])))
    return replace(wire, PAYLOAD_KEY, torch.tensor(list(data), dtype=torch.uint8))


UPDATE_CASES = {
    # case: (codec, forge(good_wire) -> (samples, wire), words the recorded reason contains; "a|b": either)
    "diverged to NaN": ("float", lambda w: (10, replace(w, "heads.0.2.weight", torch.full((10, 32), math.nan))), "contains NaN"),
    "inf values": ("float", lambda w: (10, replace(w, "blocks.0.0.bias", torch.full((32,), math.inf))), "contains NaN or Inf"),
    "float64 1e300 (inf after the cast)": ("float", lambda w: (10, replace(w, "blocks.0.0.bias", torch.full((32,), 1e300, dtype=torch.float64))), "dtype torch.float64"),
    "finite 1e30 values": ("float", lambda w: (10, replace(w, "blocks.0.0.bias", torch.full((32,), 1e30))), "beyond the 1e+06"),
    "wrong stage": ("float", lambda w: (10, reheader(w, plan={**Message.unpack(w, "t").header.plan, "stage": 3})), "plan"),
    "wrong round": ("float", lambda w: (10, reheader(w, round=7)), "claims round 7"),
    "missing key": ("float", lambda w: (10, {k: v for k, v in w.items() if k != "blocks.0.0.weight"}), "missing ['blocks.0.0.weight']"),
    "extra key": ("float", lambda w: (10, replace(w, "blocks.3.1.weight", torch.zeros(64, 576))), "unexpected ['blocks.3.1.weight']"),
    "wrong shape": ("float", lambda w: (10, replace(w, "blocks.0.0.weight", torch.zeros(2, 2))), "has shape (2, 2)"),
    "sample count NaN": ("float", lambda w: (math.nan, w), "reports nan training samples"),
    "sample count inf": ("float", lambda w: (math.inf, w), "reports inf training samples"),
    "sample count 0": ("float", lambda w: (0, w), "reports 0 training samples"),
    "sample count '10'": ("float", lambda w: ("10", w), "reports '10' training samples"),
    "NaN in metadata": ("float", lambda w: (10, replace(w, METRICS_KEY, torch.tensor([10.0, 1.0, math.nan, 0.1], dtype=torch.float64))), "flops = nan"),
    "metadata not numbers": ("float", lambda w: (10, replace(w, METRICS_KEY, torch.tensor([1, 2], dtype=torch.int64))), "metrics are not 4 float64"),
    "garbage header": ("float", lambda w: (10, replace(w, HEADER_KEY, torch.tensor([7, 7, 7], dtype=torch.uint8))), "not valid JSON"),
    "lq8 garbage body": ("lq8", lambda w: (10, replace(w, PAYLOAD_KEY, torch.cat([w[PAYLOAD_KEY][:13], torch.randint(0, 255, (len(w[PAYLOAD_KEY]) - 13,), generator=torch.Generator().manual_seed(0)).to(torch.uint8)]))), "CRC"),
    "lq8 truncated": ("lq8", lambda w: (10, replace(w, PAYLOAD_KEY, w[PAYLOAD_KEY][:100])), "truncated|CRC|length"),
    "lq8 scale 3e38": ("lq8", lambda w: (10, scaled_payload(w, 3e38)), "scale"),
}


@pytest.mark.parametrize("case", list(UPDATE_CASES))
def test_a_bad_update_is_dropped_with_its_client_and_reason_and_leaves_no_trace(case):
    codec, forge, reason = UPDATE_CASES[case]
    honest_only, honest_client = pair(codec)
    aggregate(honest_only, [(10, upload(honest_only, honest_client, 0))])
    server, client = pair(codec)
    good = upload(server, client, 0)
    samples, bad = forge(upload(server, client, 1))
    aggregate(server, [(10, good), (samples, bad)])
    for name, value in honest_only.model.state_dict().items():
        assert torch.equal(server.model.state_dict()[name], value), (case, name)
    dropped = [c for c in server.state.ledger.per_client() if "dropped" in c]
    assert len(dropped) == 1 and server.state.ledger.rows[-1]["dropped_clients"] == 1
    assert any(part in dropped[0]["dropped"] for part in reason.split("|")), dropped[0]["dropped"]
    if case != "garbage header":  # an unreadable header cannot name its sender; the position is named
        assert dropped[0]["client"] == 1


@pytest.mark.parametrize("case", ["diverged to NaN", "sample count inf", "lq8 scale 3e38"])
def test_under_abort_the_round_ends_with_one_error_naming_the_client(case):
    codec, forge, reason = UPDATE_CASES[case]
    server, client = pair(codec, invalid_update="abort")
    before = copy.deepcopy(server.model.state_dict())
    samples, bad = forge(upload(server, client, 1))
    with pytest.raises(InvalidUpdateError, match="client 1's update in round 0"):
        aggregate(server, [(10, upload(server, client, 0)), (samples, bad)])
    assert all(torch.equal(before[k], v) for k, v in server.model.state_dict().items())


def test_one_bad_update_among_three_keeps_the_two_good_ones():
    reference, ref_client = pair()
    aggregate(reference, [(10, upload(reference, ref_client, 0)), (10, upload(reference, ref_client, 2))])
    server, client = pair()
    nan = replace(upload(server, client, 1), "heads.0.2.bias", torch.full((10,), math.nan))
    aggregate(server, [(10, upload(server, client, 0)), (10, nan), (10, upload(server, client, 2))])
    assert all(torch.equal(server.model.state_dict()[k], v) for k, v in reference.model.state_dict().items())
    assert server.state.ledger.rows[-1]["num_clients"] == 2


def test_sample_count_1e18_is_capped_by_progfed_max_samples():
    capped, c1 = pair(max_samples=100)
    fair, c2 = pair()
    aggregate(capped, [(100, upload(capped, c1, 0)), (1e18, upload(capped, c1, 1))])
    aggregate(fair, [(100, upload(fair, c2, 0)), (100, upload(fair, c2, 1))])
    assert all(torch.equal(capped.model.state_dict()[k], v) for k, v in fair.model.state_dict().items())


# --------------------------------------------------------------------------- a new user's inputs


def run_cli(*argv) -> tuple[int, list[str]]:
    import io
    from contextlib import redirect_stderr

    err = io.StringIO()
    with redirect_stderr(err):
        code = main(list(argv))
    return code, [line for line in err.getvalue().splitlines() if line.strip()]


def test_typo_in_a_fedml_key_warns_with_the_closest_key(small_config, tmp_path):
    code, err = run_cli("run", "--cf", str(small_config), "--out", str(tmp_path / "r"), "--quiet",
                        "--set", "train_args.comm_rounds=3", "train_args.comm_round=4")
    assert code == 0
    assert err.count("[fedml_progfed] train_args.comm_rounds: unknown; did you mean comm_round?") == 1, err


@pytest.mark.parametrize(
    "overrides,line",
    [
        (["train_argz.comm_round=3"], "error: train_argz.comm_round: comm_round belongs in the train_args section"),
        (["data_args.comm_round=3"], "error: data_args.comm_round: comm_round belongs in the train_args section"),
        (["common_args.random_seed=-1"], "error: common_args.random_seed: -1 is not allowed; use a non-negative integer"),
        (["progfed_args.progfed_invalid_update=ignore"], "error: progfed_args.progfed_invalid_update: 'ignore' is not allowed"),
    ],
)
def test_config_mistakes_are_one_error_line(small_config, tmp_path, overrides, line):
    code, err = run_cli("run", "--cf", str(small_config), "--out", str(tmp_path / "r"), "--quiet", "--set", *overrides)
    assert code == 2 and len(err) == 1 and err[0].startswith(line), err


def test_out_is_checked_before_any_training(small_config, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    code, err = run_cli("run", "--cf", str(small_config), "--out", str(a_file), "--quiet")
    assert code == 2 and err == [f"error: --out: {a_file} is a file; give a folder for the run's results"]
    code, err = run_cli("run", "--cf", str(small_config), "--out", "/proc/no-such-place/run", "--quiet")
    assert code == 2 and len(err) == 1 and err[0].startswith("error: --out: cannot write into /proc/no-such-place/run")
    out = tmp_path / "run"
    assert run_cli("run", "--cf", str(small_config), "--out", str(out), "--quiet", "--set", "train_args.comm_round=4")[0] == 0
    before = (out / "model.safetensors").read_bytes()
    code, err = run_cli("run", "--cf", str(small_config), "--out", str(out), "--quiet", "--set", "train_args.comm_round=4")
    assert code == 2 and "--overwrite" in err[0] and (out / "model.safetensors").read_bytes() == before
    assert run_cli("run", "--cf", str(small_config), "--out", str(out), "--overwrite", "--quiet",
                   "--set", "train_args.comm_round=4", "common_args.random_seed=1")[0] == 0
    assert (out / "model.safetensors").read_bytes() != before


def test_idx_header_whose_dimensions_overflow_is_one_error(small_config, tmp_path, fmnist_fixture):
    folder = tmp_path / "fm"
    folder.mkdir()
    for path in Path(fmnist_fixture).iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    header = struct.pack(">IIII", 0x00000803, 2**31, 2**31, 2**31)  # 2^93 bytes: int64 would overflow
    with gzip.open(folder / "train-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(header + b"\0" * 16)
    code, err = run_cli("run", "--cf", str(small_config), "--out", str(tmp_path / "r"), "--quiet",
                        "--set", f"data_args.data_cache_dir={folder}")
    assert code == 2 and len(err) == 1 and "train-images-idx3-ubyte.gz" in err[0] and "truncated" in err[0]


def test_one_nan_voxel_in_a_brats_case_is_one_error_naming_the_case(tmp_path):
    import nibabel as nib

    from fedml_progfed.data.brats import load_brats_case

    cases = write_brats_demo(tmp_path, 1, shape=(16, 16, 16), seed=0)
    flair = next(Path(cases[0]).glob("*_flair.nii*"))
    image = nib.load(str(flair))
    data = np.asarray(image.get_fdata(), dtype=np.float32)
    data[3, 4, 5] = np.nan
    nib.save(nib.Nifti1Image(data, image.affine), str(flair))
    with pytest.raises(Exception) as err:
        load_brats_case(cases[0])
    assert "1 NaN or infinite voxels" in str(err.value) and Path(cases[0]).name in str(err.value)
