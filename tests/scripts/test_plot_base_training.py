"""scripts/plot_base_training.py: phases of one run merge into one curve."""
import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "plot_base_training.py"
spec = importlib.util.spec_from_file_location("plot_base_training", SCRIPT)
plot = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plot)


def _log(path: Path, start: int, evals: dict[int, float]) -> str:
    rows = [{"event": "start", "step": start}] + [{"step": s, "eval": {"vt@128:tok": v}} for s, v in evals.items()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_a_later_phase_replaces_the_earlier_log_from_its_start(tmp_path):
    trunk = _log(tmp_path / "a.jsonl", 0, {10: 0.1, 20: 0.2, 30: 0.3})  # the trunk ran on past 20
    branch = _log(tmp_path / "b.jsonl", 20, {30: 0.9, 40: 1.0})
    evals, starts = plot.read_evals([trunk, branch], until=30)
    assert {s: e["vt@128:tok"] for s, e in evals.items()} == {10: 0.1, 20: 0.2, 30: 0.9}
    assert starts == [20]


def test_writes_the_png(tmp_path):
    trunk = _log(tmp_path / "a.jsonl", 0, {10: 0.1, 20: 0.2})
    out = tmp_path / "curve.png"
    assert plot.main([trunk, "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
