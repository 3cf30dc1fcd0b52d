"""A simulated kill -9 at a counted I/O step: what the data dir holds at that instant, copied aside, so a
restart on the copy shows whether the operation is before or after (never in between).

``crash_copy`` is what survives a kill -9: every file as it is, hard links kept (the change protocols' undo
files are hard links), the database and its WAL (SQLite ignores the frames of a transaction that never
committed); not the ``-shm`` index, which SQLite rebuilds. ``CrashAt`` hooks a ``FaultPlan``'s step counter:
while the plan is armed, the ``at``-th step copies the data dir before it runs.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .seam import FaultPlan


def crash_copy(data_dir: Path, dest: Path) -> None:
    first: dict[int, Path] = {}  # inode -> its first copy, so a hard link stays one file with two names

    def copy_tree(src: Path, out: Path) -> None:
        out.mkdir(parents=True)
        for item in sorted(os.scandir(src), key=lambda e: e.name):
            target = out / item.name
            if item.is_dir(follow_symlinks=False):
                copy_tree(Path(item.path), target)
            elif not item.name.endswith("-shm"):
                inode = item.stat(follow_symlinks=False).st_ino
                if inode in first:
                    os.link(first[inode], target)
                else:
                    shutil.copy2(item.path, target, follow_symlinks=False)
                    first[inode] = target

    copy_tree(data_dir, dest)


class CrashAt:
    """Counts the armed steps of ``plan``; at step ``at`` copies ``data_dir`` to ``crashes / f"crash-{at}"``
    (before the step runs) and records which step it was in ``where`` ("layer:name")."""

    def __init__(self, plan: FaultPlan, data_dir: Path, crashes: Path) -> None:
        self.data_dir, self.crashes = data_dir, crashes
        self.at: int | None = None
        self.total = 0
        self.where: str | None = None
        counted = plan.step

        def step(layer: str, name: str) -> bool:
            if plan.armed:
                self.total += 1
                if self.total == self.at:
                    crash_copy(self.data_dir, self.copy_path(self.total))
                    self.where = f"{layer}:{name}"
            return counted(layer, name)

        plan.step = step  # type: ignore[method-assign]

    def reset(self, at: int) -> None:
        self.at, self.total, self.where = at, 0, None

    def copy_path(self, k: int) -> Path:
        return self.crashes / f"crash-{k}"

    def after_the_end(self, k: int) -> None:
        """A kill right after the operation returned (k past its last step)."""
        crash_copy(self.data_dir, self.copy_path(k))
        self.where = "the end"
