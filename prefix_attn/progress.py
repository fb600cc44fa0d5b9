"""The one progress bar of the package (training, generation, the demo): tqdm on stderr.

On a terminal it refreshes ten times a second. Into a log file or a pipe (not a TTY) every
refresh would be another line of output, so there it refreshes at most every `log_interval`
seconds, plus once at the end. ``delay``: shown only once that many seconds have passed
(none for work that ends sooner). Callers pass `refresh=False` to `set_postfix` (which would
otherwise redraw at every call, whatever the interval).
"""
from __future__ import annotations

import sys


def progress_bar(total: int, desc: str, unit: str, *, enabled: bool = True, initial: int = 0,
                 file=None, log_interval: float = 10.0, delay: float = 0.0):
    from tqdm.auto import tqdm

    stream = file if file is not None else sys.stderr
    tty = bool(getattr(stream, "isatty", lambda: False)())
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=not enabled,
                file=stream, dynamic_ncols=tty, mininterval=0.1 if tty else log_interval,
                leave=True, delay=delay)
