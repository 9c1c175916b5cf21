"""Only the configuration layer knows YAML section and key names (errors.py, DESIGN.md "Configuration").

Layers below it name dataclass fields (``comm_round``, ``progfed.min_clients``, ``{field}`` in an error's
text); :func:`fedml_progfed.config.explain` turns them into ``section.key``.
"""

from __future__ import annotations

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fedml_progfed"
LOWER_LAYERS = ("algorithms", "core", "engine", "comm", "models", "privacy")
YAML_KEY = re.compile(r"\b[a-z]+_args\.")


def test_no_yaml_section_key_below_the_config_layer():
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}"
        for layer in LOWER_LAYERS
        for path in sorted((PACKAGE / layer).rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if YAML_KEY.search(line)
    ]
    assert not found, "name the field, not the YAML key:\n" + "\n".join(found)


def test_the_check_sees_a_yaml_key():
    assert YAML_KEY.search('raise FieldError("x", "set train_args.comm_round")')
    assert not YAML_KEY.search('raise FieldError("comm_round", "raise {comm_round}")')
