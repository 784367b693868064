"""Lens datasets: writer/reader round trip, streaming, splitting, damage detection, extraction."""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import torchrun_cmd

from blueglass.data import CocoDataset
from blueglass.features.align import meta_dtype
from blueglass.features.extract import record_lens
from blueglass.features.lens import (
    Lens,
    LensError,
    LensWriter,
    RowFilter,
    TokenLoader,
    as_torch_dataset,
    merge_parts,
    split_shards,
    write_manifest,
)
from blueglass.models import load_adapter


def _synthetic_lens(root: Path, n_blocks=6, rows_per_block=10, d=8, blocks_per_shard=2):
    """A two-point Lens of known values: feats[i] = row index, meta image_id = block*100 + row//5."""
    w = LensWriter(root, {"a": d, "b": d // 2}, blocks_per_shard=blocks_per_shard)
    dt = meta_dtype([])
    expected = {}
    for blk in range(n_blocks):
        idx = np.arange(blk * rows_per_block, (blk + 1) * rows_per_block)
        meta = np.zeros(rows_per_block, dt)
        meta["image_id"] = blk * 100 + np.arange(rows_per_block) // 5
        meta["token_id"] = np.arange(rows_per_block) % 5
        meta["tp"] = idx % 3 == 0
        meta["kept"] = idx % 2 == 0
        feats = (idx[:, None] + np.linspace(0, 0.5, d)[None]).astype(np.float16)
        w.add_block(blk, {"a": feats, "b": feats[:, : d // 2] * 2}, {"a": meta, "b": meta})
        expected[f"{blk:08d}"] = feats
    parts = [w.close()]
    points = merge_parts(parts, {"a": {"d": d, "dtype": "float16"}, "b": {"d": d // 2, "dtype": "float16"}})
    write_manifest(root, {"name": "syn", "points": points})
    return expected


def test_round_trip_bit_exact_and_joinable(tmp_path):
    expected = _synthetic_lens(tmp_path)
    lens = Lens(tmp_path)
    assert lens.points == ["a", "b"]
    assert lens.point("a")["rows"] == 60 and len(lens.shards("a")) == 3
    blocks_a = {b.key: b for b in lens.blocks("a")}
    blocks_b = {b.key: b for b in lens.blocks("b")}
    assert blocks_a.keys() == blocks_b.keys() == expected.keys()
    for key, feats in expected.items():
        assert blocks_a[key].feats.dtype == np.float16
        assert blocks_a[key].feats.tobytes() == feats.tobytes()  # bit-exact
        assert np.array_equal(blocks_a[key].meta, blocks_b[key].meta)  # same rows, joined by key
        assert np.array_equal(blocks_b[key].feats, feats[:, :4] * 2)
    feats, meta = lens.load_point("a")
    assert feats.shape == (60, 8) and len(meta) == 60
    np.testing.assert_allclose(lens.point("a")["mean"], feats.astype(np.float64).mean(0), rtol=1e-6)
    tp_feats, tp_meta = lens.load_point("a", RowFilter(where={"tp": 1}))
    assert len(tp_meta) == 20 and (tp_meta["tp"] == 1).all()
    assert not list(tmp_path.rglob(".*.tmp"))


def _epoch_rows(loader, epoch):
    loader.set_epoch(epoch)
    return np.concatenate([b["feats"][:, 0].float().numpy() for b in loader])


def test_shuffle_covers_every_row_once_and_changes(tmp_path):
    _synthetic_lens(tmp_path)
    loader = TokenLoader(tmp_path, "a", batch_size=7, seed=0, buffer_blocks=3)
    e0, e1 = _epoch_rows(loader, 0), _epoch_rows(loader, 1)
    other_seed = _epoch_rows(TokenLoader(tmp_path, "a", batch_size=7, seed=1, buffer_blocks=3), 0)
    for rows in (e0, e1, other_seed):
        assert sorted(rows.tolist()) == list(range(60))  # every row exactly once
    assert e0.tolist() != e1.tolist() and e0.tolist() != other_seed.tolist()
    assert (
        e0.tolist()
        == _epoch_rows(TokenLoader(tmp_path, "a", batch_size=7, seed=0, buffer_blocks=3), 0).tolist()
    )
    batches = list(TokenLoader(tmp_path, "a", batch_size=7, shuffle=False))
    assert [len(b["feats"]) for b in batches] == [7] * 8 + [4]
    assert set(batches[0]) >= {"feats", "image_id", "tp", "token_kind"}
    assert [len(b["feats"]) for b in TokenLoader(tmp_path, "a", batch_size=7, drop_last=True)] == [7] * 8


def test_rank_and_worker_split_covers_each_shard_once(tmp_path):
    shards = list(range(11))
    seen = [s for r in range(2) for w in range(3) for s in split_shards(shards, r, 2, w, 3)]
    assert sorted(seen) == shards
    _synthetic_lens(tmp_path, n_blocks=8, blocks_per_shard=1)
    per_rank = [
        _epoch_rows(TokenLoader(tmp_path, "a", batch_size=5, rank=r, world_size=2), 3) for r in range(2)
    ]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(np.concatenate(per_rank).tolist()) == list(range(80))
    # through a torch DataLoader with 2 workers: each worker reads its own shards
    ds = torch.utils.data.DataLoader(
        as_torch_dataset(TokenLoader(tmp_path, "a", batch_size=5)),
        batch_size=None,
        num_workers=2,
    )
    rows = np.concatenate([b["feats"][:, 0].float().numpy() for b in ds])
    assert sorted(rows.tolist()) == list(range(80))


def test_tp_fp_ratio_filter(tmp_path):
    _synthetic_lens(tmp_path)
    _, meta = Lens(tmp_path).load_point("a", RowFilter(tp_fp_ratio=1.0))
    assert (meta["kept"] == 1).all()
    assert (meta["tp"] == 1).sum() == (meta["tp"] == 0).sum() == 10


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_shard_is_named(tmp_path, damage):
    _synthetic_lens(tmp_path)
    shard = tmp_path / Lens(tmp_path).shards("a")[1]["file"]
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        shard.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[700] ^= 0x01
        shard.write_bytes(bytes(data))
    lens = Lens(tmp_path)
    with pytest.raises(LensError, match=f"shard .*{shard.parent.name}/{shard.name}: sha256 mismatch"):
        list(TokenLoader(lens, "a", batch_size=8))
    with pytest.raises(LensError, match=shard.name):
        lens.load_point("a")
    problems = lens.verify()
    assert len(problems) == 1 and shard.name in problems[0]
    proc = subprocess.run(
        [sys.executable, "-m", "blueglass.cli", "lens", "verify", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1 and shard.name in proc.stderr and "FAIL" in proc.stderr
    # even without the checksum, a truncated tar is an error, not a silent skip
    if damage == "truncate":
        with pytest.raises(LensError, match=f"{shard.name}: not a complete tar"):
            lens.read_shard(lens.shards("a")[1], check=False)


def test_reads_urls(tmp_path):
    _synthetic_lens(tmp_path)
    import fsspec

    mem = fsspec.filesystem("memory")
    for f in tmp_path.rglob("*"):
        if f.is_file():
            mem.pipe(f"/lens/syn/{f.relative_to(tmp_path).as_posix()}", f.read_bytes())
    remote = Lens("memory://lens/syn")
    assert remote.load_point("a")[0].shape == (60, 8)
    piped = Lens(f"file://{tmp_path}", shard_root=f"pipe:cat {tmp_path}/")
    assert sorted(_epoch_rows(TokenLoader(piped, "a", batch_size=16), 0).tolist()) == list(range(60))


def _extract(project, name="toy-detector-test", **kw):
    from blueglass.config import load_params

    p = load_params(project / "params.yaml")
    spec = p.extract.lenses[name]
    adapter = load_adapter(project / "models" / spec.model)
    ds = CocoDataset.load(project / p.dataset.path / spec.split)
    out = project / "lens" / name
    kwargs = dict(batch_size=3, block_images=4, blocks_per_shard=2) | kw
    return record_lens(adapter, ds, spec.points, out, **kwargs), out, adapter, ds


def _shard_digests(root):
    return {
        f.relative_to(root).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(root.rglob("*.tar"))
    }


def test_extraction_is_deterministic_and_matches_predictions(smoke_project):
    manifest, out, adapter, ds = _extract(smoke_project)
    first = _shard_digests(out)
    manifest2, out2, _, _ = _extract(smoke_project)
    assert _shard_digests(out2) == first and len(first) == 3 * 2  # 3 points × ceil(3 blocks / 2)
    lens = Lens(out)
    assert lens.verify() == []
    assert lens.manifest["dataset"]["fingerprint"] == ds.fingerprint
    assert lens.manifest["model"]["weights_sha256"] == adapter.weights_sha256
    feats, meta = lens.load_point("head")
    assert len(meta) == len(ds) * 16 and feats.shape[1] == 7
    # the kept tokens are exactly the detections the benchmark scores
    with torch.no_grad():
        recs = ds.images[:3]
        dets = adapter.postprocess(
            adapter.forward(adapter.preprocess([ds.load_image(r) for r in recs])), [(64, 64)] * 3
        )
    for r, d in zip(recs, dets, strict=True):
        kept = np.sort(meta["token_id"][(meta["image_id"] == r.id) & (meta["kept"] == 1)])
        assert kept.tolist() == sorted(d.token_ids.tolist())
    l0 = lens.load_point("vit.layers.0")[1]
    assert len(l0) == len(ds) * 17 and (l0["token_kind"][l0["token_id"] == 0] == 0).all()


def test_killed_extraction_then_rerun(smoke_project):
    """SIGKILL the extracting process after its first block (no handlers run), then rerun."""
    out = smoke_project / "lens" / "toy-detector-test"
    if out.exists():
        shutil.rmtree(out)
    code = f"""
import os, signal, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_lens import _extract
from pathlib import Path
seen = []
def kill(n):
    seen.append(n)
    if len(seen) == 5:  # after the first block was written, inside the second
        os.kill(os.getpid(), signal.SIGKILL)
_extract(Path({str(smoke_project)!r}), tick=kill)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not out.exists()  # nothing half-written in place
    tmp = out.with_name(f".{out.name}.tmp")
    assert any(tmp.rglob("*.tar*"))  # it was killed midway, with shard files begun
    _extract(smoke_project)
    assert not tmp.exists() and Lens(out).verify() == []
    assert Lens(out).point("head")["rows"] == 12 * 16


def test_two_process_extraction_matches_single(smoke_project):
    single = Lens(_extract(smoke_project, block_images=2)[1])
    single_rows = {p: single.load_point(p) for p in single.points}
    p = smoke_project / "params.yaml"
    text = p.read_text()
    multi_params = smoke_project / "params-ddp.yaml"
    multi_params.write_text(text.replace("block_images: 4", "block_images: 2"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env["BLUEGLASS_ROOT"] = str(smoke_project)
    cmd = torchrun_cmd(
        29531,
        "-m",
        "blueglass.cli",
        "extract",
        "toy-detector-test",
        "--params",
        str(multi_params),
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=smoke_project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    multi = Lens(smoke_project / "lens" / "toy-detector-test")
    assert multi.manifest["ranks"] == 2 and multi.verify() == []
    assert {s["file"].split("/")[1][:9] for s in multi.shards("head")} == {"shard-000", "shard-001"}
    for pt, (feats, meta) in single_rows.items():
        mf, mm = multi.load_point(pt)
        o1 = np.lexsort((meta["token_id"], meta["image_id"]))
        o2 = np.lexsort((mm["token_id"], mm["image_id"]))
        assert np.array_equal(meta[o1], mm[o2])
        np.testing.assert_allclose(feats[o1].astype(np.float32), mf[o2].astype(np.float32), atol=2e-2)


def test_cli_unknown_point_is_one_line_and_writes_nothing(smoke_project):
    bad = smoke_project / "params-bad-point.yaml"
    bad.write_text(
        (smoke_project / "params.yaml").read_text().replace('points: ["resid.0"]', 'points: ["resid.9"]')
    )
    env = {**os.environ, "BLUEGLASS_ROOT": str(smoke_project)}
    proc = subprocess.run(
        [sys.executable, "-m", "blueglass.cli", "extract", "toy-vlm-test_single", "--params", str(bad)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown hook point 'resid.9' (valid: ")
    assert not (smoke_project / "lens" / "toy-vlm-test_single").exists()
    assert not (smoke_project / "lens" / ".toy-vlm-test_single.tmp").exists()


def test_control_lens_records_a_random_copy(smoke_project):
    trained = Lens(_extract(smoke_project)[1])
    trained_rows = trained.load_point("vit.layers.0")[0]
    manifest, out, adapter, ds = _extract(smoke_project, block_images=4)
    adapter.reinitialize(7)
    control = Lens(
        record_lens(adapter, ds, ["resid.0"], smoke_project / "lens" / "control", block_images=4)
        and smoke_project / "lens" / "control"
    )
    assert control.manifest["model"]["control"]["seed"] == 7
    assert control.manifest["model"]["weights_sha256"] is None
    assert control.manifest["model"]["name"].endswith("-random")
    rows = control.load_point("vit.layers.0")[0]
    assert rows.shape == trained_rows.shape and not np.array_equal(rows, trained_rows)
    proc = subprocess.run(
        [sys.executable, "-m", "blueglass.cli", "lens", "info", str(control.root)],
        capture_output=True,
        text=True,
    )
    assert "RANDOM INIT (seed 7)" in proc.stdout
