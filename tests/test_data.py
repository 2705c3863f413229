"""Tests of dev/data/prepare.py: the GPT-2 encoding offline, llm.c's file formats, the corpora."""

import hashlib
import importlib.util
import os
import re
import shutil
import struct
import urllib.error

import numpy as np
import pytest
import tiktoken.load

from dev.data import prepare as P

EOT = 50256
VARIED = (
    "Hello, world!  Tabs\tand\nnewlines\n\n\n  indented; 'quotes' \"double\" — “curly” "
    "don't I'll we've 12345 3.14159 café naïve Größe 日本語のテキスト 🤖🎭 ¿qué? «»\r\n end   "
)


@pytest.fixture(scope="session")
def enc():
    return P.gpt2_encoding()


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("data"))
    return data_dir, P.prepare(data_dir, progress=False)


def shard_text(files: P.DataFiles) -> str:
    tokens = np.concatenate([P.read_shard(files.val), P.read_shard(files.train)])
    return P.decode(P.read_tokenizer(files.tokenizer), tokens)


# -----------------------------------------------------------------------------
# the GPT-2 encoding


def test_encoding_round_trip(enc):
    assert enc.n_vocab == 50257 and enc.eot_token == EOT
    assert enc.encode_ordinary("Hello world") == [15496, 995]  # GPT-2's ids, not some other BPE
    ids = enc.encode_ordinary(VARIED)
    assert enc.decode(ids) == VARIED
    assert len(ids) < len(VARIED.encode())  # merges happened


def test_tiktoken_cache_seeded_under_its_urls(tmp_path, monkeypatch):
    # the URLs as tiktoken's installed source spells them, read independently
    spec = importlib.util.find_spec("tiktoken_ext.openai_public")
    with open(spec.origin) as f:
        source = f.read()
    gpt2_def = source[source.index("def gpt2"):source.index("def r50k_base")]
    vocab_url = re.search(r'vocab_bpe_file="([^"]+)"', gpt2_def).group(1)
    encoder_url = re.search(r'encoder_json_file="([^"]+)"', gpt2_def).group(1)

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    P._seed_tiktoken_cache()
    assert sorted(os.listdir(tmp_path)) == sorted(
        hashlib.sha1(url.encode()).hexdigest() for url in (vocab_url, encoder_url)
    )

    def no_network(url):
        raise AssertionError(f"tiktoken tried to fetch {url}")

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=vocab_url,
        encoder_json_file=encoder_url,
        vocab_bpe_hash=P.GPT2_BPE_FILES[0][2],
        encoder_json_hash=P.GPT2_BPE_FILES[1][2],
    )
    assert len(ranks) == 50256


# -----------------------------------------------------------------------------
# the llm.c tokenizer file


def test_tokenizer_file_matches_tiktoken(prepared, enc):
    _, files = prepared
    with open(files.tokenizer, "rb") as f:
        raw = f.read()
    header = struct.unpack("<256i", raw[:1024])
    assert header[:4] == (20240328, 2, 50257, EOT) and not any(header[4:])

    tokens = P.read_tokenizer(files.tokenizer)
    assert len(tokens) == 50257
    for i, b in enumerate(tokens):
        assert b == enc.decode_single_token_bytes(i), i
    assert tokens[EOT] == b"<|endoftext|>"

    # multi-byte characters split across tokens decode only once joined
    ids = enc.encode_ordinary(VARIED * 3)
    assert P.decode(tokens, ids) == VARIED * 3
    ids = P.read_shard(files.train)[:50_000]
    assert P.decode(tokens, ids) == enc.decode(ids.tolist())


def test_bad_tokenizer_file(prepared, tmp_path):
    _, files = prepared
    with open(files.tokenizer, "rb") as f:
        raw = f.read()
    bad = tmp_path / "tok.bin"
    bad.write_bytes(struct.pack("<i", 20240520) + raw[4:])
    with pytest.raises(ValueError, match=r"tok\.bin.*magic 20240520, expected 20240328"):
        P.read_tokenizer(str(bad))
    bad.write_bytes(raw[:-10])
    with pytest.raises(ValueError, match=r"tok\.bin.*truncated at token 50256"):
        P.read_tokenizer(str(bad))
    bad.write_bytes(raw + b"x")
    with pytest.raises(ValueError, match=r"tok\.bin.*1 trailing bytes"):
        P.read_tokenizer(str(bad))


# -----------------------------------------------------------------------------
# token shards


@pytest.mark.parametrize("n", [0, 1, 12345])
def test_shard_layout_and_round_trip(tmp_path, n):
    rng = np.random.default_rng(n)
    tokens = rng.integers(0, 65536, size=n).astype(np.int64)
    tokens[: min(n, 2)] = [0, 65535][: min(n, 2)]
    path = tmp_path / "s.bin"
    P.write_shard(str(path), tokens)

    raw = path.read_bytes()
    assert len(raw) == 1024 + 2 * n
    header = struct.unpack("<256i", raw[:1024])
    assert header[:3] == (20240520, 1, n) and not any(header[3:])
    assert np.array_equal(np.frombuffer(raw[1024:], dtype="<u2"), tokens)

    back = P.read_shard(str(path))
    assert back.dtype == np.uint16 and np.array_equal(back, tokens)
    assert os.listdir(tmp_path) == ["s.bin"]  # no temporary left behind


@pytest.mark.parametrize("bad", [[-1], [65536]])
def test_write_shard_rejects_out_of_range(tmp_path, bad):
    with pytest.raises(ValueError, match="uint16"):
        P.write_shard(str(tmp_path / "s.bin"), bad)


def corrupt(raw: bytes, how: str) -> bytes:
    if how == "magic":
        return struct.pack("<i", 20240328) + raw[4:]
    if how == "version":
        return raw[:4] + struct.pack("<i", 2) + raw[8:]
    if how == "truncated":
        return raw[:-1]
    if how == "too long":
        return raw + b"\0\0"
    return raw[:100]  # header cut short


@pytest.mark.parametrize(
    "how, message",
    [
        ("magic", r"magic 20240328, expected 20240520"),
        ("version", r"version 2 \(expected 1\)"),
        ("truncated", r"2023 bytes, expected 2024 for 500 tokens"),
        ("too long", r"2026 bytes, expected 2024 for 500 tokens"),
        ("header", r"truncated token shard header \(100 bytes"),
    ],
)
def test_bad_shard(tmp_path, how, message):
    good = tmp_path / "good.bin"
    P.write_shard(str(good), np.arange(500))
    bad = tmp_path / "bad_shard.bin"
    bad.write_bytes(corrupt(good.read_bytes(), how))
    with pytest.raises(ValueError, match=re.escape(str(bad)) + ": .*" + message):
        P.read_shard(str(bad))


def test_interrupted_write_leaves_old_file(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    with pytest.raises(TypeError):
        P._write_atomic(str(path), [b"new", None])  # fails half way through
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]


# -----------------------------------------------------------------------------
# the offline Shakespeare corpus

PLAY = "ACT I.\n\nScene I. A room.\n\nFirst Lord.\nWhat, has this thing appear'd again to-night?\n"


@pytest.mark.parametrize(
    "header, footer",
    [
        (  # modern Gutenberg
            "The Project Gutenberg EBook of Hamlet, by William Shakespeare\n\n"
            "This eBook is for the use of anyone anywhere at no cost\n\n"
            "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\n\n",
            "\n\nEnd of the Project Gutenberg EBook of Hamlet\n\n"
            "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\n"
            "***** This file should be named 1524.txt *****\nDonations are accepted.\n",
        ),
        (  # the 1990s etexts the plays come from, with CRLF line ends
            "**The Project Gutenberg Etext of Hamlet**\r\nCopyright laws are changing\r\n"
            "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\r\n\r\n",
            "\r\nEnd of Project Gutenberg Etext of Hamlet\r\n",
        ),
        ("", ""),  # already clean, as pip installs them
    ],
)
def test_strip_gutenberg(header, footer):
    body = PLAY.replace("\n", "\r\n") if "\r\n" in header else PLAY
    # reading in text mode is what turns CRLF into LF
    text = (header + body + footer).replace("\r\n", "\n")
    assert P.strip_gutenberg(text) == PLAY


def test_prepared_text_has_no_licence(prepared):
    _, files = prepared
    text = shard_text(files)
    boilerplate = re.compile(r"\b(gutenberg|e-?books?|e-?texts?|small print|copyright|https?:|www\.)",
                             re.IGNORECASE)
    assert boilerplate.findall(text) == []
    assert "To be, or not to be,--that is the question:--" in text
    assert "Now is the winter of our discontent" in text
    assert "Shall I compare thee to a summer's day?" in text


def test_prepare_shakespeare(prepared):
    data_dir, files = prepared
    assert files == P.DataFiles(
        train=os.path.join(data_dir, "shakespeare", "shakespeare_train_000000.bin"),
        val=os.path.join(data_dir, "shakespeare", "shakespeare_val_000000.bin"),
        tokenizer=os.path.join(data_dir, "gpt2_tokenizer.bin"),
    )
    train, val = P.read_shard(files.train), P.read_shard(files.val)
    assert 1_400_000 < len(train) + len(val) < 1_700_000
    assert 0.08 < len(val) / (len(train) + len(val)) < 0.15
    # one EOT before each of the 42 works, and no work split between val and train
    n_docs = len(P.shakespeare_documents())
    assert n_docs == 42
    assert (train == EOT).sum() + (val == EOT).sum() == n_docs
    assert train[0] == EOT and val[0] == EOT
    assert (val == EOT).sum() == 4  # All's Well .. Comedy of Errors

    text = P.decode(P.read_tokenizer(files.tokenizer), val)
    assert text.startswith("<|endoftext|>ALL'S WELL THAT ENDS WELL\n")


def test_prepare_is_idempotent(prepared):
    data_dir, files = prepared
    paths = [files.train, files.val, files.tokenizer]
    before = [os.stat(p).st_mtime_ns for p in paths]
    assert P.prepare(data_dir, progress=False) == files
    assert [os.stat(p).st_mtime_ns for p in paths] == before


def test_prepare_rebuilds_incomplete(prepared, tmp_path):
    data_dir, files = prepared
    copy = str(tmp_path / "data")
    shutil.copytree(data_dir, copy)
    again = P.prepare(copy, progress=False)
    with open(again.train, "r+b") as f:
        f.truncate(5000)
    with open(again.tokenizer, "r+b") as f:
        f.truncate(1000)
    P.prepare(copy, progress=False)
    for split in ("train", "val", "tokenizer"):
        with open(getattr(files, split), "rb") as a, open(getattr(again, split), "rb") as b:
            assert a.read() == b.read(), split


def test_progress_lines(capsys):
    P.tokenize_documents(["a"] * 20, "test", progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1] == "preparing test: 20/20 documents"
    assert 5 <= len(lines) <= 11  # about one per tenth when stderr is not a terminal
    P.tokenize_documents(["a"] * 20, "test", progress=False)
    assert capsys.readouterr().err == ""


def test_unknown_source(tmp_path):
    with pytest.raises(ValueError, match="unknown data source 'nope'"):
        P.prepare(str(tmp_path), source="nope")


# -----------------------------------------------------------------------------
# tiny shakespeare, from a local file

TINY = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\n"
    "All:\nResolved. resolved.\n"
)


def test_tokenize_tinyshakespeare(tmp_path, monkeypatch, enc):
    monkeypatch.setattr(P, "TINYSHAKESPEARE_VAL_TOKENS", 20)
    src = tmp_path / "input.txt"
    src.write_text(TINY)
    files = P.DataFiles(train=str(tmp_path / "t.bin"), val=str(tmp_path / "v.bin"), tokenizer="")
    P.tokenize_tinyshakespeare(str(src), files)

    val, train = P.read_shard(files.val), P.read_shard(files.train)
    assert len(val) == 20
    tokens = np.concatenate([val, train]).tolist()
    assert tokens.count(EOT) == 4 and tokens[0] == EOT
    # every section is EOT + its own tokens, separator included
    expected = []
    for section in ["First Citizen:\nBefore we proceed any further, hear me speak.\n\n",
                    "All:\nSpeak, speak.\n\n",
                    "First Citizen:\nYou are all resolved rather to die than to famish?\n\n",
                    "All:\nResolved. resolved.\n"]:
        expected += [EOT] + enc.encode_ordinary(section)
    assert tokens == expected


def test_prepare_tinyshakespeare_offline(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(P.urllib.request, "urlopen", offline)
    with pytest.raises(RuntimeError, match=r"cannot download .*input\.txt \(Name or service not known\); offline\?"):
        P.prepare(str(tmp_path), source="tinyshakespeare", progress=False)

    # with the text already downloaded, nothing is fetched
    os.makedirs(tmp_path / "tinyshakespeare", exist_ok=True)
    (tmp_path / "tinyshakespeare" / "input.txt").write_text(TINY * 1000)
    files = P.prepare(str(tmp_path), source="tinyshakespeare", progress=False)
    assert files.tokenizer == str(tmp_path / "gpt2_tokenizer.bin")
    assert len(P.read_shard(files.val)) == 32768 and len(P.read_shard(files.train)) > 0
    assert files.train == str(tmp_path / "tinyshakespeare" / "tiny_shakespeare_train.bin")
