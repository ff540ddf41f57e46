"""Progress with a rate for every long loop: a tqdm bar on a terminal, log lines in a pod.

In a terminal (stderr is a TTY) a tqdm bar shows count, rate and ETA. Elsewhere (Kubernetes
pods, CI, KFP) a line like ``captions: 120,000 rows (45,210 rows/s)`` is logged every
``interval_s`` seconds, plus a final one, so logs stay readable.
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("stablerep")


class Progress:
    """Counts units of work and reports them with a rate.

    Args:
        desc: what is being counted (``"captions"``).
        unit: the unit's name (``"rows"``, ``"img"``).
        total: the expected count, when known (enables ETA).
        interval_s: seconds between log lines when not on a terminal.
        enabled: set False to stay silent.
    """

    def __init__(self, desc: str, unit: str = "it", total: int | None = None,
                 interval_s: float = 10.0, enabled: bool = True):
        self.desc, self.unit, self.total = desc, unit, total
        self.interval_s = interval_s
        self.count = 0
        self.start = time.perf_counter()
        self._last_log = self.start
        self._bar = None
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=f" {unit}", unit_scale=True,
                             dynamic_ncols=True, mininterval=0.5)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def rate(self) -> float:
        return self.count / max(self.elapsed, 1e-9)

    def update(self, n: int = 1) -> None:
        self.count += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.perf_counter()
        if now - self._last_log >= self.interval_s:
            self._last_log = now
            log.info("%s", self.line())

    def line(self) -> str:
        done = f"{self.count:,}" + (f"/{self.total:,}" if self.total else "")
        rate = self.rate
        shown = f"{rate:,.0f}" if rate >= 10 else f"{rate:.2g}"
        text = f"{self.desc}: {done} {self.unit} ({shown} {self.unit}/s"
        if self.total and self.rate > 0 and self.count < self.total:
            text += f", ETA {(self.total - self.count) / self.rate:,.0f}s"
        return text + ")"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled:
            log.info("%s in %.1fs", self.line(), self.elapsed)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
