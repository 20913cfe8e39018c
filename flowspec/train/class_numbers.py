"""Numbers in a `folder` dataset's `classes`, in a checkpoint or export from before a run recorded its data.

A flowspec before subfolders named by numbers were read by name took a number in `classes` as a position
among the sorted subfolders (`classes 1` with subfolders 1/ 2/ 3/: 2/); this one takes it as the subfolder it
names (1/). A checkpoint without `data_fingerprints` (an export without `data_recorded`) may come from either,
so where the two readings differ, evaluating or resuming it is refused until `--set data.classes` names the
classes it trained on, instead of reading other classes than the run trained on without a word.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from flowspec.errors import UserError, shell_command
from flowspec.spec import DataSpec

#: the checkpoint entry, and the export's metadata entry, whose presence says the run read numbers as names
RECORDED, EXPORT_RECORDED = "data_fingerprints", "data_recorded"


def written_reading_names(spec_text: str) -> bool:
    """Whether the stored spec (JSON) of an export without `data_recorded` comes from a run of a flowspec
    that read numbers in `classes` as names: it holds `tf_eps`, which every spec written has held since that
    setting came (commit 98e86ae), after numbers became names (5a92376). An export between the two cannot
    tell, and its other metadata is no proof (its `precision` comes from the checkpoint, which recorded one
    before numbers became names). A checkpoint needs no such proof: it has held `data_fingerprints` since
    before `tf_eps`."""
    try:
        train = json.loads(spec_text).get("train")
    except (ValueError, AttributeError):
        return False
    return isinstance(train, dict) and "tf_eps" in train


def folder_classes(path: Path) -> tuple[str, ...]:
    """The class subfolders of a `folder` dataset (`sources._folder_plan`, `images.list_folder`): the sorted
    subfolders of its training folder (`train/` in a folder split into train/ and test/), hidden ones left
    out; none when it cannot be read (reading the data says why)."""
    try:
        subfolders = {p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")}
        if "train" in subfolders and (subfolders & {"test", "val", "valid"} or subfolders == {"train"}):
            path = path / "train"
            subfolders = {p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")}
    except OSError:
        return ()
    return tuple(sorted(subfolders))


def read_otherwise(data: DataSpec, names: tuple[str, ...]) -> bool:
    """Whether this flowspec reads a number among `data.classes` as another subfolder of `names` than the
    position an older flowspec read it as (`sources._class_mask`)."""
    numbered = bool(names) and all(name.isdigit() for name in names)
    for c in data.classes or ():
        if isinstance(c, int) and (numbered or str(c) in names):
            old = names[c] if 0 <= c < len(names) else None
            if old != str(c):
                return True
    return False


def ambiguous(data: DataSpec, recorded: bool, folder: Path | str | None) -> bool:
    """Whether the numbers in `data.classes` of a file that does not record how its run read them
    (`recorded`) are read otherwise now on the folder read (`folder`, else the spec's path)."""
    path = folder if folder is not None else data.path
    if recorded or data.dataset != "folder" or not data.classes or path is None:
        return False
    if not any(isinstance(c, int) for c in data.classes):
        return False
    return read_otherwise(data, folder_classes(Path(path)))


def check_class_numbers(data: DataSpec, recorded: bool, folder: Path | str | None, what: Path | str) -> None:
    """Refuse to read `data` for the checkpoint or export `what` when it does not record how its run read
    numbers in `classes` (`recorded`) and the two readings of them differ on the folder read (`folder`, else
    the spec's path), naming the `--set data.classes=...` of each reading."""
    if not ambiguous(data, recorded, folder):
        return
    path = folder if folder is not None else data.path
    assert path is not None and data.classes  # (`ambiguous`)
    names = folder_classes(Path(path))
    numbered = all(name.isdigit() for name in names)

    def reading(c: int | str, by_position: bool) -> str:
        if isinstance(c, str):
            return c
        if by_position or not (numbered or str(c) in names):
            return names[c] if 0 <= c < len(names) else str(c)  # one past the last: refused by reading it
        return str(c)

    def setting(by_position: bool) -> str:
        quoted = ", ".join(f'"{reading(c, by_position)}"' for c in data.classes)
        return shell_command("--set", f"data.classes={quoted if len(data.classes) == 1 else f'({quoted})'}")

    written = data.classes[0] if len(data.classes) == 1 else f"({', '.join(map(str, data.classes))})"
    first = next(c for c in data.classes if isinstance(c, int))
    shown = ", ".join(f"{n}/" for n in names[:6]) + (", ..." if len(names) > 6 else "")
    raise UserError(
        f"{what} was written before flowspec recorded the data a run read, so its `classes {written}` on "
        f"{os.path.normpath(path)} (subfolders {shown}) may mean positions among the subfolders, as an older "
        f"flowspec read numbers ({first}: {reading(first, True)}/), or the subfolders they name, as this "
        f"flowspec reads them ({first}: {reading(first, False)}/): name the classes the run trained on, "
        f"{setting(True)} for positions or {setting(False)} for names"
    )
