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
    new = {"block1": torch.zeros(50), "block2": torch.randn(40), "head2": torch.randn(10)}
    payload = ef.compress(new, ["block1", "block2", "head2"], "lq2", 1)
    assert set(ef.residuals) == {"block1", "block2", "head2"}  # the old head is dropped
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
