"""One root error type with a few families, so callers and the CLI can map them to exit codes.

Verdicts ("tampered", "no watermark") are results, never exceptions. Messages must not carry
patient data or key material: identify images by their short hash.
"""


class MedsecError(Exception):
    """Root of every error medsec-edge raises on purpose."""

    exit_code = 3


class InputError(MedsecError):
    """An input file cannot be read or is of a kind we refuse (exit code 4)."""

    exit_code = 4


class UsageError(MedsecError):
    """A command line or API call that cannot be honoured as given (exit code 2)."""

    exit_code = 2


class ConfigError(UsageError):
    """A configuration value or file is wrong."""


class PayloadError(UsageError):
    """A payload that cannot be encoded (wrong length, bad hex)."""


class KeyFileError(MedsecError):
    """A key file is missing, malformed or readable by others (exit code 2)."""

    exit_code = 2


class BundleError(MedsecError):
    """A model bundle fails its signature, hash or compatibility checks (exit code 3)."""

    exit_code = 3


class BackendUnavailableError(MedsecError):
    """An inference backend cannot run here; the message names the extra to install."""

    exit_code = 3


class DecryptionError(MedsecError):
    """Encrypted data cannot be opened: wrong key, or the data or what it is bound to changed.

    Exit code 1, like a failed verification: authenticated encryption failing is a tamper (or
    wrong key) result the user must see, not a crash. Messages name key ids, never keys.
    """

    exit_code = 1
