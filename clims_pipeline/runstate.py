"""The run-state protocol every stage follows: is an output there and current, resume, sharding, atomicity.

A stage's output lives in a directory with a ``manifest.json``::

    {"stage": "make_cam", "fingerprint": {...}, "complete": true, ...}

The *fingerprint* is exactly what the output depends on: the config sections the stage reads, the seed, and
the fingerprints of the earlier outputs it reads (as short digests). An output is *current* when its manifest
is complete and its fingerprint equals the one the present run would write; a current output is reused, any
other is recomputed, and the stage says which fields changed. Per-image outputs are resumable: files written
before a kill are kept while the fingerprint holds, and only the missing ones are computed, each process
taking every ``world_size``-th of them. Every file goes through :func:`clims_pipeline.files.atomic_write`, so
a file that exists is whole.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from .distributed import DistributedInfo, barrier, broadcast_object
from .files import DamagedFileError, file_proof, file_stamp, read_json, sha256_file, write_json

MANIFEST = "manifest.json"

Item = TypeVar("Item")


def digest(value: Any) -> str:
    """A short, stable digest of a JSON-serialisable value (how a fingerprint names its inputs)."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def as_json(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), so that fingerprints compare equal."""
    return json.loads(json.dumps(value, default=str))


def changed_fields(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted names of the fields that differ between two JSON-like values; a key in only one counts."""
    if isinstance(old, dict) and isinstance(new, dict):
        changed: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in old or key not in new:
                changed.append(name)
            else:
                changed += changed_fields(old[key], new[key], name)
        return changed
    return [] if old == new else [prefix or "(value)"]


def describe_changes(changed: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(changed[:limit])
    return shown + (f" and {len(changed) - limit} more" if len(changed) > limit else "")


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of an output directory, or None when there is none (or it is not a JSON object)."""
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = read_json(path)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def output_digest(directory: Path, what: str) -> str:
    """The digest of a complete output's fingerprint: what a later stage puts in its own fingerprint.

    Raises ``FileNotFoundError`` naming ``what`` (the stage to run) when the output is missing or unfinished.
    """
    manifest = read_manifest(directory)
    if manifest is None or not manifest.get("complete"):
        raise FileNotFoundError(f"no complete output in {directory}: run stage {what} first")
    return digest(manifest["fingerprint"])


#: Files :func:`verify_file` hashed and found whole, with the (size, mtime_ns) and recorded hash it saw: a
#: model or CLIP that several stages of one run load is hashed once.
_VERIFIED: set[tuple[str, tuple[int, ...], str]] = set()


def verify_file(path: Path, stage: str) -> None:
    """Check ``path`` against the size and sha256 its output's manifest recorded (a file the manifest does not
    vouch for, e.g. from an older version, is not checked); raise :class:`DamagedFileError` naming the file
    and saying to rerun ``stage`` with ``--force``."""
    manifest = read_manifest(path.parent) or {}
    proof = (manifest.get("files") or {}).get(path.name)
    if proof is None or not path.is_file():
        return
    stamp = (str(path), tuple(file_stamp(path) or ()), str(proof.get("sha256")))
    if stamp in _VERIFIED:
        return  # hashed already in this process, and unchanged since (size and mtime)
    remedy = f"rerun stage {stage} with --force to rebuild it (or delete {path.parent})"
    size = path.stat().st_size
    if size != proof.get("size"):
        raise DamagedFileError(
            f"{path} is damaged: {size} bytes, but {path.parent / MANIFEST} recorded {proof.get('size')} "
            f"bytes when {stage} wrote it; {remedy}"
        )
    actual = sha256_file(path)
    if actual != proof.get("sha256"):
        raise DamagedFileError(
            f"{path} is damaged: its sha256 is {actual}, but {path.parent / MANIFEST} recorded "
            f"{proof.get('sha256')} when {stage} wrote it; {remedy}"
        )
    _VERIFIED.add(stamp)


_SIZES_CACHE: dict[Path, tuple[list[int] | None, dict[str, Any]]] = {}


def recorded_sizes(directory: Path) -> tuple[str, dict[str, Any]]:
    """The stage that wrote the per-image files of ``directory`` and the sizes its manifest recorded for them
    (``finish_files``); ``{}`` when it recorded none. The manifest is read again only when it changed, so
    a reader can ask once per file."""
    path = directory / MANIFEST
    stamp = file_stamp(path)
    cached = _SIZES_CACHE.get(path)
    if cached is None or cached[0] != stamp:
        manifest = read_manifest(directory) or {}
        sizes = manifest.get("sizes")
        cached = (stamp, {"stage": manifest.get("stage"), "sizes": sizes if isinstance(sizes, dict) else {}})
        _SIZES_CACHE[path] = cached
    return str(cached[1]["stage"]), cached[1]["sizes"]


def size_mismatch(path: Path, sizes: dict[str, Any]) -> str | None:
    """How ``path`` differs from the size ``sizes`` recorded for it (stat only), or None when it does not
    (or nothing was recorded for it)."""
    recorded = sizes.get(path.name)
    if recorded is None:
        return None
    size = path.stat().st_size if path.is_file() else None
    if size == recorded:
        return None
    found = "missing" if size is None else f"{size} bytes"
    return f"{path} is {found}, its manifest recorded {recorded} bytes"


def check_size(path: Path) -> None:
    """Before a later stage reads a per-image output (a CAM ``.npy``, a label PNG): raise
    :class:`DamagedFileError` naming the file and the stage to rerun when its size is not the one its
    output's manifest recorded. Cheap: one ``stat``."""
    stage, sizes = recorded_sizes(path.parent)
    problem = size_mismatch(path, sizes)
    if problem is not None:
        raise DamagedFileError(
            f"{path} is damaged: {problem.removeprefix(f'{path} is ')} (in {path.parent / MANIFEST}); rerun "
            f"stage {stage} to recompute it (only the damaged files are redone), or --force"
        )


class StageOutput:
    """One stage output directory under the protocol (the main rank writes; every rank may read).

    ``is_current()`` / ``reuse()`` tell whether the output is current; ``begin()`` clears a stale output and
    marks the new one as unfinished; ``complete()`` marks it finished. Per-image outputs add ``todo()`` /
    ``share()`` / ``finish_files()``.
    """

    def __init__(
        self,
        stage: str,
        directory: Path,
        fingerprint: dict[str, Any],
        dist: DistributedInfo,
        say: Callable[[str], None],
        force: bool = False,
    ):
        self.stage = stage
        self.directory = directory
        self.fingerprint = as_json(fingerprint)
        self.dist = dist
        self.say = say
        self.force = force

    @property
    def manifest_path(self) -> Path:
        return self.directory / MANIFEST

    def changes(self) -> list[str] | None:
        """None when no manifest is there; else the changed fingerprint fields ([] when equal)."""
        manifest = read_manifest(self.directory)
        if manifest is None:
            return None
        return changed_fields(manifest.get("fingerprint"), self.fingerprint)

    def is_current(self) -> bool:
        """Complete and made with this fingerprint (and no ``--force``)."""
        if self.force:
            return False
        manifest = read_manifest(self.directory)
        return bool(
            manifest is not None
            and manifest.get("complete")
            and manifest.get("fingerprint") == self.fingerprint
        )

    def damaged_files(self) -> list[str]:
        """The files the manifest vouches for (``complete(proofs=...)``, and the per-image files of
        ``finish_files``) whose size is not the recorded one: what a truncated or missing model looks like
        (the cheap check; ``verify_file`` hashes)."""
        manifest = read_manifest(self.directory) or {}
        recorded = manifest.get("sizes")
        sizes: dict[str, Any] = dict(recorded) if isinstance(recorded, dict) else {}
        sizes.update({name: proof.get("size") for name, proof in (manifest.get("files") or {}).items()})
        return [
            problem for name in sizes if (problem := size_mismatch(self.directory / name, sizes)) is not None
        ]

    def reuse(self, what: Path | str | None = None) -> bool:
        """True (after saying so) when the output is current, its files whole, and there is nothing to do."""
        if not self.is_current():
            return False
        damaged = self.damaged_files()
        if damaged:
            self.say(f"[{self.stage}] recomputing in {self.directory}: {describe_changes(damaged, 3)}")
            return False
        self.say(f"[{self.stage}] done already: {what or self.directory} (use --force to redo it)")
        return True

    def begin(self, keep_files: bool = True, refuse_stale_partial: bool = False) -> None:
        """Start (or resume) the output: a stale or forced one is removed first, with the reason.

        With ``keep_files`` an unfinished output made with the same fingerprint keeps its files (resume).
        With ``refuse_stale_partial`` an *unfinished* output made with other settings (a training run that
        was interrupted) is not thrown away: a RuntimeError names what changed and asks for ``--force``.
        Collective: every rank calls it.
        """
        if self.dist.is_main:
            found = read_manifest(self.directory)
            changes = None if found is None else changed_fields(found.get("fingerprint"), self.fingerprint)
            stale = bool(changes)
            manifest = found or {}
            if stale and refuse_stale_partial and not self.force and not manifest.get("complete"):
                raise RuntimeError(
                    f"{self.directory} holds an unfinished {self.stage} run with other settings "
                    f"({describe_changes(changes or [])} changed); rerun with --force to start "
                    f"{self.stage} over"
                )
            if (stale or self.force) and self.directory.exists():
                reason = "--force" if self.force else f"{describe_changes(changes or [])} changed"
                self.say(f"[{self.stage}] recomputing {self.directory} because {reason}")
                self._clear()
            elif not keep_files and self.directory.exists():
                self._clear()
            self.directory.mkdir(parents=True, exist_ok=True)
            # Kept per-image files keep their recorded sizes: todo() recomputes the ones that differ.
            kept = {} if stale or self.force or not keep_files else manifest.get("sizes") or {}
            write_json(
                self.manifest_path,
                {
                    "stage": self.stage,
                    "fingerprint": self.fingerprint,
                    "complete": False,
                    **({"sizes": kept} if kept else {}),
                },
            )
        barrier()

    def _clear(self) -> None:
        # A nested directory with a manifest of its own is another output (e.g. train_aff/labels): it follows
        # its own fingerprint, so it is left alone here.
        for child in self.directory.iterdir():
            if child.is_dir():
                if not (child / MANIFEST).exists():
                    shutil.rmtree(child)
            else:
                child.unlink()

    def complete(self, proofs: Sequence[str] = (), **extra: Any) -> None:
        """Mark the output finished (main rank), with ``extra`` facts for people reading the manifest and the
        size and sha256 of the files named in ``proofs`` (see :func:`verify_file`)."""
        if self.dist.is_main:
            files = {name: file_proof(self.directory / name) for name in proofs}
            write_json(
                self.manifest_path,
                {
                    "stage": self.stage,
                    "fingerprint": self.fingerprint,
                    "complete": True,
                    **({"files": files} if files else {}),
                    **extra,
                },
            )

    # ------------------------------------------------------------------------------------ per-image files

    def todo(self, items: Sequence[Item], path_of: Callable[[Item], Path], what: str = "files") -> list[Item]:
        """The items whose file is not there yet, or whose size is not the one the manifest recorded (stat
        only; said by name), after saying how many are done."""
        sizes = (read_manifest(self.directory) or {}).get("sizes") or {}
        missing = []
        for item in items:
            path = path_of(item)
            if not path.exists():
                missing.append(item)
            elif (problem := size_mismatch(path, sizes)) is not None:
                self.say(f"[{self.stage}] recomputing {problem}")
                missing.append(item)
        self.say(f"[{self.stage}] {len(items) - len(missing)} of {len(items)} {what} done already")
        return missing

    def share(self, items: Sequence[Item]) -> list[Item]:
        """This process's share of ``items``: every ``world_size``-th one, starting at its rank."""
        return list(items[self.dist.rank :: self.dist.world_size])

    def finish_files(self, items: Sequence[Item], path_of: Callable[[Item], Path], **extra: Any) -> None:
        """Wait for every rank, check that every item's file exists, then mark the output complete with each
        file's size (name -> bytes: what ``todo`` and readers check, stat only)."""
        barrier()
        missing = broadcast_object(
            [str(path_of(item)) for item in items if not path_of(item).exists()]
            if self.dist.is_main
            else None
        )
        if missing:
            raise RuntimeError(
                f"{self.stage}: {len(missing)} output files missing after the run, e.g. {missing[0]}"
            )
        sizes = {path.name: path.stat().st_size for path in map(path_of, items)} if self.dist.is_main else {}
        self.complete(items=len(items), sizes=sizes, **extra)
        barrier()
