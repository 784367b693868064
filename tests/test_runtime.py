from blueglass.config import RuntimeParams, resolve_threads
from blueglass.runtime import progress, setup, write_json


def test_progress_prints_ten_percent_lines_off_terminal(capsys):
    with progress() as bar:  # pytest captures stderr: not a terminal
        task = bar.add_task("train x", total=50, info="")
        for i in range(50):
            bar.update(task, completed=i + 1, info=f"loss {1 / (i + 1):.2f}")
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 10
    assert lines[0] == "train x: 5/50 (10%) loss 0.20"
    assert lines[-1] == "train x: 50/50 (100%) loss 0.02"


def test_threads_setting(monkeypatch):
    import torch

    assert resolve_threads(3) == 3
    assert 1 <= resolve_threads(0) <= 2
    info = setup(RuntimeParams(threads=1, device="cpu"))
    assert info == {"threads": 1, "device": "cpu"} and torch.get_num_threads() == 1


def test_write_json_is_atomic(tmp_path):
    write_json(tmp_path / "m" / "x.json", {"a": 1})
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["x.json"]
