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


def readings(classes: tuple[int | str, ...], names: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """The subfolders among `names` that `classes` select, by the reading of their numbers: "positions" among
    the subfolders (as an older flowspec read them) and "names" (as this one does, `sources._class_indices`: a
    number no subfolder is named by is a position where not all of them are numbers); only the readings by
    which every class is a subfolder there is."""
    numbered = bool(names) and all(name.isdigit() for name in names)

    def subfolder(c: int | str, by_position: bool) -> str | None:
        if isinstance(c, str):
            return c
        if by_position or not (numbered or str(c) in names):
            return names[c] if 0 <= c < len(names) else None
        return str(c)

    read = {way: tuple(subfolder(c, way == "positions") for c in classes) for way in ("positions", "names")}
    return {way: reading for way, reading in read.items() if all(r in names for r in reading)}  # type: ignore[misc]


def names_numbers(old: DataSpec, new: DataSpec, folder: Path | str | None) -> bool:
    """Whether the classes of `new` name the subfolders that the numbers among the classes of `old` select
    by one of their readings (`readings`) on the folder read (`folder`, else the path of `old`), in any
    order: classes select images (`sources._class_indices`), their order changes nothing that is read."""
    path = folder if folder is not None else old.path
    if old.dataset != "folder" or path is None or not any(isinstance(c, int) for c in old.classes or ()):
        return False
    found = readings(tuple(old.classes or ()), folder_classes(Path(path)))
    return set(new.classes or ()) in [set(reading) for reading in found.values()]


def ambiguous(data: DataSpec, recorded: bool, folder: Path | str | None) -> bool:
    """Whether the numbers in `data.classes` of a file that does not record how its run read them
    (`recorded`) may select other subfolders now on the folder read (`folder`, else the spec's path) than its
    run read: read as names (`readings`) they select none, or other ones than read as positions (the same
    subfolders in another order are the same images: `classes (2, 3, ..., 10)` of subfolders 0/ to 10/, 10/
    sorted before 2/, is read alike both ways)."""
    path = folder if folder is not None else data.path
    if recorded or data.dataset != "folder" or not data.classes or path is None:
        return False
    if not any(isinstance(c, int) for c in data.classes):
        return False
    names = folder_classes(Path(path))
    found = readings(data.classes, names)
    return bool(names) and (
        "names" not in found or set(found.get("positions", found["names"])) != set(found["names"])
    )


def check_class_numbers(
    data: DataSpec, recorded: bool, folder: Path | str | None, what: Path | str
) -> DataSpec:
    """`data` to read for the checkpoint or export `what` when it does not record how its run read numbers in
    `classes` (`recorded`), on the folder read (`folder`, else the spec's path): with its classes named where
    only their reading as positions selects subfolders there are (`readings`); refused where neither does,
    and where both do but not the same ones, naming the `--set data.classes=...` of each reading."""
    if not ambiguous(data, recorded, folder):
        return data
    path = folder if folder is not None else data.path
    assert path is not None and data.classes  # (`ambiguous`)
    names = folder_classes(Path(path))
    found = readings(data.classes, names)
    if list(found) == ["positions"]:
        return data.model_copy(update={"classes": found["positions"]})

    def setting(way: str) -> str:
        quoted = ", ".join(f'"{name}"' for name in found[way])
        return shell_command("--set", f"data.classes={quoted if len(data.classes) == 1 else f'({quoted})'}")

    written = data.classes[0] if len(data.classes) == 1 else f"({', '.join(map(str, data.classes))})"
    shown = ", ".join(f"{n}/" for n in names[:6]) + (", ..." if len(names) > 6 else "")
    where = f"its `classes {written}` on {os.path.normpath(path)} (subfolders {shown})"
    if not found:
        raise UserError(
            f"{what} was written before flowspec recorded the data a run read, and {where} select no "
            f"subfolders there are, read as positions among the subfolders (as an older flowspec read "
            f"numbers) or as the subfolders they name (as this flowspec reads them): name the classes the "
            f"run trained on with {shell_command('--set', 'data.classes=...')}, or read the folder it "
            f"trained on with --data"
        )
    i = next(i for i, c in enumerate(data.classes) if isinstance(c, int))
    first, by_position, by_name = data.classes[i], found["positions"][i], found["names"][i]
    raise UserError(
        f"{what} was written before flowspec recorded the data a run read, so {where} may mean positions "
        f"among the subfolders, as an older flowspec read numbers ({first}: {by_position}/), or the "
        f"subfolders they name, as this flowspec reads them ({first}: {by_name}/): name the classes the run "
        f"trained on, {setting('positions')} for positions or {setting('names')} for names"
    )
