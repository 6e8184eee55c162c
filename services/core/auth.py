"""Who is calling, and what they may do: principals, roles, and the refusals every modalign API shares.

A caller proves who it is with a bearer token (gRPC metadata `authorization: Bearer TOKEN`, the HTTP
`Authorization` header) or, on a mutual-TLS server, with its client certificate. A token is either a
static one from a tokens file (JSON by role; rotated by editing the file, which is re-read when it
changes) or a JWT verified against a configured public key, whose `sub` is the principal and whose
`roles` claim its roles. A principal holds roles; each API method names the roles that may call it:

    client    Generate, chat completions, Submit feedback
    operator  the rollout service's commands (Pause, Resume, Promote, Rollback, Pin), and GetState
    reader    GetState, /v1/models

Authentication is on by default: a service given no way to authenticate refuses to start (exit status
2, naming the flags), unless it is told --auth.insecure (then every caller is the anonymous principal, with every role).
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import os
import threading
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import jwt
from prometheus_client import Counter

from modalign.core.config import ConfigError

log = logging.getLogger(__name__)

CLIENT, OPERATOR, READER = "client", "operator", "reader"
ROLES = (CLIENT, OPERATOR, READER)

REFUSED = Counter(
    "modalign_auth_refused_total",
    "Calls refused before reaching the service: no valid credential (unauthenticated) or a role that may "
    "not make the call (permission_denied), by API method.",
    ["method", "reason"],
)


@dataclass(frozen=True)
class AuthConfig:
    """How a service authenticates its callers."""

    insecure: bool = False
    """Serve without authentication: every caller may do everything, as the anonymous principal. Only
    for a machine of your own; a service is otherwise refused start-up without tokens_file,
    jwt_public_key or certificate_roles."""
    tokens_file: Path | None = None
    """JSON file of static bearer tokens by role: {"client": TOKEN, "operator": TOKEN, "reader": TOKEN}.
    A role may map to a list of tokens (the old and the new while rotating; the principal is the role's
    name) or to {principal: token}. Re-read when it changes, so a token is rotated without a restart."""
    jwt_public_key: Path | None = None
    """PEM public key (RSA, EC or Ed25519) that bearer JWTs are verified against; each JWT's `sub` is the
    principal and its `roles` claim (a list) its roles. Tokens must carry `exp`."""
    jwt_audience: str = "modalign"
    """The `aud` a JWT must name."""
    jwt_issuer: str = ""
    """The `iss` a JWT must name; empty accepts any issuer."""
    certificate_roles: tuple[str, ...] = ()
    """Roles of mutual-TLS client certificates, as COMMON_NAME:ROLE entries, comma-separated (e.g.
    web:client,ops:operator); the certificate's common name is the principal."""
    front_ends: tuple[str, ...] = (CLIENT,)
    """Principals trusted to act for their end users, naming each by a request's user_id (a web front end
    holding the static client token). Any other principal acts only as itself: its user_id must be empty
    or its own name."""

    def validate(self) -> None:
        for entry in self.certificate_roles:
            name, _, role = entry.rpartition(":")
            if not name or role not in ROLES:
                raise ConfigError("certificate_roles", f"COMMON_NAME:ROLE with ROLE one of {', '.join(ROLES)}, got {entry!r}")
        for field_name in ("tokens_file", "jwt_public_key"):
            path = getattr(self, field_name)
            if path is not None and not Path(path).is_file():
                raise ConfigError(field_name, f"no such file: {path}")

    def missing(self) -> str:
        """Why a service with this config may not start (no way to authenticate anyone, and not told to
        let everyone in), or empty."""
        if self.insecure or self.tokens_file or self.jwt_public_key or self.certificate_roles:
            return ""
        return ("authentication is on by default: give --auth.tokens-file, --auth.jwt-public-key or "
                "--auth.certificate-roles, or choose --auth.insecure to let anyone call")


@dataclass(frozen=True)
class Principal:
    """An authenticated caller."""

    name: str
    roles: frozenset[str]
    front_end: bool = False
    """May act for end users it names (AuthConfig.front_ends)."""


ANONYMOUS = Principal("anonymous", frozenset(ROLES), front_end=True)
"""Every caller of a service run with --auth.insecure."""


class Refused(Exception):
    """A call refused before it reached the service; unauthenticated says which of the two refusals."""

    def __init__(self, message: str, unauthenticated: bool) -> None:
        super().__init__(message)
        self.unauthenticated = unauthenticated


def unauthenticated(message: str) -> Refused:
    return Refused(message, unauthenticated=True)


def permission_denied(message: str) -> Refused:
    return Refused(message, unauthenticated=False)


_CURRENT: contextvars.ContextVar[Principal] = contextvars.ContextVar("modalign_principal", default=ANONYMOUS)


def current_principal() -> Principal:
    """The principal of the call being served (set by the transport before the service runs)."""
    return _CURRENT.get()


def acting_as(principal: Principal) -> contextvars.Token:
    return _CURRENT.set(principal)


def end_user(principal: Principal, user_id: str) -> str:
    """The user a request acts for: the user_id it names when its caller is a front end, else the caller
    itself, which may name no one else. Raises Refused (permission denied) for a user_id not its own."""
    if principal.front_end:
        return user_id
    if user_id and user_id != principal.name:
        raise permission_denied(f"user_id: {principal.name!r} may act only as itself, not as {user_id!r}")
    return principal.name


class StaticTokens:
    """The tokens of a tokens file, re-read whenever the file changes."""

    def __init__(self, path: Path, front_ends: Collection[str]) -> None:
        self._path = Path(path)
        self._front_ends = frozenset(front_ends)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._by_digest: dict[bytes, Principal] = {}
        self._reload()

    def lookup(self, token: str) -> Principal | None:
        self._reload()
        return self._by_digest.get(hashlib.sha256(token.encode()).digest())

    def _reload(self) -> None:
        try:
            stat = os.stat(self._path)
        except OSError:
            return  # keep the tokens last read: a file being replaced is briefly missing
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp == self._stamp:
            return
        with self._lock:
            try:
                parsed = parse_tokens(json.loads(self._path.read_text()), self._front_ends)
            except (OSError, ValueError) as error:
                # Not read again, nor logged again, on every call: only once the file changes.
                self._stamp = stamp
                log.error("tokens file %s not reloaded, the tokens read before stay in force: %s", self._path, error)
                return
            self._by_digest, self._stamp = parsed, stamp
            log.info("tokens file %s read: %d tokens", self._path, len(parsed))


def parse_tokens(document: object, front_ends: Collection[str]) -> dict[bytes, Principal]:
    """A tokens file's principals by the SHA-256 of their token (so no token is compared character by
    character, and none is kept in a form a dump would show)."""
    if not isinstance(document, dict):
        raise ValueError("a tokens file is a JSON object of tokens by role")
    found: dict[bytes, Principal] = {}
    for role, entry in document.items():
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
        if isinstance(entry, str):
            named = {role: [entry]}
        elif isinstance(entry, list):
            named = {role: entry}
        elif isinstance(entry, dict):
            named = {principal: [token] for principal, token in entry.items()}
        else:
            raise ValueError(f"{role}: a token, a list of tokens, or tokens by principal")
        for name, tokens in named.items():
            for token in tokens:
                if not isinstance(token, str) or len(token) < 16:
                    raise ValueError(f"{role}: every token is a string of at least 16 characters")
                digest = hashlib.sha256(token.encode()).digest()
                known = found.get(digest)
                roles = (known.roles if known else frozenset()) | {role}
                found[digest] = Principal(name, roles, front_end=name in front_ends)
    return found


class Authenticator:
    """Turns a call's credentials into its principal, as AuthConfig says."""

    def __init__(self, config: AuthConfig) -> None:
        self.insecure = config.insecure
        self._config = config
        self._tokens = StaticTokens(config.tokens_file, config.front_ends) if config.tokens_file else None
        self._jwt_key = Path(config.jwt_public_key).read_bytes() if config.jwt_public_key else None
        self._certificates = {name: role for name, _, role in (e.rpartition(":") for e in config.certificate_roles)}

    def authenticate(self, authorization: str | None, certificate_name: str | None = None) -> Principal:
        """The principal behind an Authorization value ("Bearer TOKEN") or, without one, a verified
        client certificate's common name. Raises Refused when neither names anyone."""
        if self.insecure:
            return ANONYMOUS
        if authorization:
            scheme, _, token = authorization.strip().partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise unauthenticated("authorization: expected 'Bearer TOKEN'")
            return self._bearer(token.strip())
        if certificate_name is not None:
            role = self._certificates.get(certificate_name)
            if role is None:
                raise permission_denied(f"client certificate {certificate_name!r} holds no role")
            return Principal(certificate_name, frozenset({role}), front_end=certificate_name in self._config.front_ends)
        raise unauthenticated("no credential: send 'authorization: Bearer TOKEN'")

    def _bearer(self, token: str) -> Principal:
        if self._tokens is not None and (principal := self._tokens.lookup(token)) is not None:
            return principal
        if self._jwt_key is not None and token.count(".") == 2:
            try:
                claims = jwt.decode(
                    token, self._jwt_key, algorithms=["RS256", "RS384", "RS512", "ES256", "ES384", "EdDSA"],
                    audience=self._config.jwt_audience, issuer=self._config.jwt_issuer or None,
                    options={"require": ["exp", "sub"]},
                )
            except jwt.InvalidTokenError as error:
                raise unauthenticated(f"bearer token: {error}") from None
            roles = claims.get("roles", [])
            if not isinstance(roles, list):
                raise unauthenticated("bearer token: the roles claim is not a list")
            name = str(claims["sub"])
            return Principal(name, frozenset(r for r in roles if r in ROLES), front_end=name in self._config.front_ends)
        raise unauthenticated("bearer token: not a valid token")


def authorize(principal: Principal, allowed: Collection[str], method: str) -> None:
    """Raises Refused (permission denied) unless principal holds one of the allowed roles."""
    if principal.roles.isdisjoint(allowed):
        raise permission_denied(
            f"{principal.name!r} may not call {method}: it needs the role {' or '.join(sorted(allowed))}"
        )


def check(authenticator: Authenticator, allowed: Collection[str], method: str, authorization: str | None,
          certificate_name: str | None = None) -> Principal:
    """authenticate then authorize, counting a refusal under method."""
    try:
        principal = authenticator.authenticate(authorization, certificate_name)
        authorize(principal, allowed, method)
    except Refused as refusal:
        REFUSED.labels(method, "unauthenticated" if refusal.unauthenticated else "permission_denied").inc()
        raise
    return principal


@dataclass(frozen=True)
class ClientAuth:
    """The bearer token a modalign service sends when it calls another."""

    tokens_file: Path | None = None
    """A tokens file as `modalign up` writes it and the chart's Secret holds it (JSON by role); unset:
    no token is sent."""
    role: str = READER
    """Whose token in tokens_file to send."""

    def validate(self) -> None:
        if self.role not in ROLES:
            raise ConfigError("role", f"one of {', '.join(ROLES)}, got {self.role!r}")

    def token(self) -> str:
        """role's token, read now (so a rotated file is followed); the first when the role lists several."""
        if self.tokens_file is None:
            return ""
        entry = json.loads(Path(self.tokens_file).read_text())[self.role]
        if isinstance(entry, dict):
            entry = next(iter(entry.values()))
        return entry[0] if isinstance(entry, list) else entry
