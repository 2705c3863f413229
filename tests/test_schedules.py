"""Tests of the pure part of pipeline.py: schedules, validator, simulator, rendering."""

import subprocess
import sys
from pathlib import Path

import pytest

import pipeline as P
from pipeline import (BWD_INPUT, BWD_WEIGHT, FWD, RECV_ACT, RECV_GRAD, SEND_ACT, SEND_GRAD, Costs,
                      Op, ScheduleError)

ROOT = Path(__file__).resolve().parent.parent


def ops(text: str) -> list[Op]:
    """'F0 >a0 <g0 B0 W0' -> op list, the same labels the grids print."""
    kinds = {label: kind for kind, label in enumerate(P.LABELS)}
    words = text.split()
    return [Op(kinds[word.rstrip("0123456789")], int(word.lstrip("FBW<>ag"))) for word in words]


def rejected(ranks: list[list[Op]], micro: int, training: bool = True) -> str:
    with pytest.raises(ScheduleError) as e:
        P.validate(ranks, micro, training)
    return str(e.value)

# -----------------------------------------------------------------------------
# schedules through the validator


@pytest.mark.parametrize("name", list(P.SCHEDULES))
def test_every_schedule_validates(name):
    for S in range(1, 7):
        for m in range(1, 13):
            held = P.validate(P.schedule(name, S, m), m).peak_held
            # 1F1B's textbook count S - r, plus one on the later ranks: the
            # gradient send that follows W shares a group with the next
            # activation's receive, so two micro-batches overlap there
            one_f_one_b = [min(S - r + (r > 0), m) for r in range(S)]
            if name == "gpipe":
                assert held == [m] * S, (S, m)
            elif name == "1f1b":
                assert held == one_f_one_b, (S, m)
            else:
                # deferred Ws keep every rank at the cap that 1F1B only reaches on rank 0
                assert max(held) == max(one_f_one_b), (S, m)
                assert held == [min(S, m)] * S, (S, m)


def test_ops_are_the_executor_codes():
    assert (FWD, BWD_INPUT, BWD_WEIGHT, SEND_ACT, RECV_ACT, SEND_GRAD, RECV_GRAD) == tuple(range(7))


def test_one_stage_is_forward_backward_weight_per_micro_batch():
    for name in ("1f1b", "zb-h1"):
        assert P.schedule(name, 1, 3) == [ops("F0 B0 W0 F1 B1 W1 F2 B2 W2")]
    assert P.schedule("gpipe", 1, 2) == [ops("F0 F1 B0 W0 B1 W1")]


def test_one_f_one_b_steady_state_pairs_send_with_receive():
    # the middle rank of 1F1B: after a forward, send it and receive a gradient at once
    assert P.schedule("1f1b", 3, 3)[1] == ops("<a0 F0 >a0 <a1 F1 >a1 <g0 B0 W0 <a2 >g0 F2 >a2 "
                                              "<g1 B1 W1 >g1 <g2 B2 W2 >g2")


def test_zb_h1_defers_weight_gradients():
    last = P.schedule("zb-h1", 4, 8)[3]
    computes = [P.label(op) for op in last if op.kind in P.COMPUTE]
    assert computes[:9] == "F0 B0 F1 B1 F2 B2 F3 B3 W0".split()
    assert computes[-4:] == "W4 W5 W6 W7".split()


def test_forward_only():
    for S in range(1, 6):
        for m in range(1, 6):
            ranks = P.forward_only(S, m)
            assert {op.kind for r in ranks for op in r} <= {FWD, SEND_ACT, RECV_ACT}
            P.validate(ranks, m, training=False)
    # a middle rank posts [SEND_ACT i, RECV_ACT i+1] together: two buffers in flight
    assert P.validate(P.forward_only(4, 3), 3, training=False).peak_held == [1, 2, 2, 1]
    assert "BWD_INPUT mb 0 is missing" in rejected(P.forward_only(2, 2), 2)
    assert "in a forward-only schedule" in rejected(P.schedule("1f1b", 2, 2), 2, training=False)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown schedule"):
        P.schedule("interleaved", 4, 8)
    with pytest.raises(ValueError, match="at least 1"):
        P.schedule("1f1b", 0, 8)

# -----------------------------------------------------------------------------
# the validator rejects broken lists, says why and shows where


def test_missing_receive():
    ranks = P.schedule("1f1b", 3, 3)
    ranks[1].remove(Op(RECV_GRAD, 1))
    message = rejected(ranks, 3)
    assert message.startswith("rank 2: SEND_GRAD mb 1 has no matching RECV_GRAD on rank 1\n")
    assert "[>g1]" in message
    assert sum(line.startswith("rank ") for line in message.splitlines()[1:]) == 3


def test_swapped_send_order():
    ranks = [ops("F0 F1 >a1 >a0 <g0 B0 W0 <g1 B1 W1"), P.schedule("gpipe", 2, 2)[1]]
    message = rejected(ranks, 2)
    assert ("rank 0 -> rank 1: message 0 is SEND_ACT mb 1 but rank 1 receives RECV_ACT mb 0"
            in message)
    assert "[>a1]" in message and "[<a0]" in message


def test_backward_before_forward():
    ranks = P.schedule("1f1b", 2, 2)
    assert ranks[1][:3] == ops("<a0 F0 B0")
    ranks[1][1:3] = ops("B0 F0")
    message = rejected(ranks, 2)
    assert message.startswith("rank 1: BWD_INPUT mb 0 before FWD mb 0\n")
    assert "[B0]" in message


def test_weight_gradients_out_of_order():
    message = rejected([ops("F0 F1 F2 B0 B1 W1 W0 B2 W2")], 3)
    assert message.startswith("rank 0: BWD_WEIGHT mb 0 after BWD_WEIGHT mb 1")
    assert "[W0]" in message


def test_input_gradients_out_of_order():
    message = rejected([ops("F0 F1 B1 W1 B0 W0")], 2)
    assert message.startswith("rank 0: BWD_INPUT mb 0 after BWD_INPUT mb 1")


def test_deadlock_between_groups_that_receive_first():
    # rank 0 waits for gradient 0 before sending activation 1; rank 1 waits for
    # activation 1 before sending gradient 0
    rank1 = ops("<a0 F0 <a1 F1 B0 W0 >g0 B1 W1 >g1")
    message = rejected([ops("F0 >a0 F1 <g0 B0 W0 >a1 <g1 B1 W1"), rank1], 2)
    assert message.startswith("deadlock")
    assert "rank 0 waits at position 3 (RECV_GRAD mb 0) for rank 1 to reach position 6" in message
    assert "rank 1 waits at position 2 (RECV_ACT mb 1) for rank 0 to reach position 6" in message
    assert "[<g0]" in message and "[<a1]" in message
    # the same messages, but rank 0 posts its send and its receive as one group
    P.validate([ops("F0 >a0 F1 >a1 <g0 B0 W0 <g1 B1 W1"), rank1], 2)


@pytest.mark.parametrize("ranks, micro, expected", [
    ([ops("F0 F0 B0 W0")], 1, "rank 0: FWD mb 0 appears twice"),
    ([ops("F0 B0")], 1, "rank 0: BWD_WEIGHT mb 0 is missing"),
    ([ops("F0 B0 W0 F1 B1 W1")], 1, "rank 0: FWD mb 1 is out of range for 1 micro-batches"),
    ([ops("F0 >a0 B0 W0")], 1, "rank 0: SEND_ACT mb 0 talks to rank 1, which does not exist"),
    ([ops("<a0 F0 B0 W0")], 1, "rank 0: RECV_ACT mb 0 talks to rank -1, which does not exist"),
    ([ops("F0 <g0 B0 W0"), ops("<a0 F0 B0 W0 >g0")], 1,
     "rank 1: RECV_ACT mb 0 has no matching SEND_ACT on rank 0"),
    ([ops(">a0 F0 <g0 B0 W0"), ops("<a0 F0 B0 W0 >g0")], 1,
     "rank 0: SEND_ACT mb 0 before FWD mb 0"),
    ([ops("F0 >a0 B0 <g0 W0"), ops("<a0 F0 B0 W0 >g0")], 1,
     "rank 0: BWD_INPUT mb 0 before RECV_GRAD mb 0"),
])
def test_other_mistakes(ranks, micro, expected):
    assert rejected(ranks, micro).startswith(expected + "\n")

# -----------------------------------------------------------------------------
# simulator


CASES = [(1, 1), (1, 5), (2, 1), (2, 4), (3, 5), (4, 4), (4, 8), (5, 3), (6, 12), (6, 7)]


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("S, m", CASES)
def test_gpipe_and_1f1b_bubble(name, S, m):
    t = P.simulate(P.schedule(name, S, m), Costs(f=1, b=1, w=1, comm=0))
    assert t.step_time == 3 * (m + S - 1)
    assert t.bubble_fraction == pytest.approx((S - 1) / (m + S - 1))
    assert t.idle == pytest.approx(t.bubble_fraction * S * t.step_time)


@pytest.mark.parametrize("S, m", CASES)
def test_zb_h1_bubble_is_a_third_of_1f1b(S, m):
    zb = P.simulate(P.schedule("zb-h1", S, m), Costs())
    baseline = P.simulate(P.schedule("1f1b", S, m), Costs())
    if m >= S:  # the paper's (S-1)(F+B-W) against 1F1B's (S-1)(F+B+W)
        assert zb.idle * 3 == pytest.approx(baseline.idle)
        assert zb.step_time == 3 * m + S - 1
    else:
        assert zb.idle <= baseline.idle


def test_communication_time_and_per_rank_costs():
    # rank 0: F [0,1], then posts >a0 and <g0 as one group (nothing computes between
    # them); the activation lands at 1.5; rank 1: F B W until 4.5; the gradient
    # lands at 5; rank 0: B W until 7
    t = P.simulate(P.schedule("gpipe", 2, 1), Costs(comm=0.5))
    assert t.step_time == 7
    assert [(P.label(s.op), s.start, s.end) for s in t.rows[0]] == [
        ("F0", 0, 1), (">a0", 1, 1.5), ("<g0", 1, 5), ("B0", 5, 6), ("W0", 6, 7)]
    slow_last_forward = P.simulate(P.schedule("gpipe", 2, 1), Costs(f=[1, 3]))
    assert slow_last_forward.step_time == 8
    assert slow_last_forward.busy == 8


def test_fsdp_layers_cost_their_share_and_gathers_run_on_the_comm_thread():
    """1 stage x 2 replicas, --zero 3, one micro-batch, 2 layers, by hand. F
    costs 4, B 8, W 4 for the stage, layer 0 a quarter of it and layer 1 three
    quarters; a collective 1. The comm thread gathers the whole tensors [0,1],
    layer 0 [1,2] and (prefetched) layer 1 [2,3]; F0.0 waits for its gather:
    [2,3]; F0.1 [3,6]; the backward's gathers, posted at 6, run [6,7] and
    [7,8]; B0.1 waits for layer 1's: [7,13]; B0.0 [13,15]; W0.1 [15,18], then
    its reduce-scatter [18,19] beside W0.0 [18,19]; layer 0's [19,20], the
    whole tensors' [20,21], which ends the step. Busy 16 of 21 per rank."""
    ranks = P.grid_schedule("1f1b", 1, 2, 1, [3], 3)[0]
    costs = Costs(f=4, b=8, w=4, collective=1, shares=[[0.25, 0.75]] * 2)
    t = P.validate_grid(ranks, 1, 1, buckets=[3], zero=3, costs=costs).timeline
    for row in t.rows:
        assert [(P.label(s.op), s.start, s.end) for s in row] == [
            ("AG2", 0, 1), ("AG0", 1, 2), ("AG1", 2, 3), ("F0.0", 2, 3), ("FR0", 3, 3), ("F0.1", 3, 6),
            ("FR1", 6, 6), ("AG1", 6, 7), ("AG0", 7, 8), ("B0.1", 7, 13), ("FR1", 13, 13), ("B0.0", 13, 15),
            ("FR0", 15, 15), ("W0.1", 15, 18), ("RS1", 18, 19), ("W0.0", 18, 19), ("RS0", 19, 20),
            ("RS2", 20, 21), ("FR2", 19, 19)]
    assert t.step_time == 21 and t.bubble_fraction == pytest.approx(5 / 21)
    # free collectives and equal shares: the per-layer ops add up to the whole-stage ops, no bubble
    free = P.validate_grid(ranks, 1, 1, buckets=[3], zero=3, costs=Costs(f=4, b=8, w=4)).timeline
    assert free.step_time == 16 and free.bubble_fraction == 0


def test_layer_shares_put_the_embedding_on_layer_0_and_the_head_on_the_last():
    cfg = dict(channels=4, padded_vocab_size=64, num_layers=4)
    embed, layer, head = P.stage_costs(cfg, 8)
    shares = P.layer_shares(cfg, [(0, 2), (2, 4)], 8)
    assert shares[0] == pytest.approx([(embed + layer) / (embed + 2 * layer), layer / (embed + 2 * layer)])
    assert shares[1] == pytest.approx([layer / (2 * layer + head), (layer + head) / (2 * layer + head)])


def test_validate_reports_the_unit_cost_timeline():
    ranks = P.schedule("zb-h1", 3, 4)
    assert P.validate(ranks, 4).timeline == P.simulate(ranks, Costs())

# -----------------------------------------------------------------------------
# rendering and the command line


def test_render():
    text = P.render(P.schedule("zb-h1", 4, 8), width=120)
    rows = [line for line in text.splitlines() if line.startswith("rank ")]
    assert len(rows) == 4
    assert rows[0].startswith("rank 0 |F0 F1 F2 F3 ...")  # three units per op, idle is '.'
    assert all(len(row) == len(rows[0]) <= 120 + len("rank 0 ||") for row in rows)
    assert "W7" in rows[3]
    assert text.splitlines()[-1] == "step time 27, bubble 11.1% (idle 12 of 108 rank-time units)"


def test_cli_show(capsys):
    P.main(["show", "--schedule", "zb-h1", "--stages", "5", "--micro", "7",
            "--f", "1", "--b", "1", "--w", "1", "--comm", "0"])
    out = capsys.readouterr().out
    assert sum(line.startswith("rank ") for line in out.splitlines()) == 5
    assert "bubble" in out


def test_cli_help():
    result = subprocess.run([sys.executable, "pipeline.py", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "show" in result.stdout
