"""Compression spec strings (``lq8+sp25+ef``): the grammar, its registry of parts, and parsing.

A spec is ``+``-joined parts in any order, at most one per *slot* (values,
rotation, sparsifier, memory). Each stage module registers the part(s) it
understands here with :func:`register_part`, and any combination rule it needs
with :func:`register_rule`, so the grammar grows with the codecs and this
module names none of them.

This layer knows nothing about configuration keys: a bad spec raises
:class:`SpecError` saying what is wrong and what is valid, and the
configuration layer adds the key it came from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from fedml_progfed.core.registry import Registry


class SpecError(ValueError):
    """A compression spec string that cannot be used; the message lists the valid forms but names no config key."""


# Canonical order of the parts in CompressionSpec.text; a part's slot must be one of these.
SLOTS = ("values", "rotation", "sparsifier", "memory")


@dataclass(frozen=True)
class CompressionSpec:
    """A parsed compression spec (see :mod:`fedml_progfed.comm.codecs` for the string forms).

    Attributes
    ----------
    bits
        Bits per transmitted value: 32 for float32, else 8, 4 or 2 (linear quantization).
    rotate
        Randomized Hadamard rotation before quantizing (Suresh et al. 2017).
    sparsifier
        ``None``, ``"random"`` (unbiased, Konečný et al. 2016) or ``"topk"`` (biased,
        Stich et al. 2018): a name in the sparsifier registry.
    keep_percent
        Share of entries kept by the sparsifier, 1..99 (100 without one).
    error_feedback
        Compress ``update + residual`` and keep the new residual
        (:class:`~fedml_progfed.comm.codecs.ErrorFeedback`).
    """

    bits: int = 32
    rotate: bool = False
    sparsifier: str | None = None
    keep_percent: int = 100
    error_feedback: bool = False

    @property
    def quantized(self) -> bool:
        """True for ``lq*`` specs."""
        return self.bits != 32

    @property
    def lossless(self) -> bool:
        """True when decode(encode(x)) == x exactly for float32 input."""
        return not self.quantized and self.sparsifier is None

    @property
    def text(self) -> str:
        """Canonical spec string, e.g. ``lq8+rot+sp25+ef`` (each registered part renders itself)."""
        parts = list(_parts())
        rendered = (part.render(self) for slot in SLOTS for part in parts if part.slot == slot)
        return "+".join(r for r in rendered if r) or "float"

    def kept(self, n_values: int) -> int:
        """Entries a tensor of ``n_values`` keeps: ceil(keep% * n / 100), at least one when n > 0."""
        # integer arithmetic: 0.1 * 1000 is 100.00000000000001 in floating point
        return (self.keep_percent * n_values + 99) // 100

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class SpecPart:
    """One ``+``-separated part of a spec string.

    Attributes
    ----------
    form
        How the part is written in messages and docs (``"lq8 | lq4 | lq2"``); its registry name.
    pattern
        The lower-case token it accepts (full match).
    slot
        The slot it fills (one of :data:`SLOTS`); a spec has at most one part per slot.
    fields
        :class:`CompressionSpec` fields set by a matched token.
    render
        The part's canonical text for a spec, or ``""`` when the spec does not use it.
    """

    form: str
    pattern: re.Pattern
    slot: str
    fields: Callable[[re.Match], dict]
    render: Callable[[CompressionSpec], str]


@dataclass(frozen=True)
class SpecRule:
    """A combination that parses but means nothing: ``broken(spec)`` is true for it, ``reason`` says why."""

    broken: Callable[[CompressionSpec], bool]
    reason: str


SPEC_PARTS: Registry[SpecPart] = Registry("compression spec part")
SPEC_RULES: Registry[SpecRule] = Registry("compression spec rule")


def register_part(
    form: str,
    pattern: str,
    slot: str,
    fields: Callable[[re.Match], dict],
    render: Callable[[CompressionSpec], str],
) -> SpecPart:
    """Add a part to the grammar (see :class:`SpecPart`); a form registered twice is caught at import."""
    if slot not in SLOTS:
        raise ValueError(f"compression spec part {form!r}: slot {slot!r} is not one of {SLOTS}")
    return SPEC_PARTS.add(form, SpecPart(form, re.compile(pattern), slot, fields, render))


def register_rule(name: str, broken: Callable[[CompressionSpec], bool], reason: str) -> SpecRule:
    """Add a combination rule: specs for which ``broken`` is true are refused with ``reason``."""
    return SPEC_RULES.add(name, SpecRule(broken, reason))


def _parts() -> list[SpecPart]:
    return [part for _, part in SPEC_PARTS.items()]


def valid_forms() -> str:
    """The accepted spec forms, for error messages and docs."""
    forms = ", ".join(part.form for part in _parts())
    return f"parts {forms} joined by '+' (at most one of each kind), e.g. float, lq8, lq4+topk10, lq8+sp25+ef, lq8+rot"


def parse_spec(text: str) -> CompressionSpec:
    """Parse a spec string such as ``lq8+sp25`` into a :class:`CompressionSpec`.

    Parameters
    ----------
    text
        The spec; case and spaces around parts are ignored.

    Raises
    ------
    SpecError
        For an unknown part, two parts of the same slot, or a meaningless combination. The
        message names the problem and the valid forms; the caller adds where the text came from.
    """
    if not isinstance(text, str) or not text.strip():
        raise SpecError(f"expected a compression spec string, got {text!r}; valid: {valid_forms()}")
    fields: dict = {}
    slots: dict[str, str] = {}
    for token in (t.strip() for t in text.strip().lower().split("+")):
        found = [(part, m) for part in _parts() if (m := part.pattern.fullmatch(token))]
        if not found:
            raise SpecError(f"unknown compression part {token!r} in {text!r}; valid: {valid_forms()}")
        part, match = found[0]
        if part.slot in slots:
            raise SpecError(f"{text!r} has two {part.slot} parts ({slots[part.slot]!r} and {token!r}); valid: {valid_forms()}")
        slots[part.slot] = token
        fields.update(part.fields(match))
    spec = CompressionSpec(**fields)
    for _, rule in SPEC_RULES.items():
        if rule.broken(spec):
            raise SpecError(f"{text!r}: {rule.reason}; valid: {valid_forms()}")
    return spec


def as_spec(spec: CompressionSpec | str) -> CompressionSpec:
    """``spec`` itself, or the parsed string."""
    return spec if isinstance(spec, CompressionSpec) else parse_spec(spec)


def information_bits(spec: CompressionSpec | str, n_values: int) -> int:
    """Information-theoretic payload of ``n_values`` under ``spec``: bits per value times values sent.

    With sparsification only the kept values count (positions are overhead), so
    ``encoded bytes * 8 / information_bits`` is the wire efficiency (1.0 is ideal;
    ProgFed Table 5 reports these ratios as 25 % for LQ-8, 6.25 % for LQ-8+SP-25, ...).
    """
    spec = as_spec(spec)
    return spec.bits * spec.kept(n_values)
