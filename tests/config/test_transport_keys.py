"""Our transport keys may sit under ``comm_args`` (TLS files, allow_insecure); every other ``progfed_*`` key may not."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fedml_progfed.config import explain, flatten, key_of, load_config
from fedml_progfed.config.schema import RunConfig
from fedml_progfed.errors import ConfigError, FieldError

ROOT = Path(__file__).resolve().parents[2]
TLS = {"progfed_tls_ca": "certs/ca.crt", "progfed_tls_cert": "certs/rank-{rank}.crt", "progfed_tls_key": "certs/rank-{rank}.key"}


def write(tmp_path: Path, sections: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(sections))
    return path


def quickstart() -> dict:
    return yaml.safe_load((ROOT / "config" / "quickstart.yaml").read_text())


def test_tls_keys_under_comm_args_reach_progfed_config_without_a_warning(tmp_path, caplog):
    sections = quickstart()
    sections["comm_args"].update(TLS, progfed_allow_insecure=True)
    with caplog.at_level("WARNING", logger="fedml_progfed"):
        _, config = load_config(write(tmp_path, sections))
    p = config.progfed
    assert (p.tls_ca, p.tls_cert, p.tls_key, p.allow_insecure) == (*TLS.values(), True)
    assert "comm_args" not in caplog.text


def test_tls_keys_under_progfed_args_are_the_same_fields():
    under_comm = RunConfig.from_flat(flatten({"comm_args": dict(TLS)}))
    under_ours = RunConfig.from_flat(flatten({"progfed_args": dict(TLS)}))
    assert under_comm == under_ours and under_comm.progfed.tls_cert == TLS["progfed_tls_cert"]


def test_dropout_and_deadline_are_read_from_progfed_args(tmp_path):
    _, config = load_config(ROOT / "config" / "quickstart.yaml",
                            ["progfed_args.progfed_client_dropout=0.25", "progfed_args.progfed_round_deadline_s=12.5"])
    assert (config.progfed.client_dropout, config.progfed.round_deadline_s) == (0.25, 12.5)


@pytest.mark.parametrize("key", ["progfed_client_dropout", "progfed_round_deadline_s", "progfed_min_clients"])
def test_other_progfed_keys_under_comm_args_are_still_misplaced(key):
    with pytest.raises(ConfigError, match=rf"comm_args\.{key}: progfed_\* keys belong in the progfed_args section"):
        flatten({"comm_args": {key: 1}})


def test_an_unknown_tls_key_is_the_unknown_key_error():
    with pytest.raises(FieldError) as caught:
        load_config(ROOT / "config" / "quickstart.yaml", ["progfed_args.progfed_tls_crt=x.crt"])
    assert caught.value.field == "progfed.tls_crt"
    line = explain(caught.value)
    assert line.startswith("progfed_args.progfed_tls_crt: unknown key") and "progfed_tls_cert" in line
    with pytest.raises(ConfigError, match=r"comm_args\.progfed_tls_crt: progfed_\* keys belong in the progfed_args"):
        load_config(ROOT / "config" / "quickstart.yaml", ["comm_args.progfed_tls_crt=x.crt"])


def test_errors_name_the_transport_keys_under_comm_args():
    assert key_of("progfed.tls_ca") == "comm_args.progfed_tls_ca"
    assert key_of("progfed.allow_insecure") == "comm_args.progfed_allow_insecure"
    assert key_of("progfed.round_deadline_s") == "progfed_args.progfed_round_deadline_s"
    assert key_of("progfed.client_dropout") == "progfed_args.progfed_client_dropout"


def test_a_bad_dropout_explains_to_one_line():
    with pytest.raises(FieldError) as caught:
        load_config(ROOT / "config" / "quickstart.yaml", ["progfed_args.progfed_client_dropout=1"])
    assert explain(caught.value) == ("progfed_args.progfed_client_dropout: 1.0 is not allowed; use a probability in "
                                     "[0, 1) (1 would silence every client of every round)")
