"""API keys for ``memguard serve``: the key file, its hashed secrets, and checking a caller's key.

A key file (YAML or JSON) lists key ids with a hashed secret, and optionally a team, a policy and a rate
limit; teams and ``defaults`` give the same settings to many keys::

    defaults: {policy: strict, rate_limit: {per_second: 20, burst: 40}}
    teams:
      research: {policy: balanced}
    keys:
      - id: alice
        secret_hash: "scrypt$ln=14,r=8,p=5$..."     # memguard serve hash-key
        team: research
      - id: batch-job
        secret_hash: "scrypt$ln=14,r=8,p=5$..."
        policy: ./policies/batch.yaml                # relative to this file
        rate_limit: {per_second: 2}

A client sends ``Authorization: Bearer <id>.<secret>``. Which policy applies, first match wins: the key's
``policy``, its team's, the file's ``defaults.policy``, then the server's ``--policy``; the same order for
``rate_limit`` (none anywhere: unlimited).

Secrets are stored as scrypt hashes (``hashlib.scrypt``, memory-hard, OWASP's minimum work factor
N=2^14, r=8, p=5; parameters travel in the hash). Checking one costs about 0.1-0.3 s of CPU, so a secret
that checked out is remembered (under a per-process random HMAC key, never in plain text) and later
requests with it cost one HMAC; wrong secrets for a key are limited to ``failures_per_minute`` checks,
after which that key id answers 429 to unverified secrets for a while (its already-verified secret keeps
working). Key ids are names, not secrets: an unknown id is refused without hashing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import MemguardError, format_loc
from .ratelimit import RateLimit, RateLimiter

__all__ = [
    "ApiKey",
    "ApiKeyConfig",
    "ApiKeyFile",
    "ApiKeyFileError",
    "AuthResult",
    "Authenticator",
    "hash_secret",
    "load_api_keys",
    "new_api_key",
    "verify_secret",
]

KEY_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
_KEY_ID = re.compile(KEY_ID_PATTERN)
_SCRYPT = re.compile(r"^scrypt\$ln=(\d{1,2}),r=(\d{1,2}),p=(\d{1,2})\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)$")
SCRYPT_LOG_N, SCRYPT_R, SCRYPT_P = 14, 8, 5
_DKLEN = 32
_MIN_SECRET = 16


class ApiKeyFileError(MemguardError, ValueError):
    """The API key file cannot be used: the message names the file, the field and the reason."""


def _scrypt(secret: str, salt: bytes, log_n: int, r: int, p: int) -> bytes:
    n = 1 << log_n
    return hashlib.scrypt(secret.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=_DKLEN,
                          maxmem=256 * n * r + (64 << 20))


def hash_secret(secret: str, *, log_n: int = SCRYPT_LOG_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """A key file's ``secret_hash`` for ``secret``: ``scrypt$ln=..,r=..,p=..$<salt>$<hash>`` (base64)."""
    if len(secret) < _MIN_SECRET:
        raise ValueError(f"an API key secret needs at least {_MIN_SECRET} characters (got {len(secret)}); "
                         f"`memguard serve hash-key --generate` makes a random one")
    salt = secrets.token_bytes(16)
    digest = _scrypt(secret, salt, log_n, r, p)
    return f"scrypt$ln={log_n},r={r},p={p}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def _parse_hash(hashed: str) -> tuple[int, int, int, bytes, bytes]:
    match = _SCRYPT.match(hashed)
    if match is None:
        raise ValueError("not a memguard scrypt hash (make one with `memguard serve hash-key`)")
    log_n, r, p = (int(match.group(i)) for i in (1, 2, 3))
    if not (10 <= log_n <= 20 and 1 <= r <= 32 and 1 <= p <= 16):
        raise ValueError(f"scrypt parameters ln={log_n}, r={r}, p={p} are out of range (ln 10-20, r 1-32, p 1-16)")
    try:
        salt, digest = base64.b64decode(match.group(4), validate=True), base64.b64decode(match.group(5), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the salt or hash of the scrypt hash is not valid base64") from None
    if len(salt) < 16 or len(digest) != _DKLEN:
        raise ValueError(f"scrypt hash needs a salt of >= 16 bytes and a {_DKLEN}-byte hash")
    return log_n, r, p, salt, digest


def verify_secret(secret: str, hashed: str) -> bool:
    """Whether ``secret`` matches ``hashed`` (constant-time comparison of the derived keys)."""
    log_n, r, p, salt, digest = _parse_hash(hashed)
    return hmac.compare_digest(_scrypt(secret, salt, log_n, r, p), digest)


def new_api_key(key_id: str) -> tuple[str, str]:
    """A new random key for ``key_id``: ``(token for the client, secret_hash for the key file)``."""
    if not _KEY_ID.match(key_id):
        raise ValueError(f"not a key id: {key_id!r} (letters, digits, '-', '_'; at most 64; starts alphanumeric)")
    secret = secrets.token_urlsafe(32)
    return f"{key_id}.{secret}", hash_secret(secret)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Settings(_Strict):
    policy: str | None = Field(default=None, min_length=1)
    rate_limit: RateLimit | None = None


class KeySpec(_Settings):
    id: str = Field(pattern=KEY_ID_PATTERN)
    secret_hash: str
    team: str | None = Field(default=None, min_length=1)
    disabled: bool = False

    @field_validator("secret_hash")
    @classmethod
    def _scrypt_hash(cls, value: str) -> str:
        _parse_hash(value)
        return value


class ApiKeyFile(_Strict):
    """The key file's schema (unknown fields are refused, as in policies)."""

    version: int = Field(default=1, ge=1, le=1)
    defaults: _Settings = _Settings()
    teams: dict[str, _Settings] = Field(default_factory=dict)
    keys: tuple[KeySpec, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> ApiKeyFile:
        seen: set[str] = set()
        for i, key in enumerate(self.keys):
            if key.id in seen:
                raise ValueError(f"keys[{i}]: two keys have the id {key.id!r}")
            seen.add(key.id)
            if key.team is not None and key.team not in self.teams:
                known = ", ".join(sorted(self.teams)) or "none defined"
                raise ValueError(f"keys[{i}] ({key.id}): team {key.team!r} is not under teams (teams: {known})")
        return self


@dataclass(frozen=True)
class ApiKey:
    """One key with its settings resolved (key, then team, then the file's defaults).

    ``policy`` is None where the server's own ``--policy`` applies; a relative path is resolved against the
    key file's folder.
    """

    id: str
    secret_hash: str
    team: str | None
    policy: str | None
    rate_limit: RateLimit | None
    disabled: bool = False


@dataclass(frozen=True)
class ApiKeyConfig:
    path: Path
    sha256: str
    keys: dict[str, ApiKey]


def load_api_keys(path: str | os.PathLike[str]) -> ApiKeyConfig:
    """Read and validate a key file; ``ApiKeyFileError`` names the file, the field and what is wrong."""
    source = Path(path).expanduser()
    try:
        raw = source.read_bytes()
    except OSError as error:
        raise ApiKeyFileError(f"{source}: cannot read: {error.strerror or error}") from None
    try:
        data = yaml.safe_load(raw.decode("utf-8")) if source.suffix != ".json" else json.loads(raw)
    except (yaml.YAMLError, ValueError, UnicodeDecodeError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ApiKeyFileError(f"{source}: not valid YAML/JSON: {first}") from None
    if isinstance(data, list):  # entries appended by `memguard serve hash-key --generate >> keys.yaml`
        data = {"keys": data}
    if not isinstance(data, Mapping):
        raise ApiKeyFileError(f"{source}: the top level must be a mapping with a 'keys' list, or a list of keys")
    try:
        parsed = ApiKeyFile.model_validate(dict(data))
    except ValidationError as error:
        first = error.errors()[0]
        where = format_loc(first["loc"])
        message = "unknown field" if first["type"] == "extra_forbidden" else first["msg"].removeprefix("Value error, ")
        raise ApiKeyFileError(f"{source}: {where + ': ' if where else ''}{message}") from None
    keys = {}
    for spec in parsed.keys:
        team = parsed.teams.get(spec.team) if spec.team is not None else None
        layers = [spec, team, parsed.defaults]
        policy = next((layer.policy for layer in layers if layer is not None and layer.policy), None)
        rate = next((layer.rate_limit for layer in layers if layer is not None and layer.rate_limit), None)
        keys[spec.id] = ApiKey(spec.id, spec.secret_hash, spec.team, _resolve_policy(policy, source.parent), rate,
                               spec.disabled)
    return ApiKeyConfig(source, hashlib.sha256(raw).hexdigest(), keys)


def _resolve_policy(policy: str | None, folder: Path) -> str | None:
    """A policy path relative to the key file's folder; a bare shipped name (``strict``) stays a name."""
    if policy is None:
        return None
    candidate = Path(policy).expanduser()
    if candidate.is_absolute():
        return str(candidate)
    if "/" in policy or os.sep in policy or candidate.suffix in (".yaml", ".yml", ".json"):
        return str(folder / candidate)
    local = folder / candidate
    return str(local) if local.is_file() else policy


@dataclass(frozen=True)
class AuthResult:
    """``key`` when the caller is authenticated; else the HTTP ``status`` (401 or 429) and a one-line ``detail``."""

    key: ApiKey | None
    status: int = 200
    detail: str = ""
    retry_after: float = 0.0


class Authenticator:
    """Checks ``Authorization: Bearer <id>.<secret>`` against the key file's hashes."""

    def __init__(self, keys: Mapping[str, ApiKey], *, failures_per_minute: int = 10, cache_size: int = 4096) -> None:
        self.keys = dict(keys)
        self._mac_key = secrets.token_bytes(32)
        self._verified: OrderedDict[bytes, str] = OrderedDict()
        self._cache_size = cache_size
        self._failures = RateLimiter()
        self._failure_limit = RateLimit(per_second=failures_per_minute / 60.0, burst=failures_per_minute)
        self._lock = threading.Lock()

    def parse(self, authorization: str | None) -> tuple[ApiKey | None, str, AuthResult | None]:
        """The key a header names and the token, or the 401 to answer; no hashing (cheap, for the event loop)."""
        if not authorization:
            return None, "", AuthResult(None, 401, "missing Authorization: Bearer <api key>")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None, "", AuthResult(None, 401, "Authorization must be 'Bearer <api key>'")
        key_id, dot, secret = token.partition(".")
        key = self.keys.get(key_id) if dot and secret else None
        if key is None or key.disabled:
            return None, "", AuthResult(None, 401, "invalid API key")
        return key, token, None

    def cached(self, key: ApiKey, token: str) -> bool:
        mac = hmac.new(self._mac_key, token.encode("utf-8"), hashlib.sha256).digest()
        with self._lock:
            if self._verified.get(mac) == key.id:
                self._verified.move_to_end(mac)
                return True
        return False

    def verify(self, key: ApiKey, token: str) -> AuthResult:
        """The slow path: an scrypt check, limited per key id to ``failures_per_minute`` wrong secrets."""
        wait = self._failures.peek(key.id, self._failure_limit)
        if wait:
            return AuthResult(None, 429, f"too many failed authentications for key {key.id!r}; retry in "
                                         f"{math.ceil(wait)} s", wait)
        secret = token.partition(".")[2]
        if verify_secret(secret, key.secret_hash):
            mac = hmac.new(self._mac_key, token.encode("utf-8"), hashlib.sha256).digest()
            with self._lock:
                self._verified[mac] = key.id
                while len(self._verified) > self._cache_size:
                    self._verified.popitem(last=False)
            return AuthResult(key)
        self._failures.admit(key.id, self._failure_limit)
        return AuthResult(None, 401, "invalid API key")

    def authenticate(self, authorization: str | None) -> AuthResult:
        """Parse, then the cache, then the slow check (for callers that may block)."""
        key, token, refused = self.parse(authorization)
        if refused is not None:
            return refused
        assert key is not None
        if self.cached(key, token):
            return AuthResult(key)
        return self.verify(key, token)


