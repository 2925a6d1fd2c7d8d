"""The run report: plots and an HTML page from a run folder's JSON lines."""

from __future__ import annotations

import json

from lowband.sim.report import read_jsonl, write_report


def test_report_from_synthetic_run(tmp_path) -> None:
    metrics = [
        {"t": t, "tokens": 1000 * t, "loss": 5.0 - 0.1 * t, "val_loss": (5.1 - 0.1 * t) if t % 5 == 0 else None,
         "sync_bytes_sent": 100 * t, "activation_bytes_sent": 10_000 * t, "live_nodes": 8 - (t > 10),
         "live_per_stage": {"0": 2, "1": 2, "2": 2 - (t > 10), "3": 2}}
        for t in range(20)
    ]
    events = [{"t": 10.5, "kind": "preempt", "node_id": "stage2-5", "stage": 2, "detail": "SIGKILL <script>"},
              {"t": 14.0, "kind": "recovery", "node_id": "stage2-9", "stage": 2, "detail": "checkfree"}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in metrics) + "\n{broken\n")
    (tmp_path / "events.jsonl").write_text("\n".join(json.dumps(e) for e in events) + "\n")
    page = write_report(tmp_path, {"final_val_loss": 3.2, "recoveries": 1})
    for name in ("loss.png", "bytes.png", "membership.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000
    text = page.read_text()
    assert 'src="loss.png"' in text and "membership.png" in text
    assert "checkfree" in text and "&lt;script&gt;" in text  # events shown, escaped
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 20  # the malformed line is skipped
