"""Tuputech's signing as seed 001 and DESIGN.md describe it, written out for the tests.

SHA256withRSA (PKCS#1 v1.5), base64: the client signs ``secretId,timestamp,nonce``; the
provider signs the exact ``json`` text of each answer and callback. Tests sign and verify
with this, not with the client's ``tuputech_wire`` nor the emulator's own code, so that
neither can pass by agreeing with itself.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa


def generate_key_pair() -> tuple[str, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private.decode(), public.decode()


def rsa_sign(private_pem: str, text: str) -> str:
    key = serialization.load_pem_private_key(private_pem.encode(), password=None)
    return base64.b64encode(key.sign(text.encode("utf-8"), padding.PKCS1v15(), hashes.SHA256())).decode()


def rsa_verify(public_pem: str, text: str, signature: str) -> None:
    key = serialization.load_pem_public_key(public_pem.encode())
    key.verify(base64.b64decode(signature), text.encode("utf-8"), padding.PKCS1v15(), hashes.SHA256())


def signed_submit_body(
    secret_id: str,
    private_pem: str,
    doc: dict[str, Any],
    *,
    tasks: list[str] | None = None,
    custom_info: dict[str, Any] | None = None,
    timestamp: int | None = None,
    nonce: int | None = None,
) -> dict[str, Any]:
    """A submit as seed 2.6 shows it, signed over ``secretId,timestamp,nonce``."""
    timestamp = int(time.time()) if timestamp is None else timestamp
    nonce = secrets.randbelow(10**10) if nonce is None else nonce
    body: dict[str, Any] = {"doc": doc}
    if tasks is not None:
        body["tasks"] = tasks
    if custom_info is not None:
        body["customInfo"] = custom_info
    body.update(timestamp=timestamp, nonce=nonce, signature=rsa_sign(private_pem, f"{secret_id},{timestamp},{nonce}"))
    return body


def open_sealed(public_pem: str, envelope: dict[str, str]) -> dict[str, Any]:
    """Seed 3.1/4.5: verify the signature over the exact ``json`` text, then parse it."""
    assert set(envelope) == {"json", "signature"}, envelope
    rsa_verify(public_pem, envelope["json"], envelope["signature"])
    return json.loads(envelope["json"])


def seal(private_pem: str, payload: dict[str, Any]) -> dict[str, str]:
    """``{"json", "signature"}`` for a payload, as the provider answers and calls back."""
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return {"json": text, "signature": rsa_sign(private_pem, text)}
