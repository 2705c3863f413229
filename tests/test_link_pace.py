"""Link pacing (train.py --link-gbps / --link-latency-us): a message of n
bytes takes U + 8n/G on a paced link, in each direction at once."""

import socket
import threading
import time

import pytest

import gpt

# two stages of a 2-layer model whose first and last stage swap d(wte), Vp x C
# fp32 values each way: 50304 x 64 x 4 = 12.9 MB, about one second at 0.1 Gb/s
CFG = dict(max_seq_len=16, vocab_size=50257, padded_vocab_size=50304, num_layers=2, num_heads=2, channels=64)
SWAP_BYTES = 50304 * 64 * 4 + 16  # payload + the message header


def timed_swap() -> float:
    """Seconds for the first and the last stage to swap their d(wte) parts, each on its own thread."""
    a, b = socket.socketpair()
    models = [gpt.Model(CFG, 0, 1, 1, 8, 1), gpt.Model(CFG, 1, 2, 1, 8, 1)]
    models[0].set_peers(-1, -1, a.fileno(), 10.0)
    models[1].set_peers(-1, -1, b.fileno(), 10.0)
    errors = []

    def swap(model):
        try:
            model.sum_wte_grads()
        except gpt.GPTError as e:
            errors.append(e)
    threads = [threading.Thread(target=swap, args=(m,)) for m in models]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    dt = time.perf_counter() - t0
    a.close(), b.close()
    assert not errors and not any(t.is_alive() for t in threads)
    return dt


@pytest.mark.parametrize("gbps,latency_us", [(0.1, 0.0), (0.2, 200_000.0)])
def test_paced_link_moves_n_bytes_in_latency_plus_8n_over_g(gbps, latency_us):
    # Both directions run at once, so the swap takes one message's time, not
    # two. A paced link is never faster than its wire (the 2% below is the
    # clock's and the sleeps' slack). Above it: sleeps overshoot by tens of
    # microseconds and never accumulate (each chunk waits for the wire's
    # clock, not for the previous send), but the copies of 13 MB through the
    # socket and the sum after it take 15-30 ms (the whole unpaced swap);
    # 10% (100 and 70 ms here) leaves room for that on a machine other work
    # loads. Unpaced, the swap is far below the band.
    gpt.set_link_pace(gbps, latency_us)
    try:
        measured = timed_swap()
    finally:
        gpt.set_link_pace(0.0, 0.0)
    expected = latency_us * 1e-6 + 8 * SWAP_BYTES / (gbps * 1e9)
    assert 0.98 * expected <= measured <= 1.10 * expected, (measured, expected)


@pytest.mark.parametrize("gbps,latency_us", [(-1.0, 0.0), (float("nan"), 0.0), (float("inf"), 0.0),
                                             (1.0, -5.0), (2e6, 0.0)])
def test_bad_pace_is_refused(gbps, latency_us):
    with pytest.raises(gpt.GPTError, match="link pace"):
        gpt.set_link_pace(gbps, latency_us)


def test_train_refuses_bad_pace_and_pacing_nccl():
    import argparse
    import train
    for flags in (["--link-gbps", "0"], ["--link-gbps", "nan"], ["--link-latency-us", "inf"]):
        with pytest.raises(train.UsageError, match=f"{flags[0]} .*: must be a number in \\(0, 1e\\+06\\]"):
            train.check_flags(train.parse_args(["--batch-size", "16", "--seq-len", "128", "--stages", "1", *flags]))

    class TwoGPUs:
        @staticmethod
        def device_count() -> int:
            return 2
    args = argparse.Namespace(link_gbps=1.0, link_latency_us=None, device="cuda", stages=2, dp=1, transport="nccl")
    with pytest.raises(train.UsageError, match="--transport socket"):
        train.check_link_pace(args, TwoGPUs)
    args.transport = "socket"
    train.check_link_pace(args, TwoGPUs)
