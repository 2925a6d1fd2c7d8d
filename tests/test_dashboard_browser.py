"""The dashboard in a real browser: a short simulated run with the dashboard on, its page loaded in
headless Chromium (Debian's ``chromium`` package; .ci/run installs it), and the page's DOM read back:
every live node and every stage is shown and the loss chart has points. The screenshot lands in the
run directory (``dashboard.png``).

Skipped where Chromium is not installed, unless ``LOWBAND_REQUIRE_CHROMIUM=1`` (CI) makes that a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

RUN = """
[model]
stages = 3
seq_len = 64

[train]
steps = 2000
eval_every = 50
microbatches = 2
microbatch_size = 4

[diloco]
inner_steps = 6
fragments = 1

[skippipe]
skip_ratio = 0.0
planner = "full"

[membership]
heartbeat_interval_s = 0.3
lease_s = 3.0

[sim]
origins = 2
replicas_per_stage = 1
max_wall_s = 150
"""
LOSS_POINTS = 3
BROWSER_TIMEOUT_S = 60


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("LOWBAND_REQUIRE_CHROMIUM") == "1":
            pytest.fail("chromium is not installed (apt-get install chromium); LOWBAND_REQUIRE_CHROMIUM=1")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return path


class _Dom(HTMLParser):
    """What the test reads from the rendered page: replicas, stages, loss points, the live count."""

    def __init__(self) -> None:
        super().__init__()
        self.replicas: set[str] = set()
        self.stages: set[str] = set()
        self.loss_points = 0
        self.live = ""
        self._in_live = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "tr" and "replica" in classes:
            self.replicas.add(a["data-node-id"] or "")
        if tag == "div" and "stage" in classes:
            self.stages.add(a["data-stage"] or "")
        if tag == "circle" and "loss-point" in classes:
            self.loss_points += 1
        self._in_live = a.get("id") == "live"

    def handle_data(self, data: str) -> None:
        if self._in_live:
            self.live += data.strip()


def _browser(chromium: str, profile: Path, url: str, *args: str) -> str:
    """One headless page load; the page's timers run for a few seconds of virtual time first."""
    proc = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--user-data-dir={profile}", "--window-size=1400,1100",
                           "--virtual-time-budget=6000", *args, url],
                          capture_output=True, text=True, timeout=BROWSER_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def _status(base: str, token: str) -> dict[str, Any]:
    request = urllib.request.Request(base + "api/status", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as reply:
        return json.loads(reply.read())


def _live(doc: dict[str, Any]) -> set[str]:
    return {n["node_id"] for n in doc["nodes"] if n["state"] in ("alive", "recovering")}


@pytest.mark.timeout(300)
def test_dashboard_page_shows_the_run(tmp_path: Path, sim_process: Callable[..., subprocess.Popen]) -> None:
    chromium = _chromium()
    out = tmp_path / "run"
    (tmp_path / "sim.toml").write_text(RUN)
    proc = sim_process(out, "--config", str(tmp_path / "sim.toml"))
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, b"")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while not (found := [m for raw in list(lines) if (m := re.search(r"dashboard: (\S+)", raw.decode()))]):
            assert proc.poll() is None and time.monotonic() < deadline, b"".join(lines).decode()[-3000:]
            time.sleep(0.2)
        url = found[0].group(1)
        base, token = url.split("?token=")
        # wait until every stage is covered, every live node has stepped and each origin has a loss curve
        deadline = time.monotonic() + 150
        while True:
            assert proc.poll() is None, b"".join(lines).decode()[-3000:]
            doc = _status(base, token)
            nodes = [n for n in doc["nodes"] if n["state"] == "alive"]
            origins = [n["node_id"] for n in nodes if n["stage"] == 0]
            if all(doc["stage_coverage"][str(s)] > 0 for s in range(3)) and len(nodes) == 4 and \
                    all(n["step"] > 0 for n in nodes) and len(origins) == 2 and \
                    all(len(doc["loss"].get(o, [])) >= LOSS_POINTS for o in origins):
                break
            assert time.monotonic() < deadline, json.dumps(doc)[-3000:]
            time.sleep(1.0)

        dom = _Dom()
        before = _live(doc)
        dom.feed(_browser(chromium, tmp_path / "profile", url, "--dump-dom"))
        after = _live(_status(base, token))
        # no node is preempted in this run; a lease that lapses on a loaded machine may still change
        # membership meanwhile: the page shows every node live throughout, and only nodes live at some point
        assert before & after <= dom.replicas <= before | after, (dom.replicas, before, after)
        assert dom.stages == {"0", "1", "2"}
        assert dom.live == str(len(dom.replicas))
        assert dom.loss_points >= 2 * LOSS_POINTS

        shot = out / "dashboard.png"
        _browser(chromium, tmp_path / "profile", url, f"--screenshot={shot}")
        assert shot.stat().st_size > 10_000
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)   # the simulator stops every process it started
            proc.wait(timeout=60)
