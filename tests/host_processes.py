"""Helpers the hostile-program tests share (not a test module)."""

import os
from pathlib import Path


def processes_with(marker: str) -> list[int]:
    """PIDs of the host's processes whose command line contains ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if marker.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
            except OSError:
                pass
    return found
