"""Signed model bundles: what a device trusts to run, and the checks before it runs anything.

Layer: runtime. A bundle is a directory (or a ``.tar`` of one) holding ``manifest.json``, the
model files it names, and ``manifest.sig``: a raw 64-byte Ed25519 signature over the exact
manifest bytes. ``open_bundle`` verifies, in this order and before any model byte is
deserialized: the signature (with a given key or one from the trust store), the manifest
version, every model file's sha256, and whether the bundle can run here: what its ``requires``
asks of this installation (medsec-edge version, ONNX opset) and each model's target. A damaged
bundle (a changed byte in any of its files, in a directory or a ``.tar``) is refused with
``BundleError``, never another exception. Writing and signing live here too (``write_bundle``,
``pack_tar``, ``default_requires``, key helpers) so the export side can produce bundles without
this module importing onnx or torch.
"""

from __future__ import annotations

import base64
import binascii
import bz2
import gzip
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import logging
import lzma
import os
import re
import shutil
import stat
import tarfile
import tempfile
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Iterator, Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from medsec_edge.runtime.backends.base import Session, TensorSpec
from medsec_edge.runtime.errors import BundleError, KeyFileError, UsageError

log = logging.getLogger(__name__)

__all__ = [
    "MANIFEST_VERSION",
    "split_variant",
    "Bundle",
    "Manifest",
    "ModelEntry",
    "TensorSpec",
    "default_requires",
    "default_trust_dir",
    "generate_signing_key",
    "key_id",
    "load_public_key",
    "load_signing_key",
    "model_compatibility",
    "onnxruntime_max_opset",
    "open_bundle",
    "pack_tar",
    "peek_manifest",
    "runtime_version",
    "trusted_public_keys",
    "version_id",
    "version_satisfies",
    "write_bundle",
]

MANIFEST_VERSION = 1
MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"
TRUSTED_KEYS_ENV = "MEDSEC_EDGE_TRUSTED_KEYS"
PRECISIONS = ("fp32", "fp16", "int8-qdq")
ONNXRUNTIME_TARGET = "onnxruntime"
_HASH_SHOWN = 12  # hex digits of a hash shown in messages (and of a version id)
REQUIREMENTS = ("runtime", "onnx_opset")  # what a manifest's ``requires`` may ask for
_SIGNATURE_BYTES = 64

DeviceProbe = Callable[[], Any]  # returns tensorrt_backend.DeviceInfo or None


# --------------------------------------------------------------------------------------------
# Manifest


def _require_dict(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise BundleError(f"manifest: {what} must be a JSON object, found {type(value).__name__}")
    return value


def _tensor_specs(items: Any, what: str) -> tuple[TensorSpec, ...]:
    if not isinstance(items, (list, tuple)):
        raise BundleError(f"manifest: {what} must be a list of tensors")
    specs = []
    for item in items:
        if isinstance(item, TensorSpec):
            specs.append(item)
            continue
        try:
            spec = TensorSpec.from_dict(item)
        except (KeyError, TypeError) as exc:
            raise BundleError(f"manifest: {what}: bad tensor entry {item!r} ({exc})") from None
        if not all(d is None or isinstance(d, (int, str)) for d in spec.shape):
            raise BundleError(f"manifest: {what}: tensor {spec.name!r} has a bad shape {spec.shape}")
        specs.append(spec)
    return tuple(specs)


def _check_relative_file(name: str, what: str) -> str:
    path = PurePosixPath(name)
    if (
        not name
        or "\\" in name
        or path.is_absolute()
        or ".." in path.parts
        or str(path) in (MANIFEST_FILE, SIGNATURE_FILE, ".")
    ):
        raise BundleError(f"manifest: {what}: file {name!r} must be a plain relative path in the bundle")
    return str(path)


@dataclass(frozen=True)
class ModelEntry:
    """One model of a bundle: its file and hash, tensors, precision and the target it runs on.

    ``target`` is ``"onnxruntime"`` or ``"tensorrt-<version>-sm_<NN>"`` (e.g. ``tensorrt-10.8-sm_87``).
    """

    name: str
    file: str
    sha256: str
    precision: str
    target: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    normalisation: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        what = f"model {self.name!r}"
        object.__setattr__(self, "file", _check_relative_file(str(self.file), what))
        object.__setattr__(self, "inputs", _tensor_specs(self.inputs, f"{what} inputs"))
        object.__setattr__(self, "outputs", _tensor_specs(self.outputs, f"{what} outputs"))
        if self.precision not in PRECISIONS:
            raise BundleError(
                f"manifest: {what}: precision {self.precision!r} is not one of {', '.join(PRECISIONS)}"
            )
        if not isinstance(self.target, str) or not self.target:
            raise BundleError(f"manifest: {what}: target must be a non-empty string")
        _require_dict(self.normalisation, f"{what} normalisation")

    @property
    def is_tensorrt(self) -> bool:
        return self.target.strip().lower().startswith("tensorrt")

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "sha256": self.sha256,
            "precision": self.precision,
            "target": self.target,
            "inputs": [spec.to_dict() for spec in self.inputs],
            "outputs": [spec.to_dict() for spec in self.outputs],
            "normalisation": dict(self.normalisation),
        }

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> "ModelEntry":
        data = _require_dict(data, f"model {name!r}")
        if "name" in data and data["name"] != name:
            raise BundleError(f"manifest: model {name!r} says its name is {data['name']!r}")
        missing = [k for k in ("file", "sha256", "precision", "target", "inputs", "outputs") if k not in data]
        if missing:
            raise BundleError(f"manifest: model {name!r} lacks {', '.join(missing)}")
        unknown = set(data) - {"name", "file", "sha256", "precision", "target", "inputs", "outputs", "normalisation"}
        if unknown:
            raise BundleError(f"manifest: model {name!r} has unknown fields {sorted(unknown)}")
        sha = str(data["sha256"]).lower()
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise BundleError(f"manifest: model {name!r}: sha256 must be 64 hex digits")
        return cls(
            name=name,
            file=str(data["file"]),
            sha256=sha,
            precision=str(data["precision"]),
            target=str(data["target"]),
            inputs=data["inputs"],
            outputs=data["outputs"],
            normalisation=data.get("normalisation", {}),
        )


_MANIFEST_DICTS = ("payload", "budgets_ms", "training", "export", "calibration", "evaluation", "extra", "requires")
# Written only when not empty, so a manifest without requirements keeps the bytes it was signed as.
_OMITTED_WHEN_EMPTY = ("requires",)


@dataclass(frozen=True)
class Manifest:
    """The signed description of a bundle (DESIGN.md, Bundle). Unknown facts go under ``extra``."""

    version: int
    name: str
    created: str  # ISO 8601, UTC
    models: dict[str, ModelEntry]
    payload: dict = field(default_factory=dict)
    budgets_ms: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)  # the exact training command and its summary
    export: dict = field(default_factory=dict)  # the exact export command and parity results
    evaluation: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    key_id: str = ""  # id of the signing key (filled by write_bundle)
    requires: dict = field(default_factory=dict)  # {"runtime": ">=0.1.0", "onnx_opset": 17}

    def __post_init__(self) -> None:
        _require_dict(self.models, "models")
        for key, entry in self.models.items():
            if not isinstance(entry, ModelEntry) or entry.name != key:
                raise BundleError(f"manifest: models[{key!r}] must be a ModelEntry named {key!r}")
        for name in _MANIFEST_DICTS:
            _require_dict(getattr(self, name), name)
        _check_requires(self.requires)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "version": self.version,
            "name": self.name,
            "created": self.created,
            "key_id": self.key_id,
            "models": {name: entry.to_dict() for name, entry in self.models.items()},
        }
        for name in _MANIFEST_DICTS:
            if getattr(self, name) or name not in _OMITTED_WHEN_EMPTY:
                data[name] = getattr(self, name)
        return data

    def to_json_bytes(self) -> bytes:
        """Canonical bytes (sorted keys, UTF-8): what ``manifest.sig`` signs."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False)
        return text.encode("utf-8") + b"\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Manifest":
        data = _require_dict(data, "the manifest")
        version = data.get("version")
        if version != MANIFEST_VERSION:
            raise BundleError(
                f"manifest version {version!r} is not supported (this medsec-edge reads version "
                f"{MANIFEST_VERSION}): use a medsec-edge that matches the bundle, or re-export it"
            )
        missing = [k for k in ("name", "created", "models") if k not in data]
        if missing:
            raise BundleError(f"manifest lacks {', '.join(missing)}")
        known = {"version", "name", "created", "models", "key_id", *_MANIFEST_DICTS}
        unknown = set(data) - known
        if unknown:
            raise BundleError(f"manifest has unknown fields {sorted(unknown)}: put them under 'extra'")
        models = {
            str(name): ModelEntry.from_dict(str(name), entry)
            for name, entry in _require_dict(data["models"], "models").items()
        }
        return cls(
            version=version,
            name=str(data["name"]),
            created=str(data["created"]),
            models=models,
            key_id=str(data.get("key_id", "")),
            **{name: data.get(name, {}) for name in _MANIFEST_DICTS},
        )

    @classmethod
    def from_json_bytes(cls, raw: bytes) -> "Manifest":
        return cls.from_dict(_parse_json(raw))


def _parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{MANIFEST_FILE} is not valid UTF-8 JSON ({exc})") from None


# --------------------------------------------------------------------------------------------
# Requirements: what a bundle asks of the installation that opens it

# The highest default-domain ONNX opset each onnxruntime release implements (onnxruntime's
# "ONNX Runtime compatibility" page). Releases newer than the last row are assumed to run what
# that row runs: a bundle that needs more is refused until this table knows better, never
# loaded on a guess. The runtime reads installed versions from package metadata: it may not
# import onnx, and imports onnxruntime only inside backends/.
ONNXRUNTIME_MAX_OPSET = {
    (1, 17): 20,
    (1, 18): 21,
    (1, 19): 21,
    (1, 20): 21,
    (1, 21): 22,
    (1, 22): 23,
    (1, 23): 23,
}
_ONNXRUNTIME_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml")
_SPEC_OPERATORS = (">=", "<=", "==", "!=", ">", "<")  # two-character ones first
_RELEASE = re.compile(r"\d+(?:\.\d+)*")


def _release(version: str) -> tuple[int, ...]:
    """The dotted integers that start ``version`` (``0.2.0rc1`` -> (0, 2, 0)); pre-release and
    local parts are ignored, which is as far as this simple comparison goes."""
    match = _RELEASE.match(version.strip().lstrip("vV"))
    if match is None:
        raise ValueError(f"version {version!r} does not start with dotted integers")
    return tuple(int(part) for part in match.group(0).split("."))


def _parse_spec(spec: str) -> list[tuple[str, tuple[int, ...]]]:
    """``">=0.1.0, <0.3"`` -> [(">=", (0, 1, 0)), ("<", (0, 3))]; ValueError if malformed."""
    clauses = []
    for clause in spec.split(","):
        clause = clause.strip()
        operator = next((op for op in _SPEC_OPERATORS if clause.startswith(op)), None)
        if operator is None:
            raise ValueError(f"clause {clause!r} does not start with one of {' '.join(_SPEC_OPERATORS)}")
        number = clause[len(operator):].strip()
        if not _RELEASE.fullmatch(number):
            raise ValueError(f"clause {clause!r}: {number!r} is not dotted integers")
        clauses.append((operator, tuple(int(part) for part in number.split("."))))
    return clauses


def version_satisfies(version: str, spec: str) -> bool:
    """Whether ``version`` meets every comma-separated clause of ``spec`` (``>=``, ``<=``, ``>``,
    ``<``, ``==``, ``!=`` on dotted integers; missing trailing parts count as 0)."""
    have = _release(version)
    for operator, want in _parse_spec(spec):
        width = max(len(have), len(want))
        a, b = have + (0,) * (width - len(have)), want + (0,) * (width - len(want))
        ok = {">=": a >= b, "<=": a <= b, ">": a > b, "<": a < b, "==": a == b, "!=": a != b}[operator]
        if not ok:
            return False
    return True


def _check_requires(requires: Mapping[str, Any]) -> None:
    unknown = sorted(set(requires) - set(REQUIREMENTS))
    if unknown:
        raise BundleError(
            f"manifest: requires asks for {unknown}, which this medsec-edge ({runtime_version()}) does "
            f"not know (it knows {', '.join(REQUIREMENTS)}): use a newer medsec-edge"
        )
    if "runtime" in requires:
        spec = requires["runtime"]
        try:
            if not isinstance(spec, str):
                raise ValueError(f"found a {type(spec).__name__}")
            _parse_spec(spec)
        except ValueError as exc:
            raise BundleError(
                f"manifest: requires.runtime must be a version spec such as '>=0.1.0, <0.3' ({exc})"
            ) from None
    if "onnx_opset" in requires:
        opset = requires["onnx_opset"]
        if isinstance(opset, bool) or not isinstance(opset, int) or opset < 1:
            raise BundleError(f"manifest: requires.onnx_opset must be a positive integer, found {opset!r}")


def runtime_version() -> str:
    """The installed medsec-edge version (package metadata, else the source tree's)."""
    try:
        return importlib.metadata.version("medsec-edge")
    except importlib.metadata.PackageNotFoundError:
        from medsec_edge.runtime import __version__

        return __version__


def _onnxruntime_version() -> str | None:
    for distribution in _ONNXRUNTIME_DISTRIBUTIONS:
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def onnxruntime_max_opset(version: str | None = None) -> int | None:
    """The highest ONNX opset onnxruntime ``version`` (default: the installed one) runs, or None
    if it is older than every release the table knows (or none is installed)."""
    version = version if version is not None else _onnxruntime_version()
    if version is None:
        return None
    release = _release(version)[:2]
    known = [row for row in sorted(ONNXRUNTIME_MAX_OPSET) if row <= release]
    return ONNXRUNTIME_MAX_OPSET[known[-1]] if known else None


def default_requires(onnx_opset: int | None = None) -> dict[str, Any]:
    """``requires`` for a bundle written now: this medsec-edge's minor release or newer, and
    ``onnx_opset`` if its ONNX models need one (the opset they were exported with)."""
    major, minor = (_release(runtime_version()) + (0, 0))[:2]
    requires: dict[str, Any] = {"runtime": f">={major}.{minor}.0"}
    if onnx_opset is not None:
        requires["onnx_opset"] = int(onnx_opset)
    _check_requires(requires)
    return requires


def _runtime_problem(manifest: "Manifest") -> str | None:
    """Why this medsec-edge cannot open the bundle (``requires.runtime``), or None."""
    spec = manifest.requires.get("runtime")
    if spec is None:
        return None
    have = runtime_version()
    try:
        if version_satisfies(have, spec):
            return None
    except ValueError as exc:
        return f"cannot compare medsec-edge {have} with requires.runtime {spec!r} ({exc})"
    return (
        f"it requires medsec-edge {spec}, this is medsec-edge {have}: install a medsec-edge that "
        f"satisfies '{spec}' (pip install -U medsec-edge), or use a bundle made for {have}"
    )


def _opset_problem(opset: int) -> str | None:
    """Why the installed onnxruntime cannot run ONNX opset ``opset``, or None."""
    version = _onnxruntime_version()
    if version is None:
        return f"needs ONNX opset {opset}, and the installed onnxruntime's version is unknown: pip install -U onnxruntime"
    highest = onnxruntime_max_opset(version)
    oldest = ".".join(map(str, min(ONNXRUNTIME_MAX_OPSET)))
    if highest is None:
        return (
            f"needs ONNX opset {opset}, and onnxruntime {version} is older than {oldest}, the oldest "
            "medsec-edge knows: pip install -U onnxruntime"
        )
    if opset > highest:
        return (
            f"needs ONNX opset {opset}, onnxruntime {version} runs opsets up to {highest}: "
            f"pip install -U onnxruntime, or re-export the model at opset {highest} or lower"
        )
    return None


# --------------------------------------------------------------------------------------------
# Keys


def key_id(public_key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """Short, stable id of a key: the first 16 hex digits of sha256 over the raw public key."""
    if isinstance(public_key, Ed25519PrivateKey):
        public_key = public_key.public_key()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_signing_key(path_private: Path | str, path_public: Path | str) -> str:
    """Create an Ed25519 key pair as PEM files (private 0o600, never overwritten); return its id."""
    path_private, path_public = Path(path_private), Path(path_public)
    private = Ed25519PrivateKey.generate()
    pem_private = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pem_public = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    path_private.parent.mkdir(parents=True, exist_ok=True)
    path_public.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path_private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyFileError(f"key file {path_private} already exists: refusing to overwrite it") from None
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(handle.fileno(), 0o600)
        handle.write(pem_private)
    path_public.write_bytes(pem_public)
    return key_id(private)


def load_signing_key(path: Path | str) -> Ed25519PrivateKey:
    """Read an Ed25519 private key (PEM, unencrypted) that only its owner can read."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} does not exist: create one with 'medsec-edge keys new'") from None
    except OSError as exc:
        raise KeyFileError(f"key file {path} cannot be read ({exc.strerror})") from None
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"key file {path} is accessible by group or others (mode {stat.S_IMODE(mode):o}): chmod 600 {path}"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise KeyFileError(f"key file {path} is not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"key file {path} holds a {type(key).__name__}, expected an Ed25519 key")
    return key


def load_public_key(source: Ed25519PublicKey | bytes | Path | str) -> Ed25519PublicKey:
    """An Ed25519 public key from a file path or bytes: PEM, OpenSSH, raw 32 bytes, hex or base64."""
    if isinstance(source, Ed25519PublicKey):
        return source
    where = "public key bytes"
    if isinstance(source, (str, Path)):
        where = f"public key file {source}"
        try:
            source = Path(source).read_bytes()
        except OSError as exc:
            raise KeyFileError(f"{where} cannot be read ({exc.strerror})") from None
    data = bytes(source)
    key: Any = None
    try:
        if len(data) == 32:
            key = Ed25519PublicKey.from_public_bytes(data)
        elif b"-----BEGIN" in data:
            key = serialization.load_pem_public_key(data)
        elif data.lstrip().startswith(b"ssh-ed25519"):
            key = serialization.load_ssh_public_key(data.strip())
        else:
            text = data.strip()
            try:
                raw = bytes.fromhex(text.decode("ascii"))
            except (ValueError, UnicodeDecodeError):
                raw = base64.b64decode(text, validate=True)
            key = Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise KeyFileError(f"{where} is not an Ed25519 public key (PEM, OpenSSH, raw, hex or base64)") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{where} holds a {type(key).__name__}, expected an Ed25519 key")
    return key


def default_trust_dir() -> Path:
    """``bundles/trusted_keys`` of the source tree, which vouches for the repo's default bundle."""
    return Path(__file__).resolve().parent.parent / "bundles" / "trusted_keys"


def trusted_public_keys(source: Path | str | None = None) -> dict[str, Ed25519PublicKey]:
    """Trusted signing keys by id, from ``source`` (a directory of ``*.pub`` files, or one file).

    Without ``source``: the paths in ``MEDSEC_EDGE_TRUSTED_KEYS`` (separated by ``os.pathsep``),
    else the repo's ``bundles/trusted_keys``. A missing default directory yields no keys.
    """
    if source is not None:
        locations = [Path(source)]
        explicit = True
    elif os.environ.get(TRUSTED_KEYS_ENV, "").strip():
        locations = [Path(p) for p in os.environ[TRUSTED_KEYS_ENV].split(os.pathsep) if p.strip()]
        explicit = True
    else:
        locations = [default_trust_dir()]
        explicit = False
    keys: dict[str, Ed25519PublicKey] = {}
    for location in locations:
        if location.is_dir():
            files = sorted(location.glob("*.pub"))
        elif location.is_file():
            files = [location]
        elif explicit:
            raise KeyFileError(f"trusted key location {location} does not exist")
        else:
            files = []
        for path in files:
            key = load_public_key(path)
            keys[key_id(key)] = key
    return keys


# --------------------------------------------------------------------------------------------
# Reading bundles


def _short(digest: str) -> str:
    return digest[:_HASH_SHOWN] + "…"


def _safe_member_name(member: tarfile.TarInfo) -> str | None:
    """The member's normalised name, or None if it could write outside the bundle."""
    name = member.name
    if not name or "\\" in name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return None
    parts = PurePosixPath(name).parts
    if ".." in parts:
        return None
    return str(PurePosixPath(*parts)) if parts else "."


_TAR_BLOCK = 512
# A header's checksum field as tar writers store it (six octal digits, NUL, space; or seven and
# NUL). tarfile reads the digits only, so a damaged terminator would otherwise go unnoticed.
_TAR_CHECKSUM = re.compile(rb"[0-7]{6}\x00 |[0-7]{7}\x00")
_COMPRESSED = ((b"\x1f\x8b", gzip.decompress), (b"BZh", bz2.decompress), (b"\xfd7zXZ\x00", lzma.decompress))


class _TarSource:
    """Every regular file of a checked tar, read into memory.

    Besides what ``tarfile`` checks (each header's checksum), the archive must account for every
    byte: members follow one another, the padding after each member's (and each extended
    header's) data and everything after the last member are zero. So a changed byte of a
    ``.tar`` bundle is refused even where it would change no file (``tarfile`` silently ends the
    archive at a damaged header after the first, and never reads padding). The one exception is
    a value inside a pax record (a timestamp that GNU tar's pax format writes, say): still a
    valid archive with the same files, so nothing signed changed.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise BundleError(f"bundle {path} cannot be read ({exc.strerror})") from None
        try:
            self.files = self._read(_decompressed(raw))
        except BundleError:
            raise
        except Exception as exc:  # a damaged archive raises many kinds (tarfile, zlib, lzma, EOF, ...)
            raise BundleError(
                f"bundle {path} is not a readable tar archive ({type(exc).__name__}: {exc}): "
                "copy the bundle again from its source"
            ) from None

    def _read(self, data: bytes) -> dict[str, bytes]:
        path = self.path
        files: dict[str, bytes] = {}
        position = 0
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
            for member in archive.getmembers():
                name = _safe_member_name(member)
                if name is None:
                    raise BundleError(
                        f"bundle {path} refused: tar member {member.name!r} points outside the bundle"
                    )
                if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE):
                    raise BundleError(
                        f"bundle {path} refused: tar member {member.name!r} is a link or special "
                        "file; bundles hold regular files only"
                    )
                position = _check_tar_layout(path, data, member, position)
                if member.isdir():
                    continue
                if name in files:
                    raise BundleError(f"bundle {path} refused: tar member {name!r} appears twice")
                files[name] = data[member.offset_data : member.offset_data + member.size]
        if data[position:].strip(b"\x00"):
            raise BundleError(
                f"bundle {path} refused: the tar has non-zero bytes after its last member (at byte "
                f"{position}), expected only zero blocks: the archive is damaged or was altered"
            )
        prefix = ""
        if MANIFEST_FILE not in files:
            tops = {name.split("/", 1)[0] for name in files}
            if len(tops) == 1 and f"{next(iter(tops))}/{MANIFEST_FILE}" in files:
                prefix = next(iter(tops)) + "/"
            else:
                raise BundleError(f"bundle {path} has no {MANIFEST_FILE} at its top level")
        return {name[len(prefix):]: blob for name, blob in files.items() if name.startswith(prefix)}

    def read(self, name: str) -> bytes | None:
        return self.files.get(name)


def _decompressed(raw: bytes) -> bytes:
    for magic, decompress in _COMPRESSED:
        if raw.startswith(magic):
            return decompress(raw)
    return raw


def _check_tar_layout(path: Path, data: bytes, member: tarfile.TarInfo, position: int) -> int:
    """Refuse a member that does not start where the previous one ended, has a malformed checksum
    field or non-zero padding after its data; return where the next member must start."""
    if member.offset != position:
        raise BundleError(
            f"bundle {path} refused: tar member {member.name!r} starts at byte {member.offset}, the "
            f"previous member ends at byte {position}: the archive is damaged or was altered"
        )
    # Extended headers (pax, GNU long names) come first, each a header block and its data; then
    # the member's own header, then its data.
    header = member.offset
    while True:
        if not _TAR_CHECKSUM.fullmatch(data[header + 148 : header + 156]):
            raise BundleError(
                f"bundle {path} refused: tar header at byte {header} has a malformed checksum field"
            )
        if header + _TAR_BLOCK >= member.offset_data:
            break
        size = tarfile.nti(data[header + 124 : header + 136])
        header = _check_tar_padding(path, data, member, header + _TAR_BLOCK + size)
    if header + _TAR_BLOCK != member.offset_data:
        raise BundleError(
            f"bundle {path} refused: the extended headers of tar member {member.name!r} do not end "
            "where its header starts: the archive is damaged or was altered"
        )
    return _check_tar_padding(path, data, member, member.offset_data + (0 if member.isdir() else member.size))


def _check_tar_padding(path: Path, data: bytes, member: tarfile.TarInfo, end: int) -> int:
    """Refuse non-zero bytes from ``end`` to the next block boundary; return that boundary."""
    padded = end + (-end % _TAR_BLOCK)
    if data[end:padded].strip(b"\x00"):
        raise BundleError(
            f"bundle {path} refused: tar member {member.name!r} is followed by non-zero padding: "
            "the archive is damaged or was altered"
        )
    return padded


class _DirectorySource:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.root = path.resolve()

    def _resolve(self, name: str) -> Path | None:
        try:
            candidate = (self.root / name).resolve()
        except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
            raise BundleError(f"bundle {self.path}: {name!r} cannot be resolved ({exc})") from None
        if not candidate.is_relative_to(self.root):
            raise BundleError(f"bundle {self.path}: {name!r} resolves outside the bundle directory")
        return candidate if candidate.is_file() else None

    def read(self, name: str) -> bytes | None:
        path = self._resolve(name)
        if path is None:
            return None
        try:
            return path.read_bytes()
        except OSError as exc:
            raise BundleError(f"bundle {self.path}: {name!r} cannot be read ({exc.strerror})") from None


def _compatibility(entry: ModelEntry, device_probe: Callable[[], Any], onnx_opset: int | None = None) -> str | None:
    """None if ``entry`` can run here, else why not (``onnx_opset``: the manifest's requires)."""
    target = entry.target.strip()
    if target.lower() == ONNXRUNTIME_TARGET:
        if importlib.util.find_spec("onnxruntime") is None:
            return "target 'onnxruntime' needs onnxruntime, which is not installed: pip install onnxruntime"
        return _opset_problem(onnx_opset) if onnx_opset is not None else None
    if entry.is_tensorrt:
        from medsec_edge.runtime.backends import tensorrt_backend as trt_backend

        try:
            wanted = trt_backend.EngineTarget.parse(target)
        except BundleError as exc:
            return str(exc)
        device = device_probe()
        if device is None:
            reason = trt_backend.TensorRTBackend.probe() or "no TensorRT device"
            return (
                f"target {target!r} needs TensorRT on an NVIDIA GPU ({reason}): "
                f"pip install 'medsec-edge[{trt_backend.EXTRA}]'"
            )
        return trt_backend.target_problem(wanted, device)
    return f"unknown target {target!r}: expected 'onnxruntime' or 'tensorrt-<version>-sm_<NN>'"


def _default_device_probe() -> Any:
    from medsec_edge.runtime.backends.tensorrt_backend import probe_device

    return probe_device()


def _verify_signature(
    manifest_bytes: bytes,
    signature: bytes,
    claimed_key_id: str,
    public_key: Ed25519PublicKey | bytes | Path | str | None,
    trusted_keys: Mapping[str, Ed25519PublicKey] | Path | str | None,
    where: str,
) -> str:
    """Verify ``signature``; return the signer's key id or raise ``BundleError``."""
    if public_key is not None:
        key = load_public_key(public_key)
        given = key_id(key)
        if claimed_key_id and claimed_key_id != given:
            raise BundleError(
                f"bundle {where} is signed by key {claimed_key_id}, but the given public key is {given}: "
                "verify it with its signer's public key, or get a bundle signed by this one"
            )
        candidates = {given: key}
    else:
        store = (
            dict(trusted_keys)
            if isinstance(trusted_keys, Mapping)
            else trusted_public_keys(trusted_keys)
        )
        if not store:
            raise BundleError(
                f"bundle {where}: no trusted public keys: pass public_key, set {TRUSTED_KEYS_ENV}, "
                f"or add the signer's .pub file to {default_trust_dir()}"
            )
        if claimed_key_id:
            if claimed_key_id not in store:
                raise BundleError(
                    f"bundle {where} is signed by unknown key id {claimed_key_id}, which is not trusted; "
                    f"trusted key ids are {', '.join(sorted(store))}: if you trust its signer, add "
                    f"its .pub file to the trusted keys (--trusted-keys DIR or {TRUSTED_KEYS_ENV})"
                )
            candidates = {claimed_key_id: store[claimed_key_id]}
        else:
            candidates = store
    for kid, key in candidates.items():
        try:
            key.verify(signature, manifest_bytes)
        except InvalidSignature:
            continue
        return kid
    raise BundleError(
        f"bundle {where}: signature check failed for {MANIFEST_FILE} (key "
        f"{', '.join(sorted(candidates))}): the manifest was modified after signing, or signed by "
        "another key; copy the bundle again from its source"
    )


def _read_verified(source: _TarSource | _DirectorySource, entry: ModelEntry, where: str) -> bytes:
    """A model file's bytes, refused unless they hash to what the signed manifest says."""
    data = source.read(entry.file)
    if data is None:
        raise BundleError(f"bundle {where}: model {entry.name!r} file {entry.file!r} is missing")
    found = hashlib.sha256(data).hexdigest()
    if found != entry.sha256:
        raise BundleError(
            f"bundle {where}: model {entry.name!r} file {entry.file!r} has sha256 {_short(found)}, "
            f"the signed manifest expects {_short(entry.sha256)}: the file was modified or corrupted"
        )
    return data


class Bundle:
    """A verified bundle. Model bytes are re-hashed each time they are handed out."""

    def __init__(
        self,
        path: Path,
        manifest: Manifest,
        signer_key_id: str,
        source: _TarSource | _DirectorySource,
        compatibility: dict[str, str | None],
        manifest_bytes: bytes = b"",
        signature: bytes = b"",
    ) -> None:
        self.path = path
        self.manifest = manifest
        self.key_id = signer_key_id
        self.compatibility = compatibility  # model name -> None (can run here) or why not
        self.manifest_bytes = manifest_bytes  # exactly what the signature covers
        self.signature = signature
        self._source = source

    @property
    def manifest_sha256(self) -> str:
        return hashlib.sha256(self.manifest_bytes).hexdigest()

    @property
    def version_id(self) -> str:
        return version_id(self.manifest.name, self.manifest_bytes)

    def files(self) -> Iterator[tuple[str, bytes]]:
        """Every file of the bundle as (relative path, bytes): the manifest, its signature, then
        each model's file, re-hashed against the signed manifest as it is read."""
        yield MANIFEST_FILE, self.manifest_bytes
        yield SIGNATURE_FILE, self.signature
        for entry in self.manifest.models.values():
            yield entry.file, _read_verified(self._source, entry, str(self.path))

    @classmethod
    def open(cls, path: Path | str, **kwargs: Any) -> "Bundle":
        """Same as ``open_bundle``."""
        return open_bundle(path, **kwargs)

    @property
    def name(self) -> str:
        return self.manifest.name

    def model(self, name: str) -> ModelEntry:
        try:
            return self.manifest.models[name]
        except KeyError:
            raise UsageError(
                f"bundle {self.manifest.name!r} has no model {name!r}: it has "
                f"{', '.join(sorted(self.manifest.models)) or 'none'}"
            ) from None

    def model_bytes(self, name: str) -> bytes:
        """The model file's bytes, checked against the signed sha256 again."""
        return _read_verified(self._source, self.model(name), str(self.path))

    def session(
        self,
        name: str,
        backend: str | None = None,
        threads: int | None = None,
        *,
        providers: Iterable[Any] | None = None,
        **options: Any,
    ) -> Session:
        """Load model ``name`` into a backend session (backend: from the model's target by default)."""
        from medsec_edge.runtime.backends import get_backend

        entry = self.model(name)
        reason = self.compatibility.get(name)
        if reason is not None:
            raise BundleError(f"bundle {self.manifest.name!r}: model {name!r} cannot run here: {reason}")
        wanted = "tensorrt" if entry.is_tensorrt else "onnxruntime"
        backend = backend or wanted
        if backend != wanted:
            raise BundleError(
                f"model {name!r} has target {entry.target!r}, which backend {backend!r} cannot run"
            )
        if entry.is_tensorrt:
            options.setdefault("target", entry.target)
        engine = get_backend(backend)
        session = engine.load(
            self.model_bytes(name),
            providers=list(providers) if providers is not None else None,
            threads=threads,
            **options,
        )
        try:
            self._check_declared(entry, session)
        except BundleError:
            session.close()
            raise
        return session

    @staticmethod
    def _check_declared(entry: ModelEntry, session: Session) -> None:
        for kind, declared, actual in (
            ("inputs", entry.inputs, session.inputs),
            ("outputs", entry.outputs, session.outputs),
        ):
            want = {spec.name: (spec.dtype, spec.rank) for spec in declared}
            have = {spec.name: (spec.dtype, spec.rank) for spec in actual}
            if want != have:
                raise BundleError(
                    f"model {entry.name!r}: the manifest declares {kind} "
                    f"{_describe(declared)}, the model has {_describe(actual)}"
                )

    def __repr__(self) -> str:
        return f"<Bundle {self.manifest.name!r} at {self.path} signed by {self.key_id}>"


def split_variant(name: str) -> tuple[str, str | None]:
    """``wm_decoder@int8-qdq`` -> (``wm_decoder``, ``int8-qdq``); a plain name -> (name, None).

    A plain model name is what the runtime loads; ``<model>@<precision>`` entries are the other
    precisions of that model kept in the bundle (``medsec-edge calibrate``, ``build``)."""
    base, sep, variant = name.partition("@")
    return base, (variant if sep else None)


def version_id(name: str, manifest_bytes: bytes) -> str:
    """``<name>-<first 12 hex of sha256(manifest bytes)>``: names one signed release, and is a
    safe directory name (``bundle install`` keeps each release under it)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name).strip("._")[:64] or "bundle"
    return f"{safe}-{hashlib.sha256(manifest_bytes).hexdigest()[:_HASH_SHOWN]}"


def _describe(specs: Iterable[TensorSpec]) -> str:
    return "[" + ", ".join(f"{s.name}: {s.dtype} rank {s.rank}" for s in specs) + "]"


def open_bundle(
    path: Path | str,
    *,
    public_key: Ed25519PublicKey | bytes | Path | None = None,
    trusted_keys: Mapping[str, Ed25519PublicKey] | Path | str | None = None,
    device_probe: DeviceProbe | None = None,
    require: Iterable[str] | None = None,
    check_compatibility: bool = True,
) -> Bundle:
    """Open and verify a bundle directory or ``.tar``; refuse with ``BundleError`` if anything fails.

    The signature is checked with ``public_key`` if given, else with the trust store
    (``trusted_keys``: a key mapping or a location, default ``trusted_public_keys()``). Then the
    manifest version, then every model file's sha256, then compatibility: the bundle is refused
    if this medsec-edge does not meet ``requires.runtime``; each model's reason (its target here,
    and ``requires.onnx_opset`` for onnxruntime models) is kept in ``Bundle.compatibility``, and
    the bundle is refused if a model named in ``require`` (or, without ``require``, every model)
    cannot run here. ``device_probe`` returns the TensorRT ``DeviceInfo`` of this machine (or
    None); by default it is the TensorRT backend's probe.
    """
    path = Path(path)
    where = str(path)
    source = _source(path)
    manifest_bytes = source.read(MANIFEST_FILE)
    if manifest_bytes is None:
        raise BundleError(f"bundle {where} has no {MANIFEST_FILE}")
    signature = source.read(SIGNATURE_FILE)
    if signature is None:
        raise BundleError(
            f"bundle {where} has no {SIGNATURE_FILE}: unsigned bundles are refused; sign it "
            "('medsec-edge export ... --signing-key KEY' writes signed bundles)"
        )
    if len(signature) != _SIGNATURE_BYTES:
        raise BundleError(
            f"bundle {where}: {SIGNATURE_FILE} has {len(signature)} bytes, an Ed25519 signature has 64: "
            "copy the bundle again from its source"
        )

    # The key id is read before verification only to pick the key; nothing else is trusted yet.
    raw = _parse_json(manifest_bytes)
    claimed = str(raw.get("key_id", "")) if isinstance(raw, dict) else ""
    signer = _verify_signature(manifest_bytes, signature, claimed, public_key, trusted_keys, where)
    manifest = _manifest_from(raw, where)

    for entry in manifest.models.values():
        _read_verified(source, entry, where)

    compatibility: dict[str, str | None] = {}
    if check_compatibility:
        problem = _runtime_problem(manifest)
        if problem is not None:
            raise BundleError(f"bundle {manifest.name!r} cannot run here: {problem}")
        compatibility = model_compatibility(manifest, device_probe)
        required = list(require) if require is not None else list(manifest.models)
        for name in required:
            if name not in manifest.models:
                raise BundleError(f"bundle {where} has no model {name!r}")
        blocked = {name: compatibility[name] for name in required if compatibility[name] is not None}
        if blocked and (require is not None or len(blocked) == len(manifest.models)):
            details = "; ".join(f"{name}: {reason}" for name, reason in blocked.items())
            raise BundleError(f"bundle {manifest.name!r} cannot run here: {details}")
    log.info("opened bundle %r (%d models) signed by %s", manifest.name, len(manifest.models), signer)
    return Bundle(path, manifest, signer, source, compatibility, manifest_bytes, signature)


def model_compatibility(manifest: Manifest, device_probe: DeviceProbe | None = None) -> dict[str, str | None]:
    """Each model's reason it cannot run here, None where it can: ``requires.runtime`` (for
    every model), its target on this machine, and ``requires.onnx_opset`` for onnxruntime
    models. The device is probed at most once."""
    problem = _runtime_problem(manifest)
    if problem is not None:
        return {name: problem for name in manifest.models}
    cached: list[Any] = []

    def probe_once() -> Any:
        if not cached:
            cached.append((device_probe or _default_device_probe)())
        return cached[0]

    opset = manifest.requires.get("onnx_opset")
    return {name: _compatibility(entry, probe_once, opset) for name, entry in manifest.models.items()}


def _source(path: Path) -> _TarSource | _DirectorySource:
    if path.is_dir():
        return _DirectorySource(path)
    if path.is_file():
        return _TarSource(path)
    raise BundleError(f"bundle {path} does not exist")


def _manifest_from(raw: Any, where: str) -> Manifest:
    try:
        return Manifest.from_dict(raw)
    except BundleError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError) as exc:  # a malformed value deep inside
        raise BundleError(f"bundle {where}: {MANIFEST_FILE} is malformed ({type(exc).__name__}: {exc})") from None


def peek_manifest(path: Path | str) -> tuple[Manifest, bytes]:
    """The manifest of a bundle directory or ``.tar`` and its bytes, NOT verified: nothing here
    checks the signature or the files. For showing what a bundle claims (``bundle inspect``)
    next to the verdict of ``open_bundle``; never to decide anything."""
    path = Path(path)
    manifest_bytes = _source(path).read(MANIFEST_FILE)
    if manifest_bytes is None:
        raise BundleError(f"bundle {path} has no {MANIFEST_FILE}")
    return _manifest_from(_parse_json(manifest_bytes), str(path)), manifest_bytes


# --------------------------------------------------------------------------------------------
# Writing bundles


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _private_key(private_key: Ed25519PrivateKey | Path | str | bytes) -> Ed25519PrivateKey:
    if isinstance(private_key, Ed25519PrivateKey):
        return private_key
    if isinstance(private_key, (str, Path)):
        return load_signing_key(private_key)
    try:
        key = serialization.load_pem_private_key(bytes(private_key), password=None)
    except (ValueError, TypeError):
        raise KeyFileError("private key bytes are not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"private key is a {type(key).__name__}, expected an Ed25519 key")
    return key


def write_bundle(
    directory: Path | str,
    manifest: Manifest | Mapping[str, Any],
    files: Mapping[str, Path | str],
    private_key: Ed25519PrivateKey | Path | str | bytes,
    *,
    overwrite: bool = False,
) -> Path:
    """Copy each model's file (``files``: model name -> source path) into ``directory``, fill in
    its ``file`` and ``sha256``, and sign the manifest. The directory appears whole or not at all.

    ``manifest`` as a dict may omit ``version`` and ``created`` and each model's ``file`` (default:
    the source file's name) and ``sha256``.
    """
    directory = Path(directory)
    key = _private_key(private_key)
    sources = {name: Path(p) for name, p in files.items()}
    for name, src in sources.items():
        if not src.is_file():
            raise UsageError(f"model {name!r}: source file {src} does not exist")
    hashes = {name: _sha256_file(src) for name, src in sources.items()}

    if isinstance(manifest, Manifest):
        unknown = set(sources) - set(manifest.models)
        if unknown:
            raise UsageError(f"files given for models the manifest does not have: {sorted(unknown)}")
        models = {
            name: replace(entry, sha256=hashes[name]) if name in sources else entry
            for name, entry in manifest.models.items()
        }
        manifest = replace(manifest, models=models, key_id=key_id(key))
    else:
        data = json.loads(json.dumps(dict(manifest)))  # deep copy, and proves it is JSON
        data.setdefault("version", MANIFEST_VERSION)
        data.setdefault("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
        models_data = _require_dict(data.get("models", {}), "models")
        unknown = set(sources) - set(models_data)
        if unknown:
            raise UsageError(f"files given for models the manifest does not have: {sorted(unknown)}")
        missing = sorted(set(models_data) - set(sources))
        if missing:
            raise UsageError(f"no file given for models {missing}")
        for name, src in sources.items():
            models_data[name].setdefault("file", src.name)
            models_data[name]["sha256"] = hashes[name]
        data["key_id"] = key_id(key)
        manifest = Manifest.from_dict(data)

    missing = sorted(set(manifest.models) - set(sources))
    if missing:
        raise UsageError(f"no file given for models {missing}")
    targets = [entry.file for entry in manifest.models.values()]
    if len(set(targets)) != len(targets):
        raise UsageError(f"two models share one file name: {sorted(targets)}")

    if directory.exists() and not overwrite:
        raise UsageError(f"bundle directory {directory} already exists: pass overwrite=True to replace it")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        for name, entry in manifest.models.items():
            dest = staging / entry.file
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(sources[name], dest)
            if _sha256_file(dest) != entry.sha256:
                raise BundleError(f"model {name!r}: {sources[name]} changed while it was copied")
        manifest_bytes = manifest.to_json_bytes()
        (staging / MANIFEST_FILE).write_bytes(manifest_bytes)
        (staging / SIGNATURE_FILE).write_bytes(key.sign(manifest_bytes))
        staging.chmod(0o755)
        if directory.exists():
            shutil.rmtree(directory)
        staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("wrote bundle %r to %s, signed by %s", manifest.name, directory, manifest.key_id)
    return directory


def pack_tar(bundle_dir: Path | str, tar_path: Path | str | None = None) -> Path:
    """Pack a bundle directory into a reproducible ``.tar`` (members under ``<dir name>/``)."""
    bundle_dir = Path(bundle_dir)
    for required in (MANIFEST_FILE, SIGNATURE_FILE):
        if not (bundle_dir / required).is_file():
            raise BundleError(f"{bundle_dir} is not a bundle: it has no {required}")
    tar_path = Path(tar_path) if tar_path is not None else bundle_dir.with_name(bundle_dir.name + ".tar")
    files = sorted(p for p in bundle_dir.rglob("*") if p.is_file() and not p.is_symlink())
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for path in files:
            data = path.read_bytes()
            info = tarfile.TarInfo(f"{bundle_dir.name}/{path.relative_to(bundle_dir).as_posix()}")
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0
            archive.addfile(info, io.BytesIO(data))
    tmp = tar_path.with_name(tar_path.name + ".partial")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(tar_path)
    return tar_path
