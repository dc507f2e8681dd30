"""What `ldfleet simulate` shows and measures while it runs: the per-round progress lines and the peak
memory of the whole process tree (Ray actors included)."""

from __future__ import annotations

import os
import threading
from typing import Any

from rich.console import Console

from ldfleet.simulations.scenario import Scenario

# ---- memory of the whole process tree (Ray actors included) ------------------------------------


def _tree_rss_mb(root: int) -> float:
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parts = f.read().rsplit(")", 1)[1].split()
            ppid = int(parts[1])
            with open(f"/proc/{entry}/statm") as f:
                rss[int(entry)] = int(f.read().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total / 2**20


class MemorySampler(threading.Thread):
    """Peak resident memory of this process and all its descendants (sampled every 0.5 s)."""

    def __init__(self) -> None:
        super().__init__(name="memory-sampler", daemon=True)
        self.peak_mb = 0.0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(0.5):
            try:
                self.peak_mb = max(self.peak_mb, _tree_rss_mb(os.getpid()))
            except OSError:
                pass

    def stop(self) -> float:
        self._halt.set()
        try:
            self.peak_mb = max(self.peak_mb, _tree_rss_mb(os.getpid()))
        except OSError:
            pass
        return self.peak_mb


# ---- progress display ---------------------------------------------------------------------------


class Display:
    """One line per round: devices sampled/offline/failed, then per class the task's score on the
    devices' local test clips (accuracy % for kws, WER % for asr) and the mean layers run."""

    def __init__(self, console: Console, scn: Scenario) -> None:
        self.console = console
        self.classes = [c.name for c in scn.classes]
        self.total = scn.rounds
        self.metric = scn.metric
        self.lock = threading.Lock()

    def say(self, text: str) -> None:
        with self.lock:
            self.console.print(text)

    def header(self) -> None:
        cols = "  ".join(f"{c[:10]:>14}" for c in self.classes)
        what = "WER" if self.metric == "wer" else "accuracy"
        self.say(f"[bold]round  sampled offline failed  {cols}    time[/bold]   (class: {what} % / mean layers, local test)")

    def round_done(self, rnd: int, s: dict[str, Any]) -> None:
        ev = s.get("eval") or {}
        cells = []
        for c in self.classes:
            m = ev.get(c)
            value = m.get(self.metric) if m else None
            cells.append(f"{100 * value:6.1f} / {m['mean_layers']:4.1f}" if value is not None else f"{'-':>14}")
        failed = len(s.get("failed", []))
        fail_txt = f"[red]{failed:6d}[/red]" if failed else f"{failed:6d}"
        secs = s.get("seconds", {}).get("total", 0.0)
        self.say(f"{rnd:3d}/{self.total:<3d}{len(s.get('sampled', [])):7d} {len(s.get('offline', [])):7d} {fail_txt}  "
                 + "  ".join(cells) + f"  {secs:5.1f}s")
