"""The rendezvous under hostile peers: garbage, oversized and deeply nested
messages, a wrong token, silent connections held open, an impostor who knows
the address and port, a fake rank 0. The real ranks still connect, within
the peer timeout, or a rank fails with a line naming the cause."""

import json
import socket
import struct
import threading
import time

import pytest

import pipeline
from tests.test_pipeline import assert_connected, free_port

TOKEN = "0123456789abcdef0123456789abcdef"
TIMEOUT = 8.0


def start_rank(rank: int, port: int, world: int = 2, token: str = TOKEN) -> tuple[threading.Thread, dict]:
    """connect_ranks in a thread; its Rank or its exception land in the dict."""
    out = {}

    def go():
        started = time.monotonic()
        try:
            out["rank"] = pipeline.connect_ranks(pipeline.Env(rank, world, "127.0.0.1", port, token), timeout=TIMEOUT)
        except Exception as e:
            out["error"] = e
        out["seconds"] = time.monotonic() - started

    t = threading.Thread(target=go)
    t.start()
    return t, out


def connect(port: int) -> socket.socket:
    return pipeline._connect(("127.0.0.1", port), time.monotonic() + 5)


def garbage(port: int) -> None:
    with connect(port) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n" * 4)


def oversized(port: int) -> None:
    with connect(port) as s:
        s.sendall(struct.pack("<IIQ", pipeline.WIRE_MAGIC, pipeline.HELLO, 1 << 40))


def deeply_nested(port: int) -> None:
    with connect(port) as s:
        pipeline.recv_json(s, pipeline.CHALLENGE, pipeline.NONCE)
        pipeline.send_msg(s, pipeline.HELLO, b"[" * 30000 + b"]" * 30000)


def wrong_token(port: int) -> None:
    with connect(port) as s, pytest.raises((ConnectionError, pipeline.ProtocolError, OSError)):
        pipeline._join(s, b"not the job's token, but long", pipeline.HELLO,
                       {"rank": 1, "world": 2, "host": "127.0.0.1", "port": 1}, pipeline.TABLE, {"table": list})


def impostor(port: int) -> None:
    """Knows the address, port and world size: the token the launcher used
    to derive from them opens nothing now."""
    with connect(port) as s, pytest.raises((ConnectionError, pipeline.ProtocolError, OSError)):
        pipeline._join(s, f"127.0.0.1:{port}:2".encode(), pipeline.HELLO,
                       {"rank": 1, "world": 2, "host": "127.0.0.1", "port": 1}, pipeline.TABLE, {"table": list})


def test_real_ranks_connect_past_hostile_peers(capfd):
    port = free_port()
    rank0, out0 = start_rank(0, port)
    silent = [connect(port) for _ in range(3)]  # held open, saying nothing, for the whole rendezvous
    for attack in (garbage, oversized, deeply_nested, wrong_token, impostor):
        attack(port)
    rank1, out1 = start_rank(1, port)
    rank0.join(30)
    rank1.join(30)
    for s in silent:
        s.close()
    assert "error" not in out0 and "error" not in out1, (out0.get("error"), out1.get("error"))
    a, b = out0["rank"], out1["rank"]
    try:
        assert max(out0["seconds"], out1["seconds"]) < TIMEOUT / 2, "a silent peer delayed the real ones"
        assert_connected(a, b)
    finally:
        a.close()
        b.close()
    err = capfd.readouterr().err
    for cause in ("bad magic", "more than 65536", "nested deeper than 4", "wrong job token"):
        assert cause in err, (cause, err)


def test_alone_with_hostile_peers_rank_0_times_out_naming_the_wait():
    port = free_port()
    rank0, out0 = start_rank(0, port)
    silent = connect(port)
    wrong_token(port)
    rank0.join(30)
    silent.close()
    assert isinstance(out0["error"], TimeoutError)
    assert "timed out waiting for the other ranks to join" in str(out0["error"])
    assert TIMEOUT - 0.5 < out0["seconds"] < TIMEOUT + 3


def rank_1_against_a_fake_rank_0(answer) -> Exception:
    """Rank 1 joins a listener on MASTER_PORT that challenges it, reads its
    HELLO and calls answer(sock, hello); returns rank 1's error."""
    port = free_port()
    listener = pipeline._listen("127.0.0.1", port)
    rank1, out1 = start_rank(1, port)
    sock, _ = listener.accept()
    sock.settimeout(5)
    pipeline.send_json(sock, pipeline.CHALLENGE, {"nonce": "00" * 16})
    answer(sock, json.loads(pipeline.recv_msg(sock, pipeline.HELLO)))
    rank1.join(30)
    sock.close()
    listener.close()
    return out1.get("error")


def test_a_fake_rank_0_cannot_prove_the_token():
    """Someone listening on MASTER_PORT first gets a HELLO it cannot use and
    cannot answer with a TABLE the real rank accepts."""
    def answer(sock, hello):
        assert TOKEN not in json.dumps(hello)
        pipeline.send_json(sock, pipeline.TABLE, {"table": [["127.0.0.1", 1], ["127.0.0.1", 2]], "mac": "0" * 64})
    error = rank_1_against_a_fake_rank_0(answer)
    assert isinstance(error, pipeline.ProtocolError)
    assert "does not prove the job token" in str(error)


def test_an_oversize_table_is_refused_before_it_is_read():
    """A TABLE is bounded by the world it lists (table_bytes_bound), not by
    the 64 KiB of the other JSON messages: 4096 ranks of 255-character
    hosts fit, and a header announcing one byte more is refused, naming the
    rank that refused it."""
    world = 4096
    table = [["\u00e9" * 255, 65535]] * world
    proof = {"table": table, "nonce": "00" * 16, "mac": "0" * 64}
    assert pipeline.MAX_SMALL < len(json.dumps(proof).encode()) <= pipeline.table_bytes_bound(world)
    error = rank_1_against_a_fake_rank_0(lambda sock, hello: sock.sendall(
        struct.pack("<IIQ", pipeline.WIRE_MAGIC, pipeline.TABLE, pipeline.table_bytes_bound(2) + 1)))
    assert isinstance(error, pipeline.ProtocolError)
    assert str(error).startswith("rank 1: joining rank 0: TABLE message of") and "more than" in str(error)


@pytest.mark.parametrize("depth,ok", [(4, True), (5, False)])
def test_nesting_is_bounded_before_parsing(depth, ok):
    a, b = socket.socketpair()
    text = "[" * depth + "]" * depth
    pipeline.send_msg(a, pipeline.HELLO, json.dumps({"x": json.loads(text[1:-1]) if depth > 1 else 0}).encode())
    if ok:
        assert pipeline.recv_json(b, pipeline.HELLO, {"x": list})
    else:
        with pytest.raises(pipeline.ProtocolError, match="nested deeper than 4"):
            pipeline.recv_json(b, pipeline.HELLO, {"x": list})
    # brackets inside strings are text, not nesting
    pipeline.send_msg(a, pipeline.HELLO, json.dumps({"x": "[[[[[[[[\\\"{{{{"}).encode())
    assert pipeline.recv_json(b, pipeline.HELLO, {"x": str})["x"] == "[[[[[[[[\\\"{{{{"
    a.close()
    b.close()


def test_advertised_address():
    assert pipeline.advertised_address("127.0.0.1", "127.0.0.1", None) == "127.0.0.1"
    assert pipeline.advertised_address("0.0.0.0", "127.0.0.1", None) == "127.0.0.1"  # the route to MASTER_ADDR
    assert pipeline.advertised_address("0.0.0.0", "127.0.0.1", "10.1.2.3") == "10.1.2.3"


def two_ranks_over_control() -> tuple[pipeline.Rank, pipeline.Rank, socket.socket, socket.socket]:
    """Rank 0 and rank 1 of a 2-rank world joined by a control socket pair."""
    a, b = socket.socketpair()
    zero, one = pipeline.Rank(0, 2), pipeline.Rank(1, 2)
    zero.control, one.control = [None, a], [b]
    return zero, one, a, b


@pytest.mark.parametrize("collective", ["gather_blobs", "broadcast", "allreduce"])
def test_an_oversize_control_message_is_refused_naming_the_rank(collective):
    """Each receive on the control sockets takes a bound from what it
    expects; a header that announces one byte more is refused before its
    payload is read, in one line naming both ranks."""
    zero, one, a, b = two_ranks_over_control()
    bound = 100
    if collective == "gather_blobs":  # rank 1 claims a blob past rank 0's bound
        b.sendall(struct.pack("<IIQ", pipeline.WIRE_MAGIC, pipeline.BLOB, bound + 1))
        receive, words = lambda: zero.gather_blobs(b"", bound), "rank 0: a gathered blob from rank 1"
    elif collective == "broadcast":  # rank 0 sends more than rank 1 expects
        a.sendall(struct.pack("<IIQ", pipeline.WIRE_MAGIC, pipeline.BLOB, bound + 1))
        receive, words = lambda: one.broadcast(b"", bound), "rank 1: a broadcast from rank 0"
    else:  # a sum of 2 float64s answered with 3
        a.sendall(struct.pack("<IIQ", pipeline.WIRE_MAGIC, pipeline.ARRAY, 24))
        receive, words = lambda: one.allreduce(pipeline.np.zeros(2)), "rank 1: the sum from rank 0"
    with pytest.raises(pipeline.ProtocolError) as e:
        receive()
    assert str(e.value).startswith(words) and "more than" in str(e.value) and "\n" not in str(e.value)
    # and a message within the bound passes
    if collective == "gather_blobs":
        pipeline.send_msg(b, pipeline.BLOB, b"x" * bound)
        assert zero.gather_blobs(b"mine", bound) == [b"mine", b"x" * bound]
    a.close()
    b.close()
