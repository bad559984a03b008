"""Writing a directory without losing what was there.

Every writer of a whole directory (checkpoints, final models, Hugging Face exports, the
converters) writes into ``<name>.tmp-<pid>`` next to it and then calls :func:`replace_dir`,
which moves an existing ``<name>`` aside, renames the new one into place and only then
deletes the old one: a crash at any point leaves either the old or the new directory whole.

:func:`check_output_dir` runs before anything is written and refuses, in one line, a path
that is a file, or a non-empty directory that is not an earlier output of the same kind
(``is_ours``), unless the user asked to overwrite it; so ``--output .`` cannot wipe a
working directory.
"""

import os
import shutil
from pathlib import Path

# An HF export of ours carries this file, so a later export may replace it without --overwrite.
EXPORT_MARKER = ".nemo_aligner_export"


def is_our_export(path) -> bool:
    return (Path(path) / EXPORT_MARKER).is_file()


def check_output_dir(path, is_ours, overwrite: bool = False, what: str = "--output", hint: str = "--overwrite") -> None:
    """Raise ``ValueError`` when writing ``path`` would replace something that is not ours."""
    path = Path(path)
    if path.resolve() == Path.cwd().resolve() or path.resolve() in Path.cwd().resolve().parents:
        raise ValueError(f"{what}={path} is the working directory or one above it; write to a new directory")
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what}={path} is a file; give a directory path")
    if path.is_dir() and any(path.iterdir()) and not is_ours(path) and not overwrite:
        raise ValueError(
            f"{what}={path} is a non-empty directory that is not an earlier output of ours; choose another "
            f"path or pass {hint} to replace it"
        )


def replace_dir(tmp, path) -> Path:
    """Put the finished directory ``tmp`` at ``path``, keeping the old ``path`` until the new
    one is in place."""
    tmp, path = Path(tmp), Path(path)
    old = None
    if path.exists():
        old = path.with_name(f"{path.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path
