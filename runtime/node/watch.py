"""Folder watch: for modalities that export files instead of sending C-STORE.

Layer: runtime (node, standard library). The folder is polled (no inotify: it must work on network
shares and in containers); a file counts as complete when its size and modification time have not
changed for ``settle_s``. A complete file is checked as a C-STORE object would be (``admission``),
written to the spool durably, and only then removed from the watched folder, so a crash between
the two takes it twice, never loses it (the redo gives the same output UID). A file the node
cannot take is moved to ``DIR/refused/`` with a ``.reason.json``. Hidden files and our own
temporaries are left alone.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from medsec_edge.runtime.errors import MedsecError
from medsec_edge.runtime.io.atomic import write_bytes_atomic
from medsec_edge.runtime.io.inputs import read_input_bytes
from medsec_edge.runtime.node.admission import admit
from medsec_edge.runtime.node.audit import AuditLog, uid_hash
from medsec_edge.runtime.node.metrics import Metrics
from medsec_edge.runtime.node.spool import Spool

__all__ = ["FolderWatch"]

log = logging.getLogger(__name__)

REFUSED = "refused"


class FolderWatch:
    def __init__(self, folder: Path, spool: Spool, audit: AuditLog, metrics: Metrics,
                 on_spooled: Callable[[str], None], *, interval_s: float = 0.5, settle_s: float = 1.0,
                 on_ready: Callable[[str], None] | None = None) -> None:
        self.folder = Path(folder)
        self.spool = spool
        self.audit = audit
        self.metrics = metrics
        self.on_spooled = on_spooled
        self.on_ready = on_ready  # an object without pixel data that may pass unchanged
        self.interval_s = interval_s
        self.settle_s = settle_s
        self._seen: dict[Path, tuple[int, int]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._loop, name="medsec-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.scan()
            except OSError as exc:
                log.warning("watched folder cannot be read: %s", exc.strerror or type(exc).__name__)
            self._stop.wait(self.interval_s)

    def scan(self) -> int:
        """Take every complete file once; how many were spooled."""
        now = time.time()
        current: dict[Path, tuple[int, int]] = {}
        taken = 0
        for folder, dirs, files in os.walk(self.folder):
            dirs[:] = [d for d in dirs if not d.startswith(".") and not (Path(folder) == self.folder and d == REFUSED)]
            for name in files:
                if name.startswith("."):
                    continue
                path = Path(folder) / name
                try:
                    st = path.lstat()
                except FileNotFoundError:
                    continue
                if not path.is_file() or path.is_symlink():
                    continue
                key = (st.st_size, st.st_mtime_ns)
                if self._seen.get(path) == key and now - st.st_mtime >= self.settle_s:
                    taken += self._take(path)
                else:
                    current[path] = key
                if self._stop.is_set():
                    break
        self._seen = current
        return taken

    def _take(self, path: Path) -> int:
        try:
            data = read_input_bytes(path)
        except Exception as exc:  # noqa: BLE001 - too large, vanished, unreadable: refused with the reason
            return self._refuse(path, f"cannot be read ({type(exc).__name__})")
        admission = admit(data, images_only=self.on_ready is None)
        if not admission.accepted:
            return self._refuse(path, admission.reason, admission.status)
        try:
            spool_id = self.spool.accept(data, ready=not admission.has_pixels)
        except (OSError, MedsecError) as exc:
            log.error("cannot spool a watched file: %s; left in place",
                      getattr(exc, "strerror", None) or type(exc).__name__)
            return 0
        path.unlink()
        self.metrics.count("received")
        self.audit.write("received", spool_id=spool_id, sop_class=admission.sop_class, calling_ae="folder-watch",
                         source_uid_sha256=uid_hash(admission.sop_uid), transfer_syntax=admission.transfer_syntax,
                         bytes=len(data), status_code=0)
        (self.on_spooled if admission.has_pixels else self.on_ready)(spool_id)
        return 1

    def _refuse(self, path: Path, reason: str, code: int = 0xC000) -> int:
        target = self.folder / REFUSED / path.relative_to(self.folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(target.with_name(target.name + ".reason.json"),
                           json.dumps({"reason": reason, "status_code": code}, indent=1).encode())
        os.replace(path, target)
        self.metrics.count("refused")
        self.audit.write("refused", calling_ae="folder-watch", status_code=code, reason=reason,
                         action=f"moved to {REFUSED}/")
        return 0
