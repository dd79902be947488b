"""Signing secrets: made as ``whsec_`` + base64 of 32 random bytes, kept only as Fernet
ciphertext (the key: ORCHESTRATOR_WEBHOOK_SECRET_KEY). Plain secrets live in memory while a
request is signed and are shown once, when ``webhooks add``/``rotate`` makes them."""

from __future__ import annotations

import base64
import secrets

from cryptography.fernet import Fernet, InvalidToken
from pydantic import SecretStr

from orchestrator.config import ConfigError

PREFIX = "whsec_"
SECRET_BYTES = 32
KEY_VARIABLE = "ORCHESTRATOR_WEBHOOK_SECRET_KEY"


class SecretBox:
    """Encrypts and decrypts signing secrets with the environment's key."""

    def __init__(self, key: SecretStr | None) -> None:
        if key is None or not key.get_secret_value().strip():
            raise ConfigError(f"{KEY_VARIABLE} is required to sign webhooks")
        try:
            self._fernet = Fernet(key.get_secret_value().strip().encode())
        except ValueError:
            raise ConfigError(
                f"{KEY_VARIABLE}: not a Fernet key (32 url-safe base64-encoded bytes)"
            ) from None

    def encrypt(self, secret: str) -> str:
        return self._fernet.encrypt(secret.encode()).decode()

    def decrypt(self, ciphertext: str) -> str:
        try:
            return self._fernet.decrypt(ciphertext.encode()).decode()
        except InvalidToken:
            raise ConfigError(
                f"{KEY_VARIABLE} does not decrypt a stored signing secret (another key?)"
            ) from None


def new_key() -> str:
    """A new Fernet key for ORCHESTRATOR_WEBHOOK_SECRET_KEY."""
    return Fernet.generate_key().decode()


def new_secret() -> str:
    """A new signing secret, as receivers configure it (``whsec_…``)."""
    return PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def secret_bytes(secret: str) -> bytes:
    """The HMAC key of a ``whsec_`` secret (the prefix optional, padding forgiven)."""
    raw = secret.removeprefix(PREFIX)
    return base64.b64decode(raw + "=" * (-len(raw) % 4))
