"""Lens datasets on disk: WebDataset tar shards of activation blocks plus a manifest.

Layout (schema version 1; see docs/lens.md)::

    lens/<name>/
      manifest.json                    written last
      <point-folder>/shard-RRR-NNNNNN.tar

A tar *sample* is a block of whole images (``block_images`` of them) with members ``<key>.feats.npy``
(``[rows, d]``, float16 by default) and ``<key>.meta.npy`` (a structured array, one record per row — see
:mod:`blueglass.features.align`). Keys are the global block index (``%08d``: no dots), identical for
every point, so points join by key. Members have a fixed mtime/owner, so the same inputs give the same
bytes. Shards are written under a temporary name and renamed when complete; the manifest is written
last. Readers never unpickle (``allow_pickle=False``) and raise :class:`LensError` naming the shard on a
truncated tar, a sha256 mismatch or a row-count mismatch: nothing is skipped silently.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from blueglass.errors import BlueGlassError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


class LensError(BlueGlassError):
    """A Lens is missing, malformed, or one of its shards is damaged."""


def point_folder(point: str) -> str:
    return point.replace(":", "__")


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tf.addfile(info, io.BytesIO(data))


# ---------------------------------------------------------------- writing
class _HashingFile:
    """A write-only file that hashes what passes through (no second read of the shard)."""

    def __init__(self, fh: Any):
        self.fh = fh
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.fh.write(data)

    def tell(self) -> int:
        return self.size

    def close(self) -> None:
        self.fh.close()


@dataclass
class _PointState:
    folder: Path
    d: int
    rows: int = 0
    images: int = 0
    sum: np.ndarray | None = None
    norm_sum: float = 0.0
    shards: list[dict[str, Any]] = field(default_factory=list)
    tar: tarfile.TarFile | None = None
    sink: _HashingFile | None = None
    tmp: Path | None = None
    shard_rows: int = 0
    shard_images: int = 0


class LensWriter:
    """Streams blocks of images into per-point shards (one writer per rank).

    ``add_block(block_index, acts, meta)`` takes, for every point, the rows of whole images: ``acts[p]``
    ``[rows, d]`` and ``meta[p]`` (structured, one record per row). Call :meth:`close` to finish the last
    shard; it returns this rank's part of the manifest.
    """

    def __init__(
        self,
        root: Path,
        points: Mapping[str, int],
        *,
        rank: int = 0,
        blocks_per_shard: int = 16,
        dtype: str = "float16",
    ):
        self.root = Path(root)
        self.rank = rank
        self.blocks_per_shard = blocks_per_shard
        self.dtype = np.dtype(dtype)
        self.blocks_in_shard = 0
        self.shard_index = 0
        self.state = {p: _PointState(self.root / point_folder(p), d) for p, d in points.items()}
        for st in self.state.values():
            st.folder.mkdir(parents=True, exist_ok=True)

    def _shard_name(self) -> str:
        return f"shard-{self.rank:03d}-{self.shard_index:06d}.tar"

    def add_block(
        self, block_index: int, acts: Mapping[str, np.ndarray], meta: Mapping[str, np.ndarray]
    ) -> None:
        import torch

        key = f"{block_index:08d}"
        for p, st in self.state.items():
            feats = np.ascontiguousarray(acts[p], dtype=self.dtype)
            m = meta[p]
            if feats.ndim != 2 or feats.shape[1] != st.d or len(m) != len(feats):
                raise LensError(
                    f"point {p}: block {key} has feats {feats.shape} and {len(m)} meta rows (d={st.d})"
                )
            if st.tar is None:
                st.tmp = st.folder / f".{self._shard_name()}.tmp"
                st.sink = _HashingFile(open(st.tmp, "wb"))  # noqa: SIM115 (closed in _finish_shards)
                st.tar = tarfile.open(fileobj=st.sink, mode="w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
            _add_member(st.tar, f"{key}.feats.npy", _npy_bytes(feats))
            _add_member(st.tar, f"{key}.meta.npy", _npy_bytes(m))
            n_img = len(np.unique(m["image_id"]))
            f32 = torch.from_numpy(feats).float()  # torch: multi-threaded, no float64 copy of the block
            col_sum = f32.sum(0, dtype=torch.float64).numpy()
            st.sum = col_sum if st.sum is None else st.sum + col_sum
            st.norm_sum += float(torch.linalg.vector_norm(f32, dim=1).sum(dtype=torch.float64))
            st.rows += len(feats)
            st.images += n_img
            st.shard_rows += len(feats)
            st.shard_images += n_img
        self.blocks_in_shard += 1
        if self.blocks_in_shard >= self.blocks_per_shard:
            self._finish_shards()

    def _finish_shards(self) -> None:
        for st in self.state.values():
            if st.tar is None:
                continue
            st.tar.close()
            st.sink.close()
            final = st.folder / self._shard_name()
            st.tmp.rename(final)
            st.shards.append(
                {
                    "file": f"{st.folder.name}/{final.name}",
                    "sha256": st.sink.sha256.hexdigest(),
                    "bytes": st.sink.size,
                    "rows": st.shard_rows,
                    "images": st.shard_images,
                }
            )
            st.tar, st.sink, st.tmp, st.shard_rows, st.shard_images = None, None, None, 0, 0
        self.blocks_in_shard = 0
        self.shard_index += 1

    def close(self) -> dict[str, Any]:
        self._finish_shards()
        return {
            p: {
                "rows": st.rows,
                "images": st.images,
                "sum": (st.sum if st.sum is not None else np.zeros(st.d)).tolist(),
                "norm_sum": st.norm_sum,
                "shards": st.shards,
            }
            for p, st in self.state.items()
        }


def merge_parts(
    parts: Sequence[Mapping[str, Any]], point_info: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """Combine the ranks' :meth:`LensWriter.close` results into the manifest's ``points`` section."""
    points = {}
    for p, info in point_info.items():
        rows = sum(part[p]["rows"] for part in parts)
        total = np.sum([np.array(part[p]["sum"]) for part in parts], axis=0)
        shards = sorted((s for part in parts for s in part[p]["shards"]), key=lambda s: s["file"])
        points[p] = {
            **info,
            "folder": point_folder(p),
            "rows": rows,
            "images": sum(part[p]["images"] for part in parts),
            "bytes": sum(s["bytes"] for s in shards),
            "mean": (total / max(rows, 1)).astype(np.float32).tolist(),
            "mean_norm": sum(part[p]["norm_sum"] for part in parts) / max(rows, 1),
            "shards": shards,
        }
    return points


def write_manifest(root: Path, manifest: Mapping[str, Any]) -> Path:
    path = Path(root) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp")
    tmp.write_text(
        json.dumps({"schema_version": SCHEMA_VERSION, **manifest}, indent=1, sort_keys=True) + "\n"
    )
    tmp.replace(path)
    return path


# ---------------------------------------------------------------- reading
def _open(url: str):
    """Open a local path, a WebDataset ``pipe:`` command or an fsspec URL (s3://, gs://, http://, …)."""
    if url.startswith("pipe:"):
        import webdataset as wds

        return wds.gopen(url, "rb")
    if "://" in url and not url.startswith("file://"):
        import fsspec

        return fsspec.open(url, "rb").open()
    return open(url.removeprefix("file://"), "rb")


def _join(root: str, rel: str) -> str:
    if root.startswith("pipe:"):
        raise LensError("a pipe: Lens root cannot be joined; pass shard URLs explicitly")
    return f"{root.rstrip('/')}/{rel}"


@dataclass(frozen=True)
class Block:
    key: str
    feats: np.ndarray  # [rows, d]
    meta: np.ndarray  # structured [rows]


class Lens:
    """A Lens dataset: its manifest plus access to the shards of each point.

    ``root`` is a folder or a URL prefix (``s3://bucket/lens/x``, ``https://…``) holding ``manifest.json``.
    ``shard_root`` (default: ``root`` + "/") is prepended to each shard's relative path; it may be a
    WebDataset ``pipe:`` command prefix such as ``"pipe:curl -s https://host/lens/x/"`` or
    ``"pipe:cat /mnt/lens/x/"``.
    """

    def __init__(self, root: str | Path, shard_root: str | None = None):
        self.root = str(root)
        self.shard_root = shard_root
        try:
            with _open(_join(self.root, MANIFEST)) as fh:
                self.manifest: dict[str, Any] = json.loads(fh.read())
        except FileNotFoundError:
            raise LensError(
                f"{self.root}: no {MANIFEST} (not a Lens, or its extraction did not finish)"
            ) from None
        except (OSError, json.JSONDecodeError) as exc:
            raise LensError(f"{self.root}/{MANIFEST}: unreadable ({exc})") from None
        if self.manifest.get("schema_version") != SCHEMA_VERSION:
            raise LensError(
                f"{self.root}: Lens schema version {self.manifest.get('schema_version')} (this BlueGlass reads {SCHEMA_VERSION})"
            )

    @property
    def points(self) -> list[str]:
        """Point names in the model's order (input to output), as recorded."""
        pts = self.manifest["points"]
        return sorted(pts, key=lambda n: (pts[n].get("depth", 0), n))

    def point(self, name: str) -> dict[str, Any]:
        if name not in self.manifest["points"]:
            raise LensError(f"{self.root}: no point {name!r} (points: {', '.join(self.points)})")
        return self.manifest["points"][name]

    def shards(self, point: str) -> list[dict[str, Any]]:
        return list(self.point(point)["shards"])

    def shard_url(self, shard: Mapping[str, Any]) -> str:
        if self.shard_root is not None:
            return self.shard_root + shard["file"]
        return _join(self.root, shard["file"])

    def read_shard(self, shard: Mapping[str, Any], *, check: bool = True) -> list[Block]:
        """All blocks of one shard, after checking its sha256 and row count (whole shard in memory)."""
        url = self.shard_url(shard)
        try:
            with _open(url) as fh:
                data = fh.read()
        except OSError as exc:
            raise LensError(f"shard {url}: cannot be read ({exc})") from None
        if check and hashlib.sha256(data).hexdigest() != shard["sha256"]:
            raise LensError(
                f"shard {url}: sha256 mismatch (corrupted or truncated: {len(data)} of {shard['bytes']} bytes)"
            )
        blocks: dict[str, dict[str, np.ndarray]] = {}
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
                for member in tf:
                    key, _, kind = member.name.partition(".")
                    if kind not in ("feats.npy", "meta.npy"):
                        raise LensError(f"shard {url}: unexpected member {member.name}")
                    blocks.setdefault(key, {})[kind] = _npy_load(tf.extractfile(member).read())
        except (tarfile.TarError, EOFError, ValueError) as exc:
            raise LensError(f"shard {url}: not a complete tar of .npy members ({exc})") from None
        out = []
        for key, parts in blocks.items():
            if set(parts) != {"feats.npy", "meta.npy"}:
                raise LensError(
                    f"shard {url}: block {key} lacks {({'feats.npy', 'meta.npy'} - set(parts)).pop()}"
                )
            out.append(Block(key, parts["feats.npy"], parts["meta.npy"]))
        rows = sum(len(b.feats) for b in out)
        if check and rows != shard["rows"]:
            raise LensError(f"shard {url}: {rows} rows, manifest says {shard['rows']}")
        return out

    def blocks(self, point: str, shards: Sequence[Mapping[str, Any]] | None = None) -> Iterator[Block]:
        for shard in shards if shards is not None else self.shards(point):
            yield from self.read_shard(shard)

    def load_point(self, point: str, where: RowFilter | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Every row of a point in memory: ``(feats [N, d], meta [N])`` (for small Lenses)."""
        feats, metas = [], []
        for b in self.blocks(point):
            keep = where.mask(b.meta) if where else slice(None)
            feats.append(b.feats[keep])
            metas.append(b.meta[keep])
        info = self.point(point)
        if not feats:
            return np.zeros((0, info["d"]), info["dtype"]), np.zeros(0)
        return np.concatenate(feats), np.concatenate(metas)

    def verify(self) -> list[str]:
        """Re-hash every shard and check its rows; returns the problems found (empty = verified)."""
        problems = []
        for p in self.points:
            info = self.point(p)
            total = 0
            for shard in info["shards"]:
                try:
                    total += sum(len(b.feats) for b in self.read_shard(shard))
                except LensError as exc:
                    problems.append(str(exc))
            if not problems and total != info["rows"]:
                problems.append(f"point {p}: {total} rows in shards, manifest says {info['rows']}")
        return problems


# ---------------------------------------------------------------- streaming
@dataclass(frozen=True)
class RowFilter:
    """Read-time row selection: ``where`` maps a metadata column to a value or a list of values
    (``{"tp": 1}``, ``{"token_kind": [1]}``, ``{"gt_class": [1, 3]}``); ``tp_fp_ratio`` keeps every kept
    true positive and a seeded random subset of kept false positives so that TP:FP ≈ the ratio (rows of
    tokens whose prediction was not kept are then dropped)."""

    where: Mapping[str, Any] = field(default_factory=dict)
    tp_fp_ratio: float | None = None
    seed: int = 0

    def mask(self, meta: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        keep = np.ones(len(meta), bool)
        for col, val in self.where.items():
            if col not in meta.dtype.names:
                raise LensError(
                    f"filter column {col!r} is not in the Lens metadata ({', '.join(meta.dtype.names)})"
                )
            vals = val if isinstance(val, list | tuple) else [val]
            keep &= np.isin(meta[col], vals)
        if self.tp_fp_ratio is not None:
            rng = rng or np.random.default_rng(self.seed)
            kept = meta["kept"] == 1
            tp = keep & kept & (meta["tp"] == 1)
            fp = np.flatnonzero(keep & kept & (meta["tp"] == 0))
            n_fp = min(len(fp), int(np.ceil(tp.sum() / self.tp_fp_ratio)))
            chosen = np.zeros(len(meta), bool)
            chosen[rng.choice(fp, size=n_fp, replace=False)] = True
            keep = tp | chosen
        return keep


def split_shards(shards: Sequence[Any], rank: int, world: int, worker: int, workers: int) -> list[Any]:
    """The shards one consumer reads: consumer ``rank·workers + worker`` of ``world·workers`` takes every
    (world·workers)-th shard, so no two consumers read the same shard."""
    consumer, consumers = rank * workers + worker, world * workers
    return list(shards[consumer::consumers])


def _dist_info() -> tuple[int, int]:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:  # pragma: no cover
        pass
    return 0, 1


class TokenLoader:
    """Batches of token rows from one point, streamed shard by shard (a torch ``IterableDataset``).

    Each epoch the shard order is a seeded permutation (seed, epoch); each consumer (DDP rank × DataLoader
    worker) takes its own shards; rows of ``buffer_blocks`` consecutive blocks are pooled and permuted, so
    every row is read exactly once per epoch in an order that changes with the epoch and the seed. Yields
    ``{"feats": Tensor[B, d], <meta column>: Tensor[B] …}``; use ``DataLoader(loader, batch_size=None)``.
    ``shards`` restricts the loader to a subset of the point's shards (e.g. all but a held-out one).
    """

    def __init__(
        self,
        lens: Lens | str | Path,
        point: str,
        *,
        batch_size: int = 4096,
        shuffle: bool = True,
        seed: int = 0,
        buffer_blocks: int = 16,
        where: RowFilter | None = None,
        drop_last: bool = False,
        columns: Sequence[str] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        shards: Sequence[Mapping[str, Any]] | None = None,
    ):
        self.lens = lens if isinstance(lens, Lens) else Lens(lens)
        self.shard_subset = list(shards) if shards is not None else None
        self.point = point
        self.lens.point(point)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.buffer_blocks = max(1, buffer_blocks)
        self.where = where
        self.drop_last = drop_last
        self.columns = columns
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def my_shards(self) -> list[dict[str, Any]]:
        import torch.utils.data as tud

        shards = self.shard_subset if self.shard_subset is not None else self.lens.shards(self.point)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(shards))
            shards = [shards[i] for i in order]
        rank, world = (self.rank, self.world_size) if self.rank is not None else _dist_info()
        info = tud.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        return split_shards(shards, rank, world or 1, worker, workers)

    def _batch(self, feats: np.ndarray, meta: np.ndarray) -> dict[str, Any]:
        import torch

        cols = self.columns if self.columns is not None else meta.dtype.names
        out = {"feats": torch.from_numpy(np.ascontiguousarray(feats))}
        for c in cols:
            out[c] = torch.from_numpy(np.ascontiguousarray(meta[c]))
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        shards = self.my_shards()
        consumer = zlib.crc32("\n".join(s["file"] for s in shards).encode())  # stable across processes
        rng = np.random.default_rng([self.seed, self.epoch, consumer])
        pool_f: list[np.ndarray] = []
        pool_m: list[np.ndarray] = []
        carry_f = carry_m = None

        def drain(final: bool):
            nonlocal carry_f, carry_m
            parts_f = ([carry_f] if carry_f is not None else []) + pool_f
            parts_m = ([carry_m] if carry_m is not None else []) + pool_m
            pool_f.clear()
            pool_m.clear()
            if not parts_f:
                return
            f, m = np.concatenate(parts_f), np.concatenate(parts_m)
            if self.shuffle:
                perm = rng.permutation(len(f))
                f, m = f[perm], m[perm]
            n_full = len(f) // self.batch_size * self.batch_size
            for i in range(0, n_full, self.batch_size):
                yield self._batch(f[i : i + self.batch_size], m[i : i + self.batch_size])
            carry_f, carry_m = (f[n_full:], m[n_full:]) if n_full < len(f) else (None, None)
            if final and carry_f is not None and not self.drop_last:
                yield self._batch(carry_f, carry_m)
                carry_f = carry_m = None

        for shard in shards:
            for block in self.lens.read_shard(shard):
                f, m = block.feats, block.meta
                if self.where is not None:
                    keep = self.where.mask(m, rng)
                    f, m = f[keep], m[keep]
                pool_f.append(f)
                pool_m.append(m)
                if len(pool_f) >= self.buffer_blocks:
                    yield from drain(final=False)
        yield from drain(final=True)


def as_torch_dataset(loader: TokenLoader) -> Any:
    """Wrap a :class:`TokenLoader` as a ``torch.utils.data.IterableDataset``."""
    import torch.utils.data as tud

    class _DS(tud.IterableDataset):
        def __iter__(self):
            return iter(loader)

    return _DS()
