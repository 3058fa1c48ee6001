"""Wall-clock seconds per named stage, summed over calls."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator


class StageTimer:
    """Wall-clock seconds per named stage: ``with timer("read"): ...`` adds the block's seconds to
    ``timer.seconds["read"]`` (the Predictor's stage hook). ``seconds`` may be a dict of the caller's
    own, which the timer then fills in place."""

    def __init__(self, seconds: dict[str, float] | None = None):
        self.seconds: dict[str, float] = {} if seconds is None else seconds

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
