"""Byte-level training data that every Python installation has, in two domains:

- ``stdlib`` (pretraining): the standard library's own ``*.py`` sources, installed packages
  (``site-packages``, ``dist-packages``) left out; one document per file.
- ``pydoc`` (fine-tuning): the English reference text of ``pydoc_data/topics.py`` (what ``help()``
  shows for keywords and topics); one document per topic.

``build_corpus`` concatenates a domain's documents (sorted by name, each followed by a NUL byte, which
occurs in neither) into one uint8 token file per split, written once and atomically to a cache
directory. The split is by document: one whose name hashes (CRC-32) to a value below ``VAL_PERCENT``
mod 100 is validation, so validation text is never trained on.

``ByteWindows`` memory-maps one split and serves batches of random ``seq_len + 1``-byte windows
from a seeded generator, plus a fixed set of evenly spaced windows for evaluation.
"""

import hashlib
import os
import sys
import sysconfig
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

VAL_PERCENT = 5
DOMAINS = ("stdlib", "pydoc")
SEPARATOR = b"\0"
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages"})
DEFAULT_CACHE = Path(__file__).resolve().parents[1] / "runs" / "cache"


def stdlib_files(root: str | Path | None = None) -> list[tuple[str, Path]]:
    """``(relative path, path)`` of every ``*.py`` under ``root`` (the stdlib), sorted, packages excluded."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if path.is_file() and not EXCLUDED_DIRS.intersection(rel.parts):
            files.append((rel.as_posix(), path))
    if not files:
        raise FileNotFoundError(f"no *.py files under {root}")
    return sorted(files)


def pydoc_topics() -> list[tuple[str, bytes]]:
    """``(topic, UTF-8 text)`` of every topic of ``pydoc_data/topics.py``, sorted by topic."""
    from pydoc_data.topics import topics
    return sorted((name, text.encode()) for name, text in topics.items())


def split_of(name: str) -> str:
    """``"val"`` or ``"train"``: the split a document belongs to, from its name alone."""
    return "val" if zlib.crc32(name.encode()) % 100 < VAL_PERCENT else "train"


def _write_atomic(path: Path, chunks: list[bytes]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _documents(domain: str, root: str | Path | None) -> list[tuple[str, str, Callable[[], bytes]]]:
    """``(name, identity, read)`` of each document: the identity (name and size, or a checksum) enters
    the cache's fingerprint without reading a stdlib file."""
    if domain == "stdlib":
        return [(rel, f"{rel}\0{path.stat().st_size}", path.read_bytes) for rel, path in stdlib_files(root)]
    if domain == "pydoc":
        if root is not None:
            raise ValueError("root applies to the stdlib domain only")
        return [(name, f"{name}\0{len(text)}\0{zlib.crc32(text)}", lambda text=text: text)
                for name, text in pydoc_topics()]
    raise ValueError(f"unknown data domain {domain!r}: choose from {', '.join(DOMAINS)}")


def build_corpus(out_dir: str | Path = DEFAULT_CACHE, root: str | Path | None = None,
                 domain: str = "stdlib") -> dict[str, Path]:
    """Token files ``{"train": path, "val": path}`` of ``domain`` (the stdlib at ``root``), built if not cached.

    The file names carry a fingerprint of the documents (names and sizes) and the Python version, so
    a different installation gets its own files.
    """
    docs = _documents(domain, root)
    fp = hashlib.sha256(f"{sys.version_info[:2]} {VAL_PERCENT}".encode())
    for _, identity, _ in docs:
        fp.update(f"{identity}\0".encode())
    stem = f"{domain}-py{sys.version_info[0]}{sys.version_info[1]}-{fp.hexdigest()[:12]}"
    out_dir = Path(out_dir)
    paths = {split: out_dir / f"{stem}.{split}.bin" for split in ("train", "val")}
    if all(p.exists() for p in paths.values()):
        return paths
    out_dir.mkdir(parents=True, exist_ok=True)
    chunks: dict[str, list[bytes]] = {"train": [], "val": []}
    for name, _, read in docs:
        chunks[split_of(name)] += [read(), SEPARATOR]
    for split, path in paths.items():
        if not chunks[split]:
            raise ValueError(f"the {domain} domain has no {split} documents")
        _write_atomic(path, chunks[split])
    return paths


class ByteWindows:
    """Batches of ``(x, y)`` int64 ``(batch_size, seq_len)`` byte windows, ``y`` shifted by one.

    ``rank``/``world_size`` shard the stream: every rank draws the same global batch of
    ``batch_size · world_size`` windows and keeps its own ``batch_size`` rows, so the union over
    ranks does not depend on the world size.
    """

    def __init__(self, path: str | Path, seq_len: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        size = os.path.getsize(path)
        if size < seq_len + 1:
            raise ValueError(f"{path} has {size} bytes, fewer than seq_len + 1 = {seq_len + 1}")
        self.data = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)
        self.seq_len, self.batch_size, self.rank, self.world_size = seq_len, batch_size, rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self._offsets = torch.arange(seq_len + 1)

    def __len__(self) -> int:
        """Number of bytes in the split."""
        return self.data.numel()

    def _windows(self, starts: Tensor) -> tuple[Tensor, Tensor]:
        w = self.data[starts[:, None] + self._offsets].long()
        return w[:, :-1], w[:, 1:]

    def next_batch(self) -> tuple[Tensor, Tensor]:
        """The next batch of random windows of this rank."""
        starts = torch.randint(len(self) - self.seq_len, (self.batch_size * self.world_size,),
                               generator=self.generator)
        return self._windows(starts.view(self.world_size, self.batch_size)[self.rank])

    def eval_batches(self, n: int) -> list[tuple[Tensor, Tensor]]:
        """``n`` batches of windows evenly spaced over the split: the same on every call."""
        total = n * self.batch_size * self.world_size
        starts = torch.linspace(0, len(self) - self.seq_len - 1, total).long()
        starts = starts.view(n, self.world_size, self.batch_size)[:, self.rank]
        return [self._windows(s) for s in starts]
