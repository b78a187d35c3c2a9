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

from .distributed import DistributedInfo, all_gather_objects, barrier, broadcast_object
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
#: model or CLIP that several stages of one run load, or a CAM file read twice, is hashed once.
_VERIFIED: set[tuple[str, tuple[int, ...], str]] = set()

#: How many directories above a file its output's manifest may be: per-image files sit beside it, or one
#: level down (eval_seg's ``predictions/<split>/``).
MANIFEST_LEVELS = 2

_RECORDS_CACHE: dict[Path, tuple[list[int] | None, dict[str, Any] | None]] = {}


def recorded_proofs(directory: Path) -> dict[str, Any] | None:
    """What the manifest of ``directory`` vouches for: ``stage``, ``files`` (name -> size and sha256 of the
    models and checkpoints of ``complete(proofs=...)``), ``sizes`` and ``sha256`` (per-image files of
    ``finish_files``, keyed by their path under ``directory``); None without a manifest. The manifest is read
    again only when it changed, so a reader can ask once per file."""
    path = directory / MANIFEST
    stamp = file_stamp(path)
    cached = _RECORDS_CACHE.get(path)
    if cached is None or cached[0] != stamp:
        manifest = read_manifest(directory)
        records: dict[str, Any] | None = None
        if manifest is not None:
            records = {"stage": str(manifest.get("stage"))}
            for field in ("files", "sizes", "sha256"):
                value = manifest.get(field)
                records[field] = value if isinstance(value, dict) else {}
        cached = (stamp, records)
        _RECORDS_CACHE[path] = cached
    return cached[1]


def recorded_proof(path: Path) -> tuple[str, dict[str, Any], Path, bool] | None:
    """The stage, recorded ``{"size", "sha256"}`` and manifest of the output ``path`` belongs to (the nearest
    manifest within :data:`MANIFEST_LEVELS`), and whether it is a per-image file; None when that manifest
    does not vouch for it (a file from an older version, or no manifest)."""
    for directory in list(path.parents)[:MANIFEST_LEVELS]:
        records = recorded_proofs(directory)
        if records is None:
            continue
        key = path.relative_to(directory).as_posix()
        manifest = directory / MANIFEST
        if key in records["files"]:
            return records["stage"], records["files"][key], manifest, False
        if key in records["sizes"]:
            proof = {"size": records["sizes"][key], "sha256": records["sha256"].get(key)}
            return records["stage"], proof, manifest, True
        return None
    return None


def verify_file(path: Path, stage: str | None = None) -> None:
    """The one check of every file a later stage trusts (a model, a checkpoint, a CAM ``.npy``, a label PNG):
    its size and sha256 against those its output's manifest recorded; a file the manifest does not vouch
    for (e.g. from an older version) is not checked. A mismatch raises :class:`DamagedFileError` naming the
    file, its manifest and what to do: rerun the stage (``stage``, else the one the manifest names) with
    ``--force``, or, for a per-image file, delete it and rerun the stage, which recomputes only that file.
    Each file is hashed once per process while its size and mtime hold."""
    found = recorded_proof(path)
    if found is None:
        return
    writer, proof, manifest, per_image = found
    stage = stage or writer
    status = path.stat() if path.is_file() else None
    stamp = (str(path), tuple(file_stamp(path) or ()), str(proof.get("sha256")))
    if status is not None and stamp in _VERIFIED:
        return  # hashed already in this process, and unchanged since (size and mtime)
    remedy = f"rerun stage {stage} with --force to rebuild it (or delete {path.parent})"
    if status is None or status.st_size != proof.get("size"):
        if per_image:  # the rerun's todo() sees the size and recomputes this file alone
            remedy = f"rerun stage {stage} to recompute it alone, or rerun {stage} with --force"
        found_size = "missing" if status is None else f"{status.st_size} bytes"
        raise DamagedFileError(
            f"{path} is damaged: {found_size}, but {manifest} recorded {proof.get('size')} bytes when "
            f"{stage} wrote it; {remedy}"
        )
    if proof.get("sha256") is None:
        return  # sizes only (written before hashes were recorded)
    actual = sha256_file(path)
    if actual != proof.get("sha256"):
        if per_image:  # todo() goes by size (cheap), so a file of the recorded size must go first
            remedy = f"delete it and rerun stage {stage} to recompute it alone, or rerun {stage} with --force"
        raise DamagedFileError(
            f"{path} is damaged: its sha256 is {actual}, but {manifest} recorded {proof.get('sha256')} when "
            f"{stage} wrote it; {remedy}"
        )
    _VERIFIED.add(stamp)


def check_size(path: Path) -> None:
    """The former name of :func:`verify_file` for per-image files (it now checks the hash too)."""
    verify_file(path)


def size_mismatch(path: Path, sizes: dict[str, Any], key: str | None = None) -> str | None:
    """How ``path`` differs from the size ``sizes`` recorded for it under ``key`` (its name by default;
    stat only), or None when it does not (or nothing was recorded for it)."""
    recorded = sizes.get(key or path.name)
    if recorded is None:
        return None
    size = path.stat().st_size if path.is_file() else None
    if size == recorded:
        return None
    found = "missing" if size is None else f"{size} bytes"
    return f"{path} is {found}, its manifest recorded {recorded} bytes"


def as_paths(value: Path | Sequence[Path]) -> tuple[Path, ...]:
    """What ``path_of`` returns (one file per item, or several: eval_seg's plain and CRF predictions)."""
    return (value,) if isinstance(value, Path) else tuple(value)


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
        #: Keys of the per-image files ``todo`` sent to be recomputed (None: todo was not asked), so that
        #: ``finish_files`` hashes those and keeps the recorded hash of the others.
        self._redone: set[str] | None = None

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
            problem
            for name in sizes
            if (problem := size_mismatch(self.directory / name, sizes, name)) is not None
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
            # Kept per-image files keep their recorded sizes and hashes: todo() recomputes the ones whose
            # size differs, finish_files() hashes those again.
            keep = not (stale or self.force or not keep_files)
            kept = {field: manifest.get(field) or {} for field in ("sizes", "sha256")} if keep else {}
            write_json(
                self.manifest_path,
                {
                    "stage": self.stage,
                    "fingerprint": self.fingerprint,
                    "complete": False,
                    **{field: value for field, value in kept.items() if value},
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

    def key(self, path: Path) -> str:
        """How the manifest names a per-image file: its path under the output directory."""
        return path.relative_to(self.directory).as_posix()

    def todo(
        self, items: Sequence[Item], path_of: Callable[[Item], Path | Sequence[Path]], what: str = "files"
    ) -> list[Item]:
        """The items with a file not there yet, or not of the size the manifest recorded (stat only; said by
        name), after saying how many are done. The main rank decides and tells the others, so every rank
        shares out the same list even while another has begun writing. Collective."""
        missing: list[int] | None = None
        if self.dist.is_main:
            sizes = (read_manifest(self.directory) or {}).get("sizes") or {}
            missing = []
            for index, item in enumerate(items):
                for path in as_paths(path_of(item)):
                    if not path.exists():
                        missing.append(index)
                        break
                    if (problem := size_mismatch(path, sizes, self.key(path))) is not None:
                        self.say(f"[{self.stage}] recomputing {problem}")
                        missing.append(index)
                        break
            self.say(f"[{self.stage}] {len(items) - len(missing)} of {len(items)} {what} done already")
            redone = {self.key(path) for index in missing for path in as_paths(path_of(items[index]))}
            self._redone = (self._redone or set()) | redone
        chosen: list[int] = broadcast_object(missing)
        return [items[index] for index in chosen]

    def share(self, items: Sequence[Item]) -> list[Item]:
        """This process's share of ``items``: every ``world_size``-th one, starting at its rank."""
        return list(items[self.dist.rank :: self.dist.world_size])

    def finish_files(
        self, items: Sequence[Item], path_of: Callable[[Item], Path | Sequence[Path]], **extra: Any
    ) -> None:
        """Wait for every rank, check that every item's file exists, then mark the output complete with each
        file's size and sha256 (keyed by :meth:`key`): sizes are what ``todo`` checks (stat only), both are
        what readers check (:func:`verify_file`). The files ``todo`` did not send to be recomputed keep the
        hash recorded when they were written (so a file damaged since stays caught); the others are hashed
        here, each rank hashing its share. Collective."""
        barrier()
        paths = [path for item in items for path in as_paths(path_of(item))]
        plan: tuple[list[str], list[str]] | None = None
        if self.dist.is_main:
            missing = [str(path) for path in paths if not path.exists()]
            recorded = (read_manifest(self.directory) or {}).get("sha256")
            kept = recorded if isinstance(recorded, dict) and self._redone is not None else {}
            fresh = [
                self.key(p) for p in paths if self.key(p) not in kept or self.key(p) in (self._redone or ())
            ]
            plan = (missing, fresh)
        missing, fresh = broadcast_object(plan)
        if missing:
            raise RuntimeError(
                f"{self.stage}: {len(missing)} output files missing after the run, e.g. {missing[0]}"
            )
        mine = {key: sha256_file(self.directory / key) for key in self.share(fresh)}
        hashes = {key: value for share in all_gather_objects(mine) for key, value in share.items()}
        if self.dist.is_main:
            sizes = {self.key(path): path.stat().st_size for path in paths}
            recorded = (read_manifest(self.directory) or {}).get("sha256") or {}
            hashes = {key: hashes[key] if key in hashes else recorded[key] for key in sizes}
            self.complete(items=len(items), sizes=sizes, sha256=hashes, **extra)
        barrier()
