"""Signed checkpoints: Ed25519 keys, what a checkpoint signs, signing and checking one.

The hash chain alone is unkeyed: whoever can write the log can edit it and recompute every hash. A
checkpoint is a chained record that signs, with a private key the writer holds and an editor does not,
the head of the chain (``signed_seq``, ``signed_hash``), the previous checkpoint (its ``seq`` and
signature) and the time. Every record before a checkpoint is then fixed by that signature: changing one
changes the head hash the checkpoint signed, and deleting or reordering checkpoints breaks the chain of
signatures. Records after the last checkpoint are not signed yet (``memguard audit verify`` counts them).

A checkpoint signs ``DOMAIN + canonical_json(record without signature, seq, prev_hash, hash)``: every
field of the record except the chain fields (which ``signed_seq``/``signed_hash`` pin down: a checkpoint
always directly follows the record it signs) and the signature itself. In a trail that includes the trail's
name, the writer and its witnesses of the other segments (``guard.audit.trail``).

``CheckpointSigner`` is the ``guard.audit.sink.Signer`` memguard ships: the sink only asks it for a checkpoint
(``seal``) and whether a record is one (``is_checkpoint``); the format is known here and in the verifier.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import socket
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from guard.errors import MemguardError

from .chain import AuditWriteError, canonical_json, utc_timestamp

__all__ = [
    "CHECKPOINT_EVENT",
    "CHECKPOINT_REASONS",
    "SIGNING_KEY_ENV",
    "CheckpointSigner",
    "KeyFileError",
    "KeyRing",
    "SigningKeyError",
    "checkpoint_payload",
    "checkpoint_problem",
    "generate_keypair",
    "key_id_of",
    "load_private_key",
    "load_public_key",
    "resolve_signer",
]

SIGNING_KEY_ENV = "MEMGUARD_AUDIT_SIGNING_KEY"
CHECKPOINT_EVENT = "checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_REASONS = ("count", "interval", "close", "exit", "open")
#: Prefixed to every signed payload, so a checkpoint signature can never be replayed as another kind of message.
DOMAIN = b"memguard audit checkpoint v1\n"
_UNSIGNED_FIELDS = ("signature", "seq", "prev_hash", "hash")
_SIGNATURE_BYTES = 64


class KeyFileError(MemguardError, ValueError):
    """A key file is missing, unreadable, not an Ed25519 key of the expected kind, or (private) not protected."""


class SigningKeyError(AuditWriteError):
    """The configured signing key is unusable: the log cannot be signed, so it counts as not writable."""


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as error:  # pragma: no cover - cryptography is a core dependency
        raise KeyFileError(f"signed audit logs need the 'cryptography' package ({error})") from None
    return serialization, ed25519


def key_id_of(public_key: Any) -> str:
    """A key's id: the first 16 bytes of the SHA-256 of its raw 32-byte public key, in hex."""
    serialization, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:32]


def generate_keypair(out_dir: str | os.PathLike[str], name: str = "memguard-audit", *,
                     overwrite: bool = False) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair as ``DIR/NAME.key`` (PKCS#8 PEM, mode 0600) and ``DIR/NAME.pub``.

    Refuses to replace existing files unless ``overwrite``: a lost private key cannot sign the log's
    continuation, and a replaced public key would make old checkpoints fail verification.
    """
    serialization, ed25519 = _crypto()
    folder = Path(out_dir).expanduser()
    if not name or "/" in name or name.startswith("."):
        raise KeyFileError(f"not a key name: {name!r} (use letters, digits, '-' or '_')")
    private_path, public_path = folder / f"{name}.key", folder / f"{name}.pub"
    if not overwrite:
        existing = [str(p) for p in (private_path, public_path) if p.exists()]
        if existing:
            raise KeyFileError(f"{existing[0]} exists; refusing to overwrite a key (pass --force to replace it)")
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (0 if overwrite else os.O_EXCL)
    fd = os.open(private_path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, private_pem)
    finally:
        os.close(fd)
    public_path.write_bytes(public_pem)
    return private_path, public_path


def _read_key_file(path: str | os.PathLike[str], what: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as error:
        raise KeyFileError(f"cannot read {what} {path}: {error.strerror or error}") from None


def load_private_key(path: str | os.PathLike[str]) -> Any:
    """An Ed25519 private key from an unencrypted PKCS#8 PEM file that others cannot read and only its owner
    can write (group read is allowed, for service groups such as Kubernetes' ``fsGroup``)."""
    serialization, ed25519 = _crypto()
    data = _read_key_file(path, "signing key")
    if os.name == "posix":
        mode = stat.S_IMODE(os.stat(Path(path).expanduser()).st_mode)
        if mode & 0o027:
            raise KeyFileError(f"signing key {path} is accessible by others or writable by its group "
                               f"(mode {mode:04o}); run `chmod 600 {path}`")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as error:
        raise KeyFileError(f"signing key {path} is not an unencrypted PEM private key ({error})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise KeyFileError(f"signing key {path} is a {type(key).__name__}, not an Ed25519 key "
                           f"(make one with `memguard audit keygen`)")
    return key


def load_public_key(path: str | os.PathLike[str]) -> Any:
    """An Ed25519 public key from a PEM file (``memguard audit keygen``'s ``.pub``)."""
    serialization, ed25519 = _crypto()
    data = _read_key_file(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        hint = " (that is the private key; pass the .pub file)" if b"PRIVATE KEY" in data else ""
        raise KeyFileError(f"public key {path} is not a PEM public key{hint}") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise KeyFileError(f"public key {path} is a {type(key).__name__}, not an Ed25519 key")
    return key


def checkpoint_payload(record: Mapping[str, Any]) -> bytes:
    """The exact bytes a checkpoint's signature covers."""
    body = {k: v for k, v in record.items() if k not in _UNSIGNED_FIELDS}
    return DOMAIN + canonical_json(body).encode("utf-8")


class CheckpointSigner:
    """Signs checkpoint records with one Ed25519 private key (loaded once, kept in memory)."""

    def __init__(self, private_key: Any, *, source: str | None = None) -> None:
        self._key = private_key
        self.public_key = private_key.public_key()
        self.key_id = key_id_of(self.public_key)
        self.source = source
        self._writer = {"pid": os.getpid(), "host": socket.gethostname()}

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> CheckpointSigner:
        return cls(load_private_key(path), source=str(path))

    #: Every checkpoint line contains these bytes (canonical JSON): what the sink filters lines by.
    marker = b'"event":"checkpoint"'

    def checkpoint(self, *, signed_seq: int, signed_hash: str, prev_checkpoint_seq: int,
                   prev_signature: str | None, reason: str, **fields: Any) -> dict[str, Any]:
        """A signed checkpoint record for the head ``(signed_seq, signed_hash)``; the sink chains it.

        ``fields`` are signed into it too: a trail's ``trail``, ``writer`` (then the process goes in ``process``,
        not ``writer``) and ``witness``. They cannot replace the fields above.
        """
        if reason not in CHECKPOINT_REASONS:
            raise ValueError(f"checkpoint reason must be one of {CHECKPOINT_REASONS}, not {reason!r}")
        process = {**self._writer, "pid": os.getpid()}
        record: dict[str, Any] = {
            "event": CHECKPOINT_EVENT,
            "v": CHECKPOINT_VERSION,
            "timestamp": utc_timestamp(),
            "alg": "ed25519",
            "key_id": self.key_id,
            "signed_seq": signed_seq,
            "signed_hash": signed_hash,
            "prev_checkpoint_seq": prev_checkpoint_seq,
            "prev_signature": prev_signature,
            "reason": reason,
        }
        clash = sorted(set(fields) & (set(record) | {"signature", "process"}))
        if clash:
            raise ValueError(f"checkpoint fields {clash} are the signer's own")
        record.update(fields)
        if isinstance(record.get("writer"), str):
            record["process"] = process
        else:
            record["writer"] = process
        record["signature"] = base64.b64encode(self._key.sign(checkpoint_payload(record))).decode("ascii")
        return record

    def is_checkpoint(self, record: Mapping[str, Any]) -> bool:
        """Whether ``record`` is a checkpoint (signed by any key: the next one chains to it whoever signed it)."""
        return record.get("event") == CHECKPOINT_EVENT and isinstance(record.get("signature"), str)

    def seal(self, *, head_seq: int, head_hash: str, previous: Mapping[str, Any] | None, reason: str,
             fields: Mapping[str, Any]) -> dict[str, Any]:
        """The sink's ``Signer.seal``: a checkpoint for the head, chained to the file's previous checkpoint."""
        return self.checkpoint(
            signed_seq=head_seq, signed_hash=head_hash,
            prev_checkpoint_seq=int(previous["seq"]) if previous is not None else 0,
            prev_signature=previous.get("signature") if previous is not None else None,
            reason=reason, **fields)

    def __repr__(self) -> str:
        return f"CheckpointSigner(key_id={self.key_id!r}, source={self.source!r})"


class KeyRing:
    """The public keys a log may be signed with, by key id (several when keys were rotated)."""

    def __init__(self, keys: Iterable[Any]) -> None:
        self.keys = {key_id_of(key): key for key in keys}
        if not self.keys:
            raise KeyFileError("no public key given")

    @classmethod
    def from_files(cls, paths: Iterable[str | os.PathLike[str]]) -> KeyRing:
        return cls(load_public_key(path) for path in paths)

    def describe(self) -> str:
        return ", ".join(sorted(self.keys))

    def __contains__(self, key_id: object) -> bool:
        return key_id in self.keys


def checkpoint_problem(record: Mapping[str, Any], keys: KeyRing) -> str | None:
    """Why a checkpoint's own content does not verify (fields, key, signature), or None if it does.

    Where it sits in the log (right after the head it signs, after the previous checkpoint) is checked
    by ``verify_log``, which knows the records around it.
    """
    missing = [f for f in ("v", "alg", "key_id", "signed_seq", "signed_hash", "prev_checkpoint_seq",
                           "prev_signature", "signature", "timestamp", "reason") if f not in record]
    if missing:
        return f"checkpoint lacks field(s) {', '.join(missing)}"
    if record["v"] != CHECKPOINT_VERSION or record["alg"] != "ed25519":
        return f"checkpoint format v{record['v']} / {record['alg']!r} is not one this memguard verifies"
    key_id = record["key_id"]
    if not isinstance(key_id, str) or key_id not in keys:
        return f"checkpoint signed by another key (key id {key_id}; the public key given is {keys.describe()})"
    signature = record["signature"]
    try:
        raw = base64.b64decode(signature, validate=True) if isinstance(signature, str) else b""
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != _SIGNATURE_BYTES:
        return "checkpoint signature is not a base64 Ed25519 signature"
    from cryptography.exceptions import InvalidSignature

    try:
        keys.keys[key_id].verify(raw, checkpoint_payload(record))
    except InvalidSignature:
        return f"bad signature: the checkpoint was changed or not signed by key {key_id}"
    return None


def resolve_signer(configured: str | os.PathLike[str] | None) -> CheckpointSigner | None:
    """The signer for a log: ``$MEMGUARD_AUDIT_SIGNING_KEY`` if set, else ``configured`` (the policy's).

    A key that is configured but unusable raises ``SigningKeyError``: the guard then treats the log as
    not writable (the policy's ``on_error``) rather than silently writing an unsigned log.
    """
    path = os.environ.get(SIGNING_KEY_ENV) or configured
    if not path:
        return None
    try:
        return CheckpointSigner.from_file(Path(path).expanduser())
    except KeyFileError as error:
        raise SigningKeyError(f"audit log cannot be signed: {error}") from None
