"""How much disk a job needs, and where, known before it downloads anything.

At its peak a job holds the download (in the Hub cache; kept, since the evaluation reads the source), every output
file (staged beside --out) and, at different times, either the method's intermediates (GGUF's F16 file and one
--fit candidate; AWQ's packed layers) or the evaluation's scratch (the source's log-probabilities, in temp space).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .report import format_size

if TYPE_CHECKING:
    from .source import SourceInfo


@dataclass(frozen=True)
class DiskPlan:
    download: int   # into the Hub cache: what is not there yet
    outputs: int    # staged beside --out
    work: int       # the method's intermediates, beside --out (GGUF's F16 file) or in temp space
    scratch: int    # the evaluation's, in temp space

    @property
    def peak(self) -> int:
        return self.download + self.outputs + max(self.work, self.scratch)

    def describe(self) -> str:
        parts = [f"download {format_size(self.download)}"] if self.download else []
        parts.append(f"files {format_size(self.outputs)}")
        if self.work:
            parts.append(f"intermediates {format_size(self.work)}")
        if self.scratch:
            parts.append(f"evaluation scratch {format_size(self.scratch)}")
        return ", ".join(parts)


def plan(info: "SourceInfo", sizes: dict[str, int], work: int, scratch: int) -> DiskPlan:
    """The plan for these outputs (`sizes`), the method's intermediates (`work`) and the evaluation's scratch."""
    return DiskPlan(download_bytes(info), sum(sizes.values()), work, scratch)


def download_bytes(info: "SourceInfo") -> int:
    """Bytes `fetch` will download: the files it takes that the Hub cache does not hold yet."""
    if info.local_dir is not None:
        return 0
    from huggingface_hub import try_to_load_from_cache

    assert info.repo_id is not None
    return sum(info.files.get(name) or 0 for name in info.fetched_files
               if not isinstance(try_to_load_from_cache(info.repo_id, name, revision=info.revision), str))


def shortfall(disk: DiskPlan, out_dir: Path, cache_dir: Path) -> str | None:
    """A sentence when a disk the job writes to has less free space than the job needs there, else None."""
    temp = Path(tempfile.gettempdir())
    needs: dict[int, tuple[Path, int]] = {}
    for where, amount in ((cache_dir, disk.download), (out_dir, disk.outputs + disk.work), (temp, disk.scratch)):
        anchor = _existing(where)
        device = os.stat(anchor).st_dev
        place, before = needs.get(device, (anchor, 0))
        needs[device] = (place, before + amount)
    for place, amount in needs.values():
        free = shutil.disk_usage(place).free
        if amount > free:
            return (f"This job needs about {format_size(amount)} of disk on the disk of {place} ({disk.describe()}) "
                    f"and only {format_size(free)} is free: free some space, pick fewer variants, or point --out, "
                    "TMPDIR or HF_HOME at a bigger disk. Nothing was downloaded.")
    return None


def _existing(path: Path) -> Path:
    """The path, or its nearest folder that exists (an output folder is made later)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)
