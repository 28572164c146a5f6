"""Which guard judges a caller: one guard per distinct policy of the key file, sharing one pipeline and its lock."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ..errors import MemguardError
from .keys import ApiKey, ApiKeyConfig, ApiKeyFileError, Authenticator
from .ratelimit import Limiter, RateLimiter

__all__ = ["ServiceAccess", "is_loopback"]


class ServiceAccess:
    """What the service needs to serve API keys: authentication, rate limits, and each key's guard.

    ``guards`` maps key ids to the guard (one per distinct policy) that judges that key's requests. ``limiter``
    enforces the keys' rate limits: this process's own buckets by default; replicas of one deployment pass one they
    share, so that a key's limit holds for the deployment, not per replica.
    """

    def __init__(self, config: ApiKeyConfig, guards: Mapping[str, Any], *, failures_per_minute: int = 10,
                 limiter: Limiter | None = None) -> None:
        missing = sorted(set(config.keys) - set(guards))
        if missing:
            raise ValueError(f"no guard for key(s) {missing}")
        self.config = config
        self.guards = dict(guards)
        self.authenticator = Authenticator(config.keys, failures_per_minute=failures_per_minute)
        self.limiter: Limiter = limiter if limiter is not None else RateLimiter()

    @classmethod
    def build(cls, config: ApiKeyConfig, default_guard: Any, make_guard: Callable[[str, Any], Any], **options: Any
              ) -> ServiceAccess:
        """One guard per distinct policy (``make_guard(policy, lock)``), keys without a policy on ``default_guard``;
        every guard gets the default guard's lock (``GuardCore(lock=...)``), since they share one pipeline."""
        from ..policy import load_policy

        by_hash: dict[str, Any] = {default_guard.policy.content_hash: default_guard}
        guards: dict[str, Any] = {}
        for key in config.keys.values():
            if key.policy is None:
                guards[key.id] = default_guard
                continue
            try:
                policy = load_policy(key.policy)
            except (MemguardError, OSError, TypeError) as error:
                raise ApiKeyFileError(f"{config.path}: key {key.id!r}: policy {key.policy!r}: {error}") from None
            guard = by_hash.get(policy.content_hash)
            if guard is None:
                guard = by_hash[policy.content_hash] = make_guard(key.policy, default_guard.core.lock)
            guards[key.id] = guard
        return cls(config, guards, **options)

    def guard_for(self, key: ApiKey) -> Any:
        return self.guards[key.id]

    def distinct_guards(self) -> list[Any]:
        seen: dict[int, Any] = {}
        for guard in self.guards.values():
            seen.setdefault(id(guard), guard)
        return list(seen.values())

    def grants(self) -> list[dict[str, Any]]:
        """Each key's id, team, policy (name, version, hash, file) and rate limit, for ``service_started``."""
        out = []
        for key in self.config.keys.values():
            policy = self.guards[key.id].policy
            out.append({
                "id": key.id, "team": key.team,
                "policy": {"name": policy.name, "version": policy.version, "hash": policy.content_hash},
                "policy_path": str(policy.source) if policy.source is not None else key.policy,
                "rate_limit": None if key.rate_limit is None else {"per_second": key.rate_limit.per_second,
                                                                   "burst": float(key.rate_limit.capacity)},
            })
        return out


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` resolves to is a loopback address (``--insecure-no-auth`` is needed otherwise)."""
    import ipaddress
    import socket

    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    addresses: Iterable[str] = {info[4][0] for info in infos}
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


