"""The guard's rules, one by one: what a party drops before FedML sees it, and what it lets through."""

from __future__ import annotations

from fedml_progfed.comm.envelope import Envelope
from fedml_progfed.fedml_plugin.grpc_guard import Guard

RANKS = (0, 1, 2)


def env(kind=3, sender=1, receiver=0, run="job", round_=4, client=0, **params) -> Envelope:
    return Envelope(kind, sender, receiver, run, round_, {"stage": 1}, client, {"msg_type": kind, **params})


def server(authenticated=False) -> Guard:
    guard = Guard(0, RANKS, "job", authenticated)
    guard.asked(1, 4, 0, final=False)
    guard.asked(2, 4, 1, final=False)
    return guard


def test_the_update_that_was_asked_for_passes_once():
    guard = server()
    assert guard.judge(env(), None) is None
    assert "second update for round 4" in guard.judge(env(), None)
    assert set(guard.pending()) == {2}


def test_another_run_another_receiver_or_an_unknown_sender_is_dropped():
    guard = server()
    assert "run 'other'" in guard.judge(env(run="other"), None)
    assert "addressed to rank 2" in guard.judge(env(receiver=2), None)
    assert "sender 7" in guard.judge(env(sender=7), None)
    assert "sender 0" in guard.judge(env(sender=0), None)  # the server's own rank
    assert guard.pending().keys() == {1, 2}  # nothing dropped counted as an answer


def test_replays_late_answers_and_silos_not_given_are_dropped():
    guard = server()
    assert "round 3 (silo 0)" in guard.judge(env(round_=3), None)  # a replay of last round
    assert "silo 1" in guard.judge(env(client=1), None)  # rank 1 claiming rank 2's silo
    fresh = Guard(0, RANKS, "job", False)
    assert "sent no model" in fresh.judge(env(), None)


def test_with_tls_the_certificate_must_name_the_claimed_rank():
    guard = server(authenticated=True)
    assert "certificate of rank 2" in guard.judge(env(sender=1), 2)
    assert "no rank certificate" in guard.judge(env(sender=1), None)
    assert guard.judge(env(sender=1), 1) is None


def test_finished_only_after_the_final_model_and_no_update_answers_it():
    guard = server()
    assert "before it was sent the final model" in guard.judge(env(kind=5, client_status="FINISHED"), None)
    assert guard.judge(env(kind=5, client_status="ONLINE"), None) is None  # a silo registering again
    guard.asked(1, 9, 0, final=True)
    assert "final model" in guard.judge(env(round_=9), None)
    assert guard.judge(env(kind=5, client_status="FINISHED", round_=None, client=None), None) is None


def test_a_client_hears_only_the_server_and_never_an_older_model():
    guard = Guard(1, RANKS, "job", False)
    assert guard.judge(env(kind=2, sender=0, receiver=1, round_=5), None) is None
    assert "older than round 5" in guard.judge(env(kind=2, sender=0, receiver=1, round_=4), None)
    assert "only the server" in guard.judge(env(kind=2, sender=2, receiver=1), None)
    assert "not one the server sends" in guard.judge(env(kind=3, sender=0, receiver=1), None)
    assert "not one a client sends" in server().judge(env(kind=2), None)


def test_the_deadline_answers_only_for_ranks_that_did_not_answer():
    guard = server()
    assert guard.judge(env(), None) is None
    assert not guard.answer_for(1) and guard.answer_for(2)
    assert "after the round deadline left it out" in guard.judge(env(sender=2, client=1), None)
    asked = guard.asked_in(4)
    assert asked[2].silent and not asked[1].silent and all(a.answered for a in asked.values())
