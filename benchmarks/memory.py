"""Peak-RSS probes for the memory benchmarks (Linux /proc)."""

from __future__ import annotations

import json
import os
import subprocess
import threading


def rss() -> int:
    """Resident bytes now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> None:
    """Restart the kernel's peak-RSS counter (VmHWM) at the current RSS (Linux: clear_refs 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss() -> int:
    """Peak resident bytes since the process started or the last `reset_peak`."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kib * 1024


def anon_rss() -> int:
    """Resident anonymous bytes now (heap, tensors; not memory-mapped files, which the kernel can drop)."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))
    return kib * 1024


class AnonPeak:
    """Samples `anon_rss` every ``interval`` s in a thread while the block runs; ``.peak`` is the maximum."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, anon_rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> AnonPeak:
        self.peak = anon_rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, anon_rss())


def fresh_process_result(cmd: list[str]) -> dict:
    """Run ``cmd`` (a benchmark's worker mode) in a fresh, offline process; its last ``RESULT {json}`` line."""
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"{' '.join(cmd[1:3])}: failed (exit {out.returncode}): {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(lines[-1][len("RESULT "):])
