"""One line per phase a person waits through, on stderr, so stdout stays for results."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterator


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@contextmanager
def phase(what: str) -> Iterator[None]:
    """`what ...` when it starts and `what: done in Ns` when it ends."""
    say(f"{what} ...")
    start = time.perf_counter()
    yield
    say(f"{what}: done in {time.perf_counter() - start:.0f}s")
