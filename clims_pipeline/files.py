"""Atomic file output and the shared ``results.json``.

Every file the pipeline writes goes through :func:`atomic_write`: the content is written to a temporary file
in the same directory and renamed over the target, so a killed run leaves either the old file or the new
one, never a truncated file that a rerun would trust.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch


def current_umask() -> int:
    """The process umask, read from /proc where it can be (Linux), else set and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(file)`` on a temporary file next to ``path``; rename it to ``path`` when it succeeds.

    The file gets the mode a plain ``open(path, "w")`` would give it (``0o666`` less the umask), not the
    owner-only ``0o600`` of ``tempfile.mkstemp``, so shared result folders stay readable by the group.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            os.fchmod(file.fileno(), 0o666 & ~current_umask())
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary_name, target)
    except BaseException:
        # Leave nothing behind that a later run could mistake for output.
        Path(temporary_name).unlink(missing_ok=True)
        raise
    return target


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    return atomic_write(path, lambda file: file.write(text.encode("utf-8")))


def read_json(path: str | os.PathLike[str]) -> Any:
    with open(path, encoding="utf-8") as file:
        return json.load(file)


class DamagedFileError(RuntimeError):
    """An output or checkpoint file is damaged (truncated, corrupt or changed); the message names it and
    says what to do."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_proof(path: Path) -> dict[str, Any]:
    """What a manifest records of a file a later stage trusts: its size and sha256."""
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def load_torch_file(
    path: Path, remedy: str, weights_only: bool = False, map_location: str | torch.device = "cpu"
) -> Any:
    """``torch.load`` that names the file when it cannot be read (truncated, corrupt, not a torch file),
    with ``remedy`` (what to do), instead of a bare ``OSError`` or unpickling error."""
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except FileNotFoundError:
        raise
    except Exception as error:  # torch raises OSError, RuntimeError, EOFError, UnpicklingError, ...
        size = path.stat().st_size if path.exists() else 0
        raise DamagedFileError(
            f"{path} ({size} bytes) is damaged and cannot be loaded ({type(error).__name__}: {error}); "
            f"{remedy}"
        ) from error


def save_torch(path: str | os.PathLike[str], obj: Any) -> Path:
    return atomic_write(path, lambda file: torch.save(obj, file))


def save_npy(path: str | os.PathLike[str], obj: Any) -> Path:
    """Save an array, or a dict of arrays as a pickled 0-d object array (the IRN/PSA ``.npy`` CAM format)."""
    return atomic_write(path, lambda file: np.save(file, obj, allow_pickle=True))


def save_png(path: str | os.PathLike[str], image: Any) -> Path:
    """Save a PIL image as PNG."""
    return atomic_write(path, lambda file: image.save(file, format="PNG"))


@contextmanager
def file_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """An advisory inter-process lock (POSIX ``flock``) on ``path``, created if missing."""
    lock_path = Path(path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as lock_file:
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)


class DamagedResultsError(ValueError):
    """``results.json`` is not a JSON object; the message names the file and what is wrong with it."""


def read_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``results.json`` at ``path`` ({} when there is none); :class:`DamagedResultsError` names the file
    when it is not JSON or not a JSON object."""
    results_path = Path(path)
    if not results_path.exists():
        return {}
    try:
        results = read_json(results_path)
    except (ValueError, UnicodeDecodeError) as error:
        raise DamagedResultsError(f"{results_path} is damaged: not JSON ({error})") from error
    if not isinstance(results, dict):
        raise DamagedResultsError(
            f"{results_path} is damaged: expected a JSON object, got {type(results).__name__}"
        )
    return results


#: Each evaluation stage also writes its results.json entry to ``<workdir>/<stage>/result_<key>.json``: the
#: stages' own outputs that a damaged (or missing) ``results.json`` is rebuilt from.
RESULT_FILE_PREFIX = "result_"


def result_file(stage_dir: Path, key: str) -> Path:
    """Where a stage keeps its own copy of its ``results.json`` entry ``key``."""
    return stage_dir / f"{RESULT_FILE_PREFIX}{key}.json"


def write_result_files(stage_dir: Path, updates: dict[str, Any]) -> None:
    """Write each entry of ``updates`` atomically to its own file in ``stage_dir`` (:func:`result_file`)."""
    for key, value in updates.items():
        write_json(result_file(stage_dir, key), value)


def rebuild_results(workdir: Path) -> dict[str, Any]:
    """``results.json`` as the stages' own result files (``<workdir>/*/result_<key>.json``) make it up; a
    damaged one of those is skipped with a warning naming it (its stage writes it again when rerun)."""
    results: dict[str, Any] = {}
    for path in sorted(workdir.glob(f"*/{RESULT_FILE_PREFIX}*.json")):
        try:
            results[path.stem[len(RESULT_FILE_PREFIX) :]] = read_json(path)
        except (OSError, ValueError, UnicodeDecodeError) as error:
            warnings.warn(
                f"{path} is damaged ({error}); its entry is left out of the rebuilt results (rerun the "
                f"stage in {path.parent.name} to write it again)",
                stacklevel=2,
            )
    return results


def move_aside(path: Path, why: str) -> Path:
    """Rename a damaged file to ``<name>.damaged-<timestamp>`` (kept for the user) and warn naming both."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = path.with_name(f"{path.name}.damaged-{stamp}")
    counter = 1
    while aside.exists():
        aside = path.with_name(f"{path.name}.damaged-{stamp}-{counter}")
        counter += 1
    os.replace(path, aside)
    warnings.warn(
        f"{why}; moved it aside to {aside} and rebuilt {path} from the stages' own result files "
        f"({path.parent}/*/{RESULT_FILE_PREFIX}<key>.json)",
        stacklevel=4,  # the caller of update_results / recover_results
    )
    return aside


def _read_or_rebuild(results_path: Path, rebuild_missing: bool) -> tuple[dict[str, Any], bool]:
    """Under the caller's lock: the results at ``results_path`` and False; or, for a damaged file (moved aside
    with a warning) or a missing one when ``rebuild_missing``, the rebuilt results and True."""
    try:
        if results_path.exists() or not rebuild_missing:
            return read_results(results_path), False
    except DamagedResultsError as error:
        move_aside(results_path, str(error))
    return rebuild_results(results_path.parent), True


def recover_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The results at ``path``; a damaged file is moved aside (with a warning naming both files) and, like a
    missing one, rebuilt from the stages' own result files (see :func:`rebuild_results`) and written back
    when there is anything to write."""
    results_path = Path(path)
    with file_lock(results_path.with_name(f".{results_path.name}.lock")):
        results, rebuilt = _read_or_rebuild(results_path, rebuild_missing=True)
        if rebuilt and results:
            write_json(results_path, results)
    return results


def update_results(path: str | os.PathLike[str], updates: dict[str, Any]) -> dict[str, Any]:
    """Merge ``updates`` (top-level keys, one per stage) into the JSON file at ``path``; return the result.

    The read-modify-write runs under a lock and ends in an atomic rename, so stages that finish at the same
    time (or a run killed mid-write) never lose or truncate another stage's keys. A damaged file (not JSON,
    or not a JSON object) never costs a figure: it is moved aside to ``results.json.damaged-<time>`` with a
    warning naming both files, and the new file is rebuilt from the stages' own result files (see
    :func:`rebuild_results`) plus ``updates``.
    """
    results_path = Path(path)
    with file_lock(results_path.with_name(f".{results_path.name}.lock")):
        merged, _ = _read_or_rebuild(results_path, rebuild_missing=False)
        merged.update(updates)
        write_json(results_path, merged)
    return merged


# ------------------------------------------------------------------------------------------------------
# the one rule of every derived cache


def file_stamp(path: Path) -> list[int] | None:
    """What a cache keys one input file by: its size and modification time (ns); None when it is missing."""
    try:
        status = path.stat()
    except OSError:
        return None
    return [status.st_size, status.st_mtime_ns]


class StampedCache:
    """A JSON cache of per-item values, each entry keyed by the one rule every cache here follows:
    the size and modification time of each file the value was derived from, plus the class list.

    An entry whose files changed (edited, replaced, touched, removed) is stale and ``get`` misses; so is the
    whole cache when the class list (or ``context``, e.g. which checks ran) changed. ``force`` (``--force``)
    ignores what is on disk. ``path`` None keeps everything in memory.
    """

    RULE = "size+mtime_ns of each input file, plus the class list"

    def __init__(
        self, path: Path | None, class_names: Sequence[str], context: Any = None, force: bool = False
    ):
        self.path = path
        self.key = {"rule": self.RULE, "class_names": list(class_names), "context": context}
        self.entries: dict[str, list[Any]] = {}
        if path is not None and not force and path.is_file():
            try:
                stored = read_json(path)
            except (OSError, ValueError):
                stored = None  # a damaged cache is only a slower run
            if isinstance(stored, dict) and stored.get("key") == json.loads(json.dumps(self.key)):
                entries = stored.get("entries")
                self.entries = entries if isinstance(entries, dict) else {}

    @staticmethod
    def stamps(files: Sequence[Path]) -> list[Any]:
        return [[str(path), file_stamp(path)] for path in files]

    def get(self, item: str, stamps: list[Any], default: Any = None) -> Any:
        """The cached value of ``item`` when it was derived from files with exactly these ``stamps``."""
        entry = self.entries.get(item)
        if isinstance(entry, list) and len(entry) == 2 and entry[0] == stamps:
            return entry[1]
        return default

    def put(self, item: str, stamps: list[Any], value: Any) -> None:
        self.entries[item] = [stamps, value]

    def save(self, **readable: Any) -> None:
        """Write the cache, with ``readable`` views of it for people (never read back)."""
        if self.path is not None:
            write_json(self.path, {**readable, "key": self.key, "entries": self.entries})
