"""The cryptographic layer's commands: keys, seal, verify, encrypt, decrypt, restore.

Layer: runtime (cli; the crypto modules are imported inside the command bodies). ``register``
adds the commands to the main ``medsec-edge`` app (``cli/root.py``) or to any typer app (tests).

Exit codes as in DESIGN.md: 0 ok, 1 verification failed (invalid or unsigned seal, wrong key,
changed data), 2 usage (and key files), 4 bad input file. Output names key ids and short image
hashes, never key material, UIDs or patient data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from medsec_edge.runtime.cli.help import command, group
from medsec_edge.runtime.cli.keys import key_set_path, load_ring
from medsec_edge.runtime.cli.options import JsonOpt, LegacyKeySetOpt, keys_option
from medsec_edge.runtime.cli.output import fail as _fail
from medsec_edge.runtime.cli.output import json_line, progress, record, table
from medsec_edge.runtime.crypto.verification import read_dicom as _read_dicom
from medsec_edge.runtime.crypto.verification import verify_file

__all__ = ["register"]

KeysDirArg = typer.Argument(..., metavar="DIR", help="Key set directory.")


def register(app: typer.Typer) -> None:
    """Add ``keys new|rotate|export-public``, ``seal``, ``verify``, ``encrypt``, ``decrypt``,
    ``restore`` to ``app``."""
    keys_app = group(
        "Create, rotate and export key sets.\n\nA set holds every key the device uses: seal "
        "(Ed25519), encryption (X25519), DICOM signature (RSA + certificate) and the watermark key "
        "(a secret HMAC key: never exported, kept across rotation).",
        """
        medsec-edge keys new ~/.config/medsec-edge/keys
        medsec-edge keys export-public ~/.config/medsec-edge/keys public/""")
    command(keys_app, keys_new, "medsec-edge keys new /etc/medsec/keys --common-name ct-room-2", "new")
    command(keys_app, keys_rotate, "medsec-edge keys rotate /etc/medsec/ring", "rotate")
    command(keys_app, keys_export_public, "medsec-edge keys export-public /etc/medsec/keys public/",
            "export-public")
    app.add_typer(keys_app, name="keys")
    command(app, seal, "medsec-edge seal scan.dcm sealed.dcm --keys /etc/medsec/keys", "seal")
    command(app, verify, "medsec-edge verify archive/ --keys public/ --json", "verify")
    command(app, encrypt, "medsec-edge encrypt scan.dcm scan.enc.dcm --to reader-public/", "encrypt")
    command(app, decrypt, "medsec-edge decrypt scan.enc.dcm scan.dcm --keys reader-keys/", "decrypt")
    command(app, restore, "medsec-edge restore marked.dcm original.dcm --keys archive-keys/", "restore")


def _emit(row: dict, as_json: bool, title: str) -> None:
    if as_json:
        json_line(row)
    else:
        record(title, row)


def _keyset_row(keyset) -> dict:
    return {
        "path": str(keyset.path),
        "seal_key_id": keyset.seal.key_id,
        "encryption_key_id": keyset.recipient.key_id,
        "dicom_key_id": keyset.dicom_key_id,
        "watermark_key_id": keyset.watermark_key_id,
        "private": keyset.has_private,
    }


# --------------------------------------------------------------------------------------------
# keys


def keys_new(
    directory: Path = typer.Argument(..., help="New key set directory (created 0700)."),
    common_name: Optional[str] = typer.Option(
        None, "--common-name", help="Certificate subject CN (a device name, never a person)."
    ),
    as_json: bool = JsonOpt,
) -> None:
    """Create a key set: seal (Ed25519), encryption (X25519), DICOM signature (RSA, certificate)
    and the watermark key (32-byte HMAC secret); private files 0600."""
    from medsec_edge.runtime.crypto.keyset import new_key_dir
    from medsec_edge.runtime.errors import MedsecError

    try:
        keyset = new_key_dir(directory, common_name=common_name)
    except MedsecError as exc:
        _fail(exc)
        return
    _emit(_keyset_row(keyset), as_json, "new key set (private files are 0600)")


def keys_rotate(
    ring: Path = typer.Argument(..., help="Key ring directory (key sets in subdirectories)."),
    common_name: Optional[str] = typer.Option(None, "--common-name", help="Certificate CN."),
    as_json: bool = JsonOpt,
) -> None:
    """Add a key set to a ring: it signs from now on, the older ones still verify and decrypt.

    The watermark key is kept (copied into the new set): marks already made must keep matching
    their images."""
    from medsec_edge.runtime.crypto.keyset import KeyRing
    from medsec_edge.runtime.errors import MedsecError

    try:
        keyset = KeyRing.rotate(ring, common_name=common_name)
    except MedsecError as exc:
        _fail(exc)
        return
    _emit(_keyset_row(keyset), as_json, "rotated: new signing key set")


def keys_export_public(
    directory: Path = KeysDirArg,
    out: Path = typer.Argument(..., help="New directory for the public files."),
    as_json: bool = JsonOpt,
) -> None:
    """Copy a key set's public keys and certificate for verifiers and senders: never a private
    key, never the watermark key (a secret; extract and check with a public set report the
    identity as unknown)."""
    from medsec_edge.runtime.crypto.keyset import export_public, load_key_dir
    from medsec_edge.runtime.errors import MedsecError

    try:
        target = export_public(directory, out)
        keyset = load_key_dir(target, private=False)
    except MedsecError as exc:
        _fail(exc)
        return
    _emit(_keyset_row(keyset), as_json, "exported public keys")


# --------------------------------------------------------------------------------------------
# seal and verify


def seal(
    input: Path = typer.Argument(..., help="DICOM file to seal and sign (never modified)."),
    output: Path = typer.Argument(..., help="Where to write the sealed, signed copy."),
    keys: Optional[Path] = keys_option("its private keys sign"),
    as_json: bool = JsonOpt,
) -> None:
    """Seal (Ed25519 over pixels + identity) and sign (DICOM PS3.15 Creator RSA) one DICOM file.

    Earlier DICOM signatures of the file are replaced: our seal changes the data they signed."""
    from medsec_edge.runtime.crypto.sealing import seal_file
    from medsec_edge.runtime.errors import MedsecError, UsageError

    try:
        ring = load_ring(keys)
        if ring.signer is None or ring.dicom_signer is None:
            raise UsageError(
                f"the newest key set in {ring.newest.path} has no private seal or DICOM signature key: seal "
                "with the key set made by 'keys new', not a public export"
            )
        output.parent.mkdir(parents=True, exist_ok=True)
        result = seal_file(input, ring, output)
    except MedsecError as exc:
        _fail(exc)
        return
    row = {
        "path": str(input),
        "output": str(output),
        "image_id": result.image_id,
        "seal_key_id": result.seal_key_id,
        "dicom_key_id": result.dicom_key_id,
        "signature_uid": result.signature_uid,
        "replaced_signatures": result.replaced_signatures,
    }
    _emit(row, as_json, "sealed and signed")


def verify(
    inputs: list[Path] = typer.Argument(..., help="DICOM files and folders of them."),
    keys: Optional[Path] = keys_option("public keys suffice"),
    as_json: bool = JsonOpt,
) -> None:
    """Check our seal and the DICOM signature: valid, invalid (what changed), unsigned.

    Exit 1 unless every file is valid; an unsigned file is not valid."""
    from medsec_edge.runtime.errors import MedsecError

    try:
        ring = load_ring(keys, private=False)
        files = _dicom_files(inputs)
    except MedsecError as exc:
        _fail(exc)
        return
    rows, worst = [], 0
    with progress(len(files), "verify") as advance:
        for path in files:
            row, code = verify_file(path, ring)
            worst = max(worst, code)
            rows.append(row)
            if as_json:
                json_line(row)
            advance()
    if not as_json:
        shown = [
            {
                "path": r["path"],
                "valid": r["valid"],
                "seal": (r["seal"] or {}).get("status"),
                "signature": (r["dicom_signature"] or {}).get("status"),
            }
            for r in rows
        ]
        details = [f"{Path(r['path']).name}: {part}" for r in rows if not r["valid"]
                   for part in str(r["reason"]).split("; ")]
        table(None, shown, ["path", "valid", "seal", "signature"], details=details)
    if worst:
        raise typer.Exit(worst)


def _dicom_files(inputs: list[Path]) -> list[Path]:
    """Files as given; inside folders, the files that can be DICOM (by suffix, or none)."""
    from medsec_edge.runtime.errors import UsageError
    from medsec_edge.runtime.io.formats import FORMAT_BY_SUFFIX
    from medsec_edge.runtime.io.inputs import collect_inputs

    files: list[Path] = []
    for item in inputs:
        found = collect_inputs([item])
        if item.is_dir():
            found = [p for p in found if FORMAT_BY_SUFFIX.get(p.suffix.lower(), "dicom") == "dicom"]
        files += found
    if not files:
        raise UsageError("no DICOM files found in the given inputs")
    return files


# --------------------------------------------------------------------------------------------
# encryption and restore


def encrypt(
    input: Path = typer.Argument(..., help="DICOM file to encrypt (never modified)."),
    output: Path = typer.Argument(..., help="Encrypted DICOM file (de-identified clear header)."),
    to: Path = typer.Option(
        ..., "--to", metavar="DIR", help="Recipient's public key set (its 'keys export-public')."
    ),
    as_json: bool = JsonOpt,
) -> None:
    """AES-256-GCM encrypt a whole DICOM file for a recipient; the header stays routable."""
    from medsec_edge.runtime.crypto.keyset import KeyRing
    from medsec_edge.runtime.crypto.encryption import StudyKeys, encrypt_file
    from medsec_edge.runtime.errors import MedsecError

    try:
        ring = KeyRing.load(to, private=False)
        study_keys = StudyKeys(ring.recipient)
        _read_dicom(input)  # a corrupt file is bad input (exit 4), whatever the parser raises
        output.parent.mkdir(parents=True, exist_ok=True)
        encrypt_file(input, output, study_keys)
    except MedsecError as exc:
        _fail(exc)
        return
    _emit(
        {"path": str(input), "output": str(output), "recipient_key_id": ring.recipient.key_id},
        as_json,
        "encrypted",
    )


def decrypt(
    input: Path = typer.Argument(..., help="Encrypted DICOM file."),
    output: Path = typer.Argument(..., help="Where to write the original file (byte for byte)."),
    keys: Optional[Path] = keys_option("its private keys decrypt"),
    as_json: bool = JsonOpt,
    key: Optional[Path] = LegacyKeySetOpt,
) -> None:
    """Decrypt a file made by 'encrypt'; wrong key or any change: exit 1, nothing written."""
    from medsec_edge.runtime.crypto.encryption import decrypt_file
    from medsec_edge.runtime.errors import MedsecError

    try:
        ring = load_ring(key_set_path(keys, key))
        _read_dicom(input)  # a corrupt file is bad input (exit 4), whatever the parser raises
        output.parent.mkdir(parents=True, exist_ok=True)
        decrypt_file(input, output, ring)
    except MedsecError as exc:
        _fail(exc)
        return
    _emit({"path": str(input), "output": str(output)}, as_json, "decrypted")


def restore(
    input: Path = typer.Argument(..., help="DICOM file watermarked with 'embed --reversible'."),
    output: Path = typer.Argument(..., help="Where to write the original (exact pixels, SOP UID)."),
    keys: Optional[Path] = keys_option("its private keys decrypt the record"),
    as_json: bool = JsonOpt,
    key: Optional[Path] = LegacyKeySetOpt,
) -> None:
    """Give back the pre-watermark image bit for bit (key holder only); exit 1 on any mismatch."""
    from medsec_edge.runtime.errors import MedsecError
    from medsec_edge.runtime.crypto.reversible import restore_file

    try:
        ring = load_ring(key_set_path(keys, key))
        output.parent.mkdir(parents=True, exist_ok=True)
        result = restore_file(input, output, ring)
    except MedsecError as exc:
        _fail(exc)
        return
    _emit({"path": str(input), **result.to_dict()}, as_json, "restored")
