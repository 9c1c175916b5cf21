"""Error feedback (Stich et al. 2018; Karimireddy et al. 2019): residuals, recovery of the sum, growth, checkpoints."""

import torch

from fedml_progfed.comm.codecs import ErrorFeedback, decode, encode


def test_error_feedback_residual_and_recovery_of_the_sum():
    x = torch.randn(500, generator=torch.Generator().manual_seed(5))
    ef = ErrorFeedback()
    p1 = ef.compress({"w": x}, ["w"], "topk10", 1)
    d1 = decode(p1, {"w": (500,)}, ["w"], "topk10", 1)["w"]
    r1 = x - d1
    assert torch.equal(ef.state_dict()["w"], r1)
    p2 = ef.compress({"w": x}, ["w"], "topk10", 2)
    d2 = decode(p2, {"w": (500,)}, ["w"], "topk10", 2)["w"]
    assert torch.allclose(ef.state_dict()["w"], x + r1 - d2)
    assert torch.equal(d2, torch.where(d2 != 0, x + r1, torch.zeros(())))  # top-k of the corrected update

    # over many rounds the decoded sum tracks the input sum (it differs by the last residual only)
    rounds = 80
    ef, sent, plain = ErrorFeedback(), torch.zeros(500), torch.zeros(500)
    inputs = [torch.randn(500, generator=torch.Generator().manual_seed(100 + t)) + 0.2 for t in range(rounds)]
    for t, xt in enumerate(inputs):
        sent += decode(ef.compress({"w": xt}, ["w"], "topk10", t), {"w": (500,)}, ["w"], "topk10", t)["w"]
        plain += decode(encode({"w": xt}, ["w"], "topk10", t), {"w": (500,)}, ["w"], "topk10", t)["w"]
    total = torch.stack(inputs).sum(0)
    assert torch.allclose(sent + ef.residuals["w"], total, atol=1e-3)
    rel = lambda s: float((s - total).norm() / total.norm())  # noqa: E731
    assert rel(sent) < 0.35 and rel(sent) < rel(plain) / 2


def test_error_feedback_follows_growth_and_checkpoints():
    ef = ErrorFeedback()
    ef.compress({"block1": torch.randn(50), "head1": torch.randn(10)}, ["block1", "head1"], "lq2", 0)
    kept = ef.state_dict()["block1"].clone()
    head1 = ef.state_dict()["head1"].clone()
    new = {"block1": torch.zeros(50), "block2": torch.randn(40), "head2": torch.randn(10)}
    payload = ef.compress(new, ["block1", "block2", "head2"], "lq2", 1)
    assert set(ef.residuals) == {"block1", "head1", "block2", "head2"}
    assert torch.equal(ef.residuals["head1"], head1)  # not sent this round: kept as it was
    out = decode(payload, {k: tuple(v.shape) for k, v in new.items()}, list(new), "lq2", 1)
    assert torch.allclose(ef.residuals["block1"], kept - out["block1"])  # surviving residual was added
    assert torch.allclose(ef.residuals["block2"], new["block2"] - out["block2"])  # new name starts at zero
    clone = ErrorFeedback()
    clone.load_state_dict(ef.state_dict())
    assert ef.compress(new, list(new), "lq2", 2) == clone.compress(new, list(new), "lq2", 2)


def test_a_reshaped_tensor_starts_from_a_zero_residual():
    ef = ErrorFeedback()
    ef.compress({"w": torch.randn(6)}, ["w"], "lq2", 0)
    x = torch.randn(2, 3)
    payload = ef.compress({"w": x}, ["w"], "lq2", 1)
    assert payload == encode({"w": x}, ["w"], "lq2", 1)  # no residual of the old shape added


def test_the_residual_of_an_unsent_name_survives_and_is_applied_when_it_is_sent_again():
    # ProgFed warm-up: round 0 sends a and b, round 1 only a, round 2 a and b again
    g = torch.Generator().manual_seed(7)
    a0, b0, a1, a2, b2 = (torch.randn(200, generator=g) for _ in range(5))
    ef = ErrorFeedback()
    ef.compress({"a": a0, "b": b0}, ["a", "b"], "topk10", 0)
    owed_b = ef.residuals["b"].clone()
    assert owed_b.abs().sum() > 0  # top-k dropped 90 % of b
    ef.compress({"a": a1}, ["a"], "topk10", 1)
    assert torch.equal(ef.residuals["b"], owed_b)  # b was not sent: its residual is intact
    p2 = ef.compress({"a": a2, "b": b2}, ["a", "b"], "topk10", 2)
    sent_b = decode(p2, {"a": (200,), "b": (200,)}, ["a", "b"], "topk10", 2)["b"]
    # what b sends in round 2 is the top-k of b2 + the residual owed since round 0
    corrected = b2 + owed_b
    assert torch.equal(sent_b, decode(encode({"b": corrected}, ["b"], "topk10", 2), {"b": (200,)}, ["b"], "topk10", 2)["b"])
    assert not torch.equal(sent_b, decode(encode({"b": b2}, ["b"], "topk10", 2), {"b": (200,)}, ["b"], "topk10", 2)["b"])
    assert torch.allclose(ef.residuals["b"], b2 + owed_b - sent_b)
    # and everything given for b is delivered up to the current residual
    sent_b0 = b0 - owed_b
    assert torch.allclose(sent_b0 + sent_b + ef.residuals["b"], b0 + b2, atol=1e-6)
