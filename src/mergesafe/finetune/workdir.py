"""Where a fine-tuning run writes, so that an interrupted run can be resumed and OUT is never
half-written.

Every run works in ``OUT.partial`` (a folder beside OUT): the trainer's ``checkpoint-N``
folders, ``train_log.jsonl`` and finally the model all land there.  Only when everything is
written is ``OUT.partial`` renamed to ``OUT`` (an existing OUT, allowed by ``overwrite`` or
``resume``, is first renamed aside and deleted only after the swap).  So:

* a run killed at any point leaves OUT as it was, and its checkpoints in ``OUT.partial``;
* ``resume`` continues from the last ``checkpoint-N`` of ``OUT.partial``, or, when there is no
  partial run, of a finished OUT (its checkpoints are hard-linked into a new ``OUT.partial``
  so that OUT stays intact until the resumed run is done);
* without ``resume`` a leftover ``OUT.partial`` is an error (``overwrite`` deletes it), unless it
  holds no file at all (a run killed before it wrote anything): that one is simply replaced;
* a run that fails (bad input found late, an error, Ctrl-C) before its first checkpoint removes
  its ``OUT.partial`` (and the parent folders it created), as there is nothing to resume.

This is the same write-beside-then-rename pattern as
`mergesafe.checkpoint.atomic.atomic_output_dir`, with a work folder that outlives a crash.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path

from mergesafe.errors import UserError

_CKPT = re.compile(r"^checkpoint-(\d+)$")


def work_dir_for(out: Path) -> Path:
    """The work folder of `out`: ``OUT.partial`` beside it."""
    return out.with_name(out.name + ".partial")


def checkpoints(folder: Path) -> list[Path]:
    """``checkpoint-N`` sub-folders of `folder`, by step."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if p.is_dir() and (m := _CKPT.match(p.name)) and (p / "trainer_state.json").is_file()]
    return [p for _, p in sorted(found)]


def _nonempty(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def _holds_files(folder: Path) -> bool:
    """Whether anything but (nested) empty folders is in `folder`."""
    for _, _, files in os.walk(folder):
        if files:
            return True
    return False


def missing_parents(out: Path) -> list[Path]:
    """The ancestors of `out` that do not exist yet (outermost first): what `prepare` creates."""
    return [p for p in reversed(Path(os.path.abspath(out)).parents) if not p.exists()]


def check_out(out: Path, *, overwrite: bool, resume: bool) -> None:
    """Refuse an OUT that would be clobbered (read-only: creates nothing)."""
    for parent in Path(os.path.abspath(out)).parents:  # the nearest existing ancestor
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise UserError("is not a folder, so the output folder cannot be created in it",
                                path=parent)
            break
    if (out.exists() or out.is_symlink()) and not out.is_dir():
        raise UserError("output path exists and is not a folder", path=out)
    if _nonempty(out) and not (overwrite or resume):
        raise UserError("output folder exists and is not empty (pass --overwrite to replace it "
                        "or --resume to continue its training)", path=out)
    work = work_dir_for(out)
    if (work.exists() or work.is_symlink()) and (work.is_symlink() or not work.is_dir()):
        raise UserError(f"{work.name} (the work folder of this output) exists and is not a folder",
                        path=out)
    if work.exists() and _holds_files(work) and not (overwrite or resume):
        raise UserError(f"an interrupted run is in {work.name} (pass --resume to continue it or "
                        "--overwrite to start again)", path=out)


def _link_tree(src: Path, dst: Path) -> None:
    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link)


def prepare(out: Path, *, overwrite: bool, resume: bool) -> tuple[Path, Path | None]:
    """Create the work folder and return it with the checkpoint to resume from (or None)."""
    work = work_dir_for(out)
    if resume:
        if checkpoints(work):
            return work, checkpoints(work)[-1]
        if checkpoints(out):
            if work.exists():
                shutil.rmtree(work)
            work.mkdir(parents=True)
            for ckpt in checkpoints(out):
                _link_tree(ckpt, work / ckpt.name)
            if (out / "train_log.jsonl").is_file():
                shutil.copy2(out / "train_log.jsonl", work / "train_log.jsonl")
            return work, checkpoints(work)[-1]
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    return work, None


def finish(work: Path, out: Path) -> Path:
    """Move the finished work folder to `out`, replacing (then deleting) an old OUT."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out, old)
    try:
        os.replace(work, out)
    except BaseException:
        if old is not None:  # the old OUT goes back where it was
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


def discard(out: Path, created: list[Path]) -> None:
    """After a failed run: remove its work folder when it holds no checkpoint to resume from
    (a half-written model or log is nothing to keep), then the parents the run created, when empty.
    A work folder with checkpoints stays for ``--resume``."""
    work = work_dir_for(out)
    if work.is_dir() and not work.is_symlink() and not checkpoints(work):
        shutil.rmtree(work, ignore_errors=True)
    for parent in reversed(created):  # innermost first
        try:
            parent.rmdir()
        except OSError:
            break
