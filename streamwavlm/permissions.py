"""Files this program writes get the permissions the user's umask gives any new file.

safetensors creates its files readable by their owner only (0600, whatever the umask), so a converted model,
a background model or saved embeddings could not be read by the service account or colleague they were made
for. Every safetensors file written here is set to ``0666 & ~umask`` afterwards, as ``open`` would create it.
"""

from __future__ import annotations

import os
from pathlib import Path


def _umask() -> int:
    try:  # Linux reports it without changing it (os.umask can only be read by setting it)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def as_umask_allows(path: str | Path) -> None:
    """Give ``path`` the permissions a file created with ``open`` would have."""
    os.chmod(path, 0o666 & ~_umask())
