"""SIGTERM as Ctrl-C, for processes that must clean up when stopped (`ray job stop`, a parent's terminate)."""

from __future__ import annotations

import signal


class sigterm_as_interrupt:
    """Within the block, SIGTERM raises KeyboardInterrupt, so `finally` clauses run (buffered rows are
    flushed, child processes stopped). Outside the main thread, where no handler can be set, it does nothing."""

    def __enter__(self):
        self.previous = None
        try:
            self.previous = signal.signal(signal.SIGTERM, self._raise)
        except ValueError:  # not the main thread
            pass
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
