"""The run report: PNG plots from a run folder's JSON lines, and an HTML page that shows them.

Input records (one JSON object per line):
- ``metrics.jsonl``: ``t`` (seconds since start), ``tokens``, ``loss``, ``val_loss``
  (null when not evaluated), ``sync_bytes_sent``, ``activation_bytes_sent``,
  ``state_bytes_sent``, ``live_nodes``, ``live_per_stage`` ({stage: count}).
- ``events.jsonl``: ``t``, ``kind`` (join, death, leave, preempt, recovery, ...),
  ``node_id``, ``stage``, ``detail``.
"""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FAILURE_KINDS = ("death", "preempt", "kill")
RECOVERY_KINDS = ("recovery",)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("skipping a malformed line in %s", path)
    return records


def _mark_events(ax: Any, events: list[dict[str, Any]], *, alpha: float, linestyle: str) -> None:
    """Failures in red, recoveries in green, as vertical lines at their time."""
    for e in events:
        color = "red" if e.get("kind") in FAILURE_KINDS else "green" if e.get("kind") in RECOVERY_KINDS else None
        if color is not None:
            ax.axvline(float(e["t"]), color=color, alpha=alpha, linestyle=linestyle, linewidth=1)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _series(records: list[dict[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        if r.get(x) is not None and r.get(y) is not None:
            xs.append(float(r[x]))
            ys.append(float(r[y]))
    return xs, ys


def make_plots(run_dir: Path) -> list[Path]:
    """Write loss, bytes and membership plots into `run_dir`; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = read_jsonl(run_dir / "metrics.jsonl")
    events = read_jsonl(run_dir / "events.jsonl")
    written: list[Path] = []

    fig, (ax_t, ax_tok) = plt.subplots(1, 2, figsize=(11, 4))
    for key, style in (("loss", "-"), ("val_loss", "o-")):
        xs, ys = _series(metrics, "t", key)
        ax_t.plot(xs, ys, style, label=key, markersize=3)
        xs, ys = _series(metrics, "tokens", key)
        ax_tok.plot(xs, ys, style, label=key, markersize=3)
    _mark_events(ax_t, events, alpha=0.3, linestyle="-")
    ax_t.set(xlabel="wall-clock (s)", ylabel="loss (nats/byte)", title="loss vs time (red: failures, green: recoveries)")
    ax_tok.set(xlabel="tokens", ylabel="loss (nats/byte)", title="loss vs tokens")
    ax_t.legend()
    ax_tok.legend()
    written.append(_save(fig, run_dir / "loss.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("sync_bytes_sent", "activation_bytes_sent", "state_bytes_sent"):
        xs, ys = _series(metrics, "t", key)
        ax.plot(xs, [y / 1e6 for y in ys], label=key)
    ax.set(xlabel="wall-clock (s)", ylabel="MB (cumulative)", title="bytes on the wire")
    ax.legend()
    written.append(_save(fig, run_dir / "bytes.png"))

    fig, ax = plt.subplots(figsize=(8, 4))
    stages = sorted({int(s) for r in metrics for s in (r.get("live_per_stage") or {})})
    for stage in stages:
        xs = [float(r["t"]) for r in metrics if "live_per_stage" in r]
        ys = [int((r.get("live_per_stage") or {}).get(str(stage), 0)) for r in metrics if "live_per_stage" in r]
        ax.step(xs, ys, where="post", label=f"stage {stage}")
    _mark_events(ax, events, alpha=0.4, linestyle="--")
    ax.set(xlabel="wall-clock (s)", ylabel="live replicas", title="membership (red: failures, green: recoveries)")
    if stages:
        ax.legend(ncol=min(4, len(stages)))
    written.append(_save(fig, run_dir / "membership.png"))
    return written


def write_html(run_dir: Path, summary: dict[str, Any], plots: list[Path]) -> Path:
    """A self-contained page: the summary table, the plots, the event log."""
    events = read_jsonl(run_dir / "events.jsonl")
    rows = "\n".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>"
        for k, v in summary.items() if not isinstance(v, dict) and k not in ("sample", "sample_prompt")
    )
    hosts = _per_host_table(summary)
    sample = ""
    if summary.get("sample") is not None:
        sample = (f"<h2>Sample from {html.escape(Path(str(summary.get('model_file', 'model.pt'))).name)}</h2>"
                  f"<pre>{html.escape(str(summary.get('sample_prompt', '')) + str(summary['sample']))}</pre>")
    images = "\n".join(f'<p><img src="{html.escape(p.name)}" alt="{html.escape(p.stem)}"></p>' for p in plots)
    event_rows = "\n".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(_fmt(e.get(k)))}</td>" for k in ("t", "kind", "node_id", "stage", "detail")
        )
        + "</tr>"
        for e in events
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>lowband run report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:left}}</style></head>
<body><h1>lowband run report</h1>
<h2>Summary</h2><table>{rows}</table>
{hosts}
{sample}
<h2>Plots</h2>{images}
<h2>Events</h2><table><tr><th>t (s)</th><th>kind</th><th>node</th><th>stage</th><th>detail</th></tr>
{event_rows}</table></body></html>
"""
    path = run_dir / "report.html"
    path.write_text(page)
    return path


PER_HOST_COLUMNS = (
    ("network_bytes", "bytes its interface sent (kernel)"),
    ("application_bytes_sent", "bytes lowband counted (activations + sync)"),
    ("peak_rss_bytes", "peak resident memory"),
)


def _per_host_table(summary: dict[str, Any]) -> str:
    """One row per host for the summary's per-host figures (kernel bytes beside lowband's own count)."""
    columns = [(key, label) for key, label in PER_HOST_COLUMNS if isinstance(summary.get(key), dict)]
    if not columns:
        return ""
    names = sorted({name for key, _ in columns for name in summary[key].get("per_host", {})})
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in columns)
    body = "\n".join(
        f"<tr><td>{html.escape(name)}</td>"
        + "".join(f"<td>{html.escape(_fmt(summary[key]['per_host'].get(name)))}</td>" for key, _ in columns)
        + "</tr>" for name in names)
    totals = "".join(f"<td>{html.escape(_fmt(summary[key].get('total', summary[key].get('max'))))}</td>"
                     for key, _ in columns)
    return (f"<h2>Per host</h2><table><tr><th>host</th>{head}</tr>\n{body}\n"
            f"<tr><th>total (memory: max)</th>{totals}</tr></table>")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return ""
    return str(value)


def write_report(run_dir: Path, summary: dict[str, Any]) -> Path:
    plots = make_plots(run_dir)
    return write_html(run_dir, summary, plots)
