"""The node's settings: flags, an optional TOML file, and the checks that refuse a bad one early.

Layer: runtime (node, standard library). ``medsec-edge serve`` takes the flags of DESIGN.md
(``--listen HOST:PORT --aet AE --forward AE@HOST:PORT --spool DIR``) and more; a TOML file
(``--config FILE``) may give any of them under the same names (dashes or underscores), and a
flag given on the command line wins over the file. Every refusal names the setting and the fix.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from medsec_edge.runtime.errors import ConfigError

__all__ = ["Destination", "NodeConfig", "Policy", "TlsConfig", "load_config", "parse_destination", "parse_listen"]

POLICIES = ("quarantine", "forward-flagged")
NON_IMAGE_POLICIES = ("refuse", "forward-unchanged")
_AE_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 _-.")


def _ae(value: str, what: str) -> str:
    ae = str(value).strip()
    if not ae or len(ae) > 16 or not set(ae) <= _AE_CHARS:
        raise ConfigError(f"{what} {value!r} is not an AE title (1-16 characters: letters, digits, space, _ - .)")
    return ae


def _port(text: str, what: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise ConfigError(f"{what}: port {text!r} is not a number from 0 to 65535")
    return port


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6); port 0 lets the system choose."""
    host, sep, port = str(text).rpartition(":")
    if not sep or not host:
        raise ConfigError(f"--listen {text!r}: expected HOST:PORT, for example 127.0.0.1:11112")
    return host.strip("[]"), _port(port, "--listen")


@dataclass(frozen=True)
class Destination:
    """A DICOM peer: ``AE@HOST:PORT``."""

    aet: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.aet}@{self.host}:{self.port}"


def parse_destination(text: str) -> Destination:
    aet, sep, address = str(text).partition("@")
    if not sep:
        raise ConfigError(f"--forward {text!r}: expected AE@HOST:PORT, for example ORTHANC@127.0.0.1:4242")
    host, port = parse_listen(address)
    if port == 0:
        raise ConfigError(f"--forward {text!r}: the PACS port cannot be 0")
    return Destination(_ae(aet, "--forward AE title"), host, port)


@dataclass(frozen=True)
class TlsConfig:
    """TLS for one side: our certificate and key; with ``ca`` the peer must present one it signed."""

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None

    @property
    def enabled(self) -> bool:
        return self.cert is not None or self.ca is not None


@dataclass(frozen=True)
class Policy:
    """What happens to an image the node cannot vouch for: ``quarantine`` (held, with a reason file)
    or ``forward-flagged`` (sent on with the reason in its sealed private record)."""

    tampered: str = "quarantine"
    verify_failed: str = "quarantine"
    budget_overrun: str = "forward-flagged"
    # An object without pixel data (a dose report, a presentation state) has nothing to watermark:
    # refused (0xC000) unless the site says it may pass unchanged.
    non_image: str = "refuse"

    def __post_init__(self) -> None:
        if self.non_image not in NON_IMAGE_POLICIES:
            raise ConfigError(f"policy for non-image: {self.non_image!r} is not one of " + ", ".join(NON_IMAGE_POLICIES))
        for f in fields(self):
            if f.name != "non_image" and getattr(self, f.name) not in POLICIES:
                raise ConfigError(f"policy for {f.name.replace('_', '-')}: {getattr(self, f.name)!r} is not one of "
                                  + ", ".join(POLICIES))


@dataclass(frozen=True)
class NodeConfig:
    """Everything ``serve`` needs; see ``medsec-edge serve --help`` for each setting."""

    spool: Path
    forward: Destination
    listen: tuple[str, int] | None = ("127.0.0.1", 11112)
    aet: str = "EDGE"
    allowed_aets: tuple[str, ...] = ()  # empty: any calling AE (logged as a warning)
    tls: TlsConfig = field(default_factory=TlsConfig)
    forward_tls: TlsConfig = field(default_factory=TlsConfig)
    watch: Path | None = None
    workers: int = 0  # 0: the machine's cores
    threads: int = 1  # ONNX Runtime threads per worker
    keys: Path | None = None
    bundle: Path | None = None
    registry: Path | None = None
    no_registry: bool = False
    policy: Policy = field(default_factory=Policy)
    status_listen: tuple[str, int] | None = ("127.0.0.1", 0)
    audit_log: Path | None = None  # default: SPOOL/audit.jsonl
    deadline_ms: float = 250.0  # receive to forward, per image
    forward_retries: int = 5  # refusals by the PACS before an image is quarantined
    backoff_s: float = 0.5
    backoff_max_s: float = 30.0

    def __post_init__(self) -> None:
        if self.listen is None and self.watch is None:
            raise ConfigError("nothing to receive from: give --listen HOST:PORT, --watch DIR or both")
        if self.workers < 0 or self.threads < 1:
            raise ConfigError("--workers must be >= 0 (0: one per core) and --threads >= 1")
        if self.deadline_ms <= 0 or self.backoff_s <= 0 or self.backoff_max_s < self.backoff_s:
            raise ConfigError("deadline-ms and backoff-s must be positive, backoff-max-s >= backoff-s")
        if self.forward_retries < 0:
            raise ConfigError("forward-retries must be >= 0")
        if self.tls.enabled and (self.tls.cert is None or self.tls.key is None):
            raise ConfigError("TLS needs both --tls-cert and --tls-key (and --tls-ca for mutual TLS)")
        if (self.forward_tls.cert is None) != (self.forward_tls.key is None):
            raise ConfigError("forward TLS: give both forward-tls-cert and forward-tls-key, or neither")

    @property
    def worker_count(self) -> int:
        return self.workers or (os.cpu_count() or 1)

    @property
    def audit_path(self) -> Path:
        return self.audit_log or self.spool / "audit.jsonl"


_PATHS = {"spool", "watch", "keys", "bundle", "registry", "audit_log"}
_TLS = {"tls_cert": ("tls", "cert"), "tls_key": ("tls", "key"), "tls_ca": ("tls", "ca"),
        "forward_tls_cert": ("forward_tls", "cert"), "forward_tls_key": ("forward_tls", "key"),
        "forward_tls_ca": ("forward_tls", "ca")}
_POLICY = {"on_tampered": "tampered", "on_verify_failed": "verify_failed", "on_budget_overrun": "budget_overrun",
           "on_non_image": "non_image"}
_SCALARS = {"aet": str, "workers": int, "threads": int, "no_registry": bool, "deadline_ms": float,
            "forward_retries": int, "backoff_s": float, "backoff_max_s": float}
KNOWN_SETTINGS = frozenset({"listen", "forward", "allowed_aets", "status_listen", *_PATHS, *_TLS, *_POLICY,
                            *_SCALARS})


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fp:
            data = tomllib.load(fp)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None
    settings = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if isinstance(value, dict):
            raise ConfigError(f"config file {path}: [{key}] tables are not used; write every setting at the top level")
        if name not in KNOWN_SETTINGS:
            raise ConfigError(f"config file {path}: unknown setting {key!r} (known: "
                              + ", ".join(sorted(s.replace("_", "-") for s in KNOWN_SETTINGS)) + ")")
        settings[name] = value
    return settings


def _path(value: Any, base: Path) -> Path:
    p = Path(str(value)).expanduser()
    return p if p.is_absolute() else base / p


def load_config(config_file: Path | None = None, **flags: Any) -> NodeConfig:
    """The file's settings with ``flags`` (None: not given) over them; paths in the file are
    relative to the file's folder."""
    settings: dict[str, Any] = {}
    base = Path.cwd()
    if config_file is not None:
        settings = _read_toml(config_file)
        base = config_file.resolve().parent
        settings = {k: (_path(v, base) if k in _PATHS or k in _TLS else v) for k, v in settings.items()}
    for key, value in flags.items():
        if key not in KNOWN_SETTINGS:
            raise ConfigError(f"unknown setting {key!r}")
        if value is not None and value != ():
            settings[key] = value
    if "spool" not in settings:
        raise ConfigError("no spool folder: give --spool DIR (it holds every image until the PACS has it)")
    if "forward" not in settings:
        raise ConfigError("no PACS to forward to: give --forward AE@HOST:PORT")
    kwargs: dict[str, Any] = {"spool": Path(settings["spool"]), "forward": parse_destination(settings["forward"])}
    listen = settings.get("listen")
    if listen is not None:
        kwargs["listen"] = None if str(listen) in ("", "off", "none") else parse_listen(listen)
    status = settings.get("status_listen")
    if status is not None:
        kwargs["status_listen"] = None if str(status) in ("", "off", "none") else parse_listen(status)
    if "allowed_aets" in settings:
        value = settings["allowed_aets"]
        items = value.split(",") if isinstance(value, str) else list(value)
        kwargs["allowed_aets"] = tuple(_ae(a, "allowed calling AE") for a in items if str(a).strip())
    for key in _PATHS - {"spool"}:
        if settings.get(key) is not None:
            kwargs[key] = Path(settings[key])
    for key, kind in _SCALARS.items():
        if key in settings:
            try:
                kwargs[key] = kind(settings[key]) if kind is not bool else _bool(settings[key], key)
            except (TypeError, ValueError):
                raise ConfigError(f"{key.replace('_', '-')}: {settings[key]!r} is not a {kind.__name__}") from None
    if "aet" in kwargs:
        kwargs["aet"] = _ae(kwargs["aet"], "--aet")
    tls = {"tls": TlsConfig(), "forward_tls": TlsConfig()}
    for key, (side, attr) in _TLS.items():
        if settings.get(key) is not None:
            tls[side] = replace(tls[side], **{attr: Path(settings[key])})
    kwargs.update(tls)
    kwargs["policy"] = Policy(**{attr: str(settings[key]) for key, attr in _POLICY.items() if key in settings})
    return NodeConfig(**kwargs)


def _bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(key)
