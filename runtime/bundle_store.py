"""A device's bundle store: signed bundles installed side by side, one current, switched atomically.

Layer: runtime (the bundle, on a device). A device directory holds::

    versions/<name>-<sha12>/   one verified copy per signed release (sha12: of its manifest bytes)
    current -> versions/...    a relative symlink: what every command loads with --bundle DIR
    previous -> versions/...   what rollback switches back to
    install.log                JSON lines: time, action, version, signer key id (no patient data)

A version folder appears whole or not at all (copied into a temporary folder inside the device
directory, verified again there, renamed), and each switch replaces a symlink with
``os.replace``, so a command that resolves ``current`` gets the old bundle or the new one, never
half of one. Commands resolve ``current`` once, to the version folder, so a switch during a run
does not change the bundle under it. Installs and rollbacks on one directory take a lock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from medsec_edge.runtime.bundle import MANIFEST_FILE, Bundle, open_bundle
from medsec_edge.runtime.errors import BundleError, UsageError
from medsec_edge.runtime.io.atomic import fsync_dir

log = logging.getLogger(__name__)

__all__ = [
    "StoreChange",
    "current_bundle",
    "install_bundle",
    "is_device_dir",
    "read_install_log",
    "resolve_bundle_path",
    "rollback",
]

VERSIONS = "versions"
CURRENT = "current"
PREVIOUS = "previous"
INSTALL_LOG = "install.log"
_LOCK = ".lock"
_STAGING = ".staging-"
_TRASH = ".trash-"


@dataclass(frozen=True)
class StoreChange:
    """What an install or a rollback did. ``action``: ``install`` (copied and made current),
    ``switch`` (already installed, made current), ``unchanged`` (already current), ``rollback``."""

    action: str
    device_dir: Path
    version: str  # the version folder's name: <name>-<sha12>
    name: str
    key_id: str
    previous: str | None  # the version ``previous`` points to afterwards
    removed: tuple[str, ...] = ()  # versions deleted by ``keep``

    @property
    def path(self) -> Path:
        return self.device_dir / VERSIONS / self.version

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "device": str(self.device_dir),
            "current": f"{VERSIONS}/{self.version}",
            "name": self.name,
            "key_id": self.key_id,
            "previous": f"{VERSIONS}/{self.previous}" if self.previous else None,
            "removed": [f"{VERSIONS}/{v}" for v in self.removed],
        }


# --------------------------------------------------------------------------------------------
# Reading a device directory


def is_device_dir(path: Path | str) -> bool:
    """A directory with a ``current`` link and no manifest of its own."""
    path = Path(path)
    return (
        path.is_dir()
        and ((path / CURRENT).is_symlink() or (path / CURRENT).exists())
        and not (path / MANIFEST_FILE).exists()
    )


def resolve_bundle_path(path: Path | str) -> Path:
    """``path`` itself for a bundle (folder or ``.tar``); a device directory's current version folder."""
    path = Path(path)
    return current_bundle(path) if is_device_dir(path) else path


def current_bundle(device_dir: Path | str) -> Path:
    """The version folder ``device_dir/current`` points to; ``BundleError`` if there is none."""
    device_dir = Path(device_dir)
    version = _link_version(device_dir, CURRENT)
    if version is None:
        raise BundleError(
            f"device directory {device_dir} has no current bundle: install one with "
            f"'medsec-edge bundle install BUNDLE --device {device_dir}'"
        )
    target = device_dir / VERSIONS / version
    if not target.is_dir():
        raise BundleError(
            f"device directory {device_dir}: current points to {VERSIONS}/{version}, which does not "
            f"exist: install the bundle again, or 'medsec-edge bundle rollback --device {device_dir}'"
        )
    return target


def read_install_log(device_dir: Path | str) -> list[dict[str, Any]]:
    """The install log's records, oldest first (an unreadable line is skipped, not fatal)."""
    path = Path(device_dir) / INSTALL_LOG
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return records


def _link_version(device_dir: Path, name: str) -> str | None:
    """The version a ``current``/``previous`` link names, None without the link; refuses a link
    that is not ``versions/<one folder>`` (the store only ever writes those)."""
    link = device_dir / name
    if not link.is_symlink():
        if link.exists():
            raise BundleError(
                f"device directory {device_dir}: {name} is not a symlink: it must be a link into "
                f"{VERSIONS}/ made by 'medsec-edge bundle install'; move it away and install again"
            )
        return None
    target = os.readlink(link)
    parts = Path(target).parts
    if len(parts) != 2 or parts[0] != VERSIONS or parts[1] in (".", ".."):
        raise BundleError(
            f"device directory {device_dir}: {name} points to {target!r}, expected {VERSIONS}/<version>: "
            f"install a bundle again with 'medsec-edge bundle install BUNDLE --device {device_dir}'"
        )
    return parts[1]


# --------------------------------------------------------------------------------------------
# Changing a device directory


def install_bundle(
    bundle: Path | str,
    device_dir: Path | str,
    *,
    trusted_keys: Any = None,
    public_key: Any = None,
    device_probe: Any = None,
    keep: int | None = None,
) -> StoreChange:
    """Verify ``bundle`` (a folder, a ``.tar`` or another device directory), copy it into
    ``device_dir/versions/<name>-<sha12>``, verify the copy, and make it current; the version
    that was current becomes ``previous``. A version already installed (and still verifying) is
    not copied again, only switched to.

    ``keep``: besides the current version, keep the ``keep`` most recently used ones (the
    previous one always, since rollback needs it) and delete the others; None keeps all.
    Trust (``trusted_keys``, ``public_key``) and ``device_probe`` are as in ``open_bundle``.
    """
    if keep is not None and keep < 0:
        raise UsageError(f"keep must be 0 or more, got {keep}")
    device_dir = Path(device_dir)
    if (device_dir / MANIFEST_FILE).exists():
        raise UsageError(f"{device_dir} is a bundle, not a device directory: pass another --device DIR")
    verify = {"trusted_keys": trusted_keys, "public_key": public_key, "device_probe": device_probe}
    opened = open_bundle(resolve_bundle_path(bundle), **verify)
    version = opened.version_id
    (device_dir / VERSIONS).mkdir(parents=True, exist_ok=True)
    with _locked(device_dir):
        _sweep(device_dir)
        target = device_dir / VERSIONS / version
        action = "install"
        if target.exists() or target.is_symlink():
            if _same_release(target, opened, verify):
                action = "switch"
            else:
                log.warning("installed copy %s fails verification: replacing it", target)
                _discard(target)
        if action == "install":
            _copy_verified(opened, target, verify)
        current = _link_version(device_dir, CURRENT)
        previous = _link_version(device_dir, PREVIOUS)
        if current != version:
            if current is not None:
                _point(device_dir, PREVIOUS, current)
                previous = current
            _point(device_dir, CURRENT, version)
        elif action == "switch":
            action = "unchanged"
        os.utime(target)  # recency, for keep
        removed = _prune(device_dir, keep, version, previous) if keep is not None else ()
        change = StoreChange(action, device_dir, version, opened.manifest.name, opened.key_id, previous, removed)
        _log(device_dir, change)
    log.info("bundle %s: %s (previous: %s)", action, version, previous)
    return change


def rollback(
    device_dir: Path | str,
    *,
    trusted_keys: Any = None,
    public_key: Any = None,
    device_probe: Any = None,
) -> StoreChange:
    """Make ``previous`` current and ``current`` previous, after verifying the version switched to."""
    device_dir = Path(device_dir)
    if not device_dir.is_dir():
        raise BundleError(f"device directory {device_dir} does not exist: install a bundle first")
    with _locked(device_dir):
        current = _link_version(device_dir, CURRENT)
        previous = _link_version(device_dir, PREVIOUS)
        if previous is None or previous == current:
            raise BundleError(
                f"device directory {device_dir} has no previous bundle to roll back to (it needs two "
                f"installs): install the one you want with 'medsec-edge bundle install BUNDLE --device {device_dir}'"
            )
        target = device_dir / VERSIONS / previous
        if not target.is_dir():
            raise BundleError(
                f"device directory {device_dir}: previous points to {VERSIONS}/{previous}, which does not "
                "exist: install that bundle again instead"
            )
        try:
            opened = open_bundle(target, trusted_keys=trusted_keys, public_key=public_key,
                                 device_probe=device_probe)
        except BundleError as exc:
            raise BundleError(
                f"rollback refused: the previous bundle {VERSIONS}/{previous} fails verification, "
                f"current stays {VERSIONS}/{current}: {exc}"
            ) from None
        _point(device_dir, CURRENT, previous)
        if current is not None:
            _point(device_dir, PREVIOUS, current)
        os.utime(target)
        change = StoreChange("rollback", device_dir, previous, opened.manifest.name, opened.key_id, current)
        _log(device_dir, change)
    log.info("bundle rollback: %s (previous: %s)", previous, current)
    return change


def _same_release(target: Path, opened: Bundle, verify: dict[str, Any]) -> bool:
    try:
        installed = open_bundle(target, **verify)
    except BundleError as exc:
        log.warning("%s: %s", target, exc)
        return False
    return installed.manifest_bytes == opened.manifest_bytes


def _copy_verified(opened: Bundle, target: Path, verify: dict[str, Any]) -> None:
    """Write the bundle's verified bytes into a staging folder beside ``versions``, verify that
    copy as it will be read, then rename it to ``target``."""
    device_dir = target.parent.parent
    staging = Path(tempfile.mkdtemp(prefix=_STAGING, dir=device_dir))
    try:
        written: set[str] = set()
        for relative, data in opened.files():
            if relative in written:  # two models sharing one file, already verified by each hash
                continue
            written.add(relative)
            dest = staging / relative
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(dest, "xb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        staging.chmod(0o755)
        copy = open_bundle(staging, **verify)
        if copy.manifest_bytes != opened.manifest_bytes:
            raise BundleError(f"the copy in {staging} has another manifest than {opened.path}: disk error?")
        fsync_dir(staging)
        os.rename(staging, target)
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _point(device_dir: Path, name: str, version: str) -> None:
    """Make ``device_dir/name`` a link to ``versions/<version>`` in one step (a new link renamed
    over the old one)."""
    temporary = device_dir / f".{name}.{os.getpid()}.{secrets.token_hex(4)}"
    os.symlink(f"{VERSIONS}/{version}", temporary)
    try:
        os.replace(temporary, device_dir / name)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    fsync_dir(device_dir)


def _prune(device_dir: Path, keep: int, current: str, previous: str | None) -> tuple[str, ...]:
    others = [p for p in (device_dir / VERSIONS).iterdir() if p.is_dir() and p.name not in (current, previous)]
    others.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    room = max(keep - (1 if previous else 0), 0)
    removed = tuple(sorted(p.name for p in others[room:]))
    for name in removed:
        _discard(device_dir / VERSIONS / name)
    return removed


def _discard(path: Path) -> None:
    """Remove a version folder: renamed aside first, so it is gone from versions/ at once."""
    aside = path.parent.parent / f"{_TRASH}{path.name}.{secrets.token_hex(4)}"
    os.rename(path, aside)
    if aside.is_symlink() or aside.is_file():
        aside.unlink()
    else:
        shutil.rmtree(aside, ignore_errors=True)


def _sweep(device_dir: Path) -> None:
    """Leftovers of an install that was killed: staging folders, discarded versions, temp links."""
    for leftover in device_dir.iterdir():
        if leftover.name.startswith((_STAGING, _TRASH)) and leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        elif leftover.name.startswith((f".{CURRENT}.", f".{PREVIOUS}.")) and leftover.is_symlink():
            leftover.unlink()


def _log(device_dir: Path, change: StoreChange) -> None:
    record = {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "action": change.action,
        "version": f"{VERSIONS}/{change.version}",
        "name": change.name,
        "key_id": change.key_id,
        "previous": f"{VERSIONS}/{change.previous}" if change.previous else None,
    }
    if change.removed:
        record["removed"] = [f"{VERSIONS}/{v}" for v in change.removed]
    with open(device_dir / INSTALL_LOG, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


@contextlib.contextmanager
def _locked(device_dir: Path) -> Iterator[None]:
    """One install or rollback at a time on ``device_dir`` (an advisory lock where fcntl exists)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the renames stay atomic
        yield
        return
    with open(device_dir / _LOCK, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
