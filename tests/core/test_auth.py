"""Principals and roles from static tokens and JWTs (modalign.core.auth): the pure logic behind every door."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from modalign.core.auth import (
    ANONYMOUS,
    AuthConfig,
    Authenticator,
    Refused,
    authorize,
    end_user,
    parse_tokens,
)
from modalign.core.config import ConfigError, with_overrides

CLIENT_TOKEN, OPERATOR_TOKEN = "c" * 32, "o" * 32


def write_tokens(path: Path, tokens: dict) -> Path:
    path.write_text(json.dumps(tokens))
    return path


def refusal(call, *args) -> Refused:
    with pytest.raises(Refused) as raised:
        call(*args)
    return raised.value


def test_static_tokens_name_their_role_and_nothing_else_passes(tmp_path: Path) -> None:
    tokens = write_tokens(tmp_path / "tokens.json", {"client": CLIENT_TOKEN, "operator": OPERATOR_TOKEN})
    authenticator = Authenticator(AuthConfig(tokens_file=tokens))
    client = authenticator.authenticate(f"Bearer {CLIENT_TOKEN}")
    assert (client.name, client.roles, client.front_end) == ("client", {"client"}, True)
    operator = authenticator.authenticate(f"bearer {OPERATOR_TOKEN}")
    assert (operator.name, operator.roles, operator.front_end) == ("operator", {"operator"}, False)
    for credential in (None, "", f"Basic {CLIENT_TOKEN}", "Bearer ", f"Bearer {CLIENT_TOKEN}x", "Bearer " + "c" * 31):
        assert refusal(authenticator.authenticate, credential).unauthenticated, credential


def test_a_role_needs_its_token_and_operators_do_not_act_for_users(tmp_path: Path) -> None:
    tokens = write_tokens(tmp_path / "tokens.json", {"client": CLIENT_TOKEN, "operator": OPERATOR_TOKEN})
    authenticator = Authenticator(AuthConfig(tokens_file=tokens))
    client, operator = (authenticator.authenticate(f"Bearer {t}") for t in (CLIENT_TOKEN, OPERATOR_TOKEN))
    denied = refusal(authorize, client, {"operator"}, "/modalign.v1.RolloutService/Pin")
    assert not denied.unauthenticated and "needs the role operator" in str(denied)
    authorize(operator, {"operator"}, "/modalign.v1.RolloutService/Pin")
    assert end_user(client, "user-7") == "user-7"  # the static client token is a trusted front end
    assert end_user(operator, "") == "operator"
    assert not refusal(end_user, operator, "user-7").unauthenticated


def test_a_tokens_file_is_re_read_when_it_changes_so_a_token_is_rotated_without_a_restart(tmp_path: Path) -> None:
    tokens = write_tokens(tmp_path / "tokens.json", {"client": CLIENT_TOKEN})
    authenticator = Authenticator(AuthConfig(tokens_file=tokens))
    assert authenticator.authenticate(f"Bearer {CLIENT_TOKEN}").name == "client"
    new = "n" * 40
    write_tokens(tokens, {"client": [CLIENT_TOKEN, new]})  # overlap: both work while clients move over
    os.utime(tokens, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    assert authenticator.authenticate(f"Bearer {new}").name == "client"
    write_tokens(tokens, {"client": [new]})
    os.utime(tokens, ns=(time.time_ns(), time.time_ns() + 2_000_000))
    assert refusal(authenticator.authenticate, f"Bearer {CLIENT_TOKEN}").unauthenticated
    tokens.write_text("{not json")  # a broken edit keeps the tokens in force
    os.utime(tokens, ns=(time.time_ns(), time.time_ns() + 3_000_000))
    assert authenticator.authenticate(f"Bearer {new}").name == "client"


def test_a_tokens_file_names_principals_and_refuses_what_it_cannot_mean() -> None:
    parsed = parse_tokens({"client": {"web-frontend": "w" * 20, "mobile-app": "m" * 20}}, front_ends=["web-frontend"])
    assert sorted((p.name, p.front_end) for p in parsed.values()) == [("mobile-app", False), ("web-frontend", True)]
    for bad in ([], {"admin": "a" * 20}, {"client": "short"}, {"client": 7}):
        with pytest.raises(ValueError):
            parse_tokens(bad, front_ends=())


def key_pair(tmp_path: Path) -> tuple[ec.EllipticCurvePrivateKey, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    public = tmp_path / f"jwt-{id(key)}.pem"
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return key, public


def test_a_jwt_signed_by_the_configured_key_names_its_subject_and_roles(tmp_path: Path) -> None:
    key, public = key_pair(tmp_path)
    authenticator = Authenticator(AuthConfig(jwt_public_key=public, jwt_issuer="https://idp.example"))
    now = int(time.time())
    claims = {"sub": "alice", "roles": ["client", "admin"], "aud": "modalign", "iss": "https://idp.example", "exp": now + 60}
    alice = authenticator.authenticate("Bearer " + jwt.encode(claims, key, algorithm="ES256"))
    assert (alice.name, alice.roles, alice.front_end) == ("alice", {"client"}, False)
    assert end_user(alice, "") == "alice" and end_user(alice, "alice") == "alice"
    assert not refusal(end_user, alice, "bob").unauthenticated  # an end user acts only as itself

    other_key, _ = key_pair(tmp_path)
    for wrong in ({**claims, "exp": now - 10}, {**claims, "aud": "someone-else"}, {**claims, "iss": "https://evil"},
                  {k: v for k, v in claims.items() if k != "exp"}):
        assert refusal(authenticator.authenticate, "Bearer " + jwt.encode(wrong, key, algorithm="ES256")).unauthenticated
    assert refusal(authenticator.authenticate, "Bearer " + jwt.encode(claims, other_key, algorithm="ES256")).unauthenticated
    unsigned = jwt.encode(claims, None, algorithm="none")
    assert refusal(authenticator.authenticate, "Bearer " + unsigned).unauthenticated


def test_certificate_principals_hold_the_roles_configured_for_them() -> None:
    authenticator = Authenticator(AuthConfig(certificate_roles=("web:client", "ops:operator"), front_ends=("web",)))
    web = authenticator.authenticate(None, "web")
    assert (web.roles, web.front_end) == ({"client"}, True)
    assert authenticator.authenticate(None, "ops").roles == {"operator"}
    assert not refusal(authenticator.authenticate, None, "stranger").unauthenticated
    with pytest.raises(ConfigError, match="COMMON_NAME:ROLE"):
        with_overrides(AuthConfig(), {"certificate_roles": ("web:admin",)})


def test_without_credentials_a_service_may_not_start_unless_told_insecure() -> None:
    assert "on by default" in AuthConfig().missing()
    assert AuthConfig(insecure=True).missing() == ""
    assert Authenticator(AuthConfig(insecure=True)).authenticate(None) == ANONYMOUS
