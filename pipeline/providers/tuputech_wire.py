"""Tuputech document moderation, async v3.1 (seed 001): the wire as the client reads it.

A submit is a JSON body carrying the document URL, signed by the client with its own RSA
key over ``secretId,timestamp,nonce``; the synchronous answer and the result callback are
both ``{"json": "<JSON text>", "signature": "<base64>"}``, signed by Tuputech with *its*
key over the exact ``json`` text. Field names on the wire are camelCase; the models here
are snake_case with camelCase aliases, and keep unknown fields (``extra="allow"``).
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import time
from functools import lru_cache
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

SUBMIT_PATH = "/v3.1/recognition/doc/async/{secret_id}"  # 2.1, after https://api.open.tuputech.com
MAX_DOC_BYTES = 500 * 1024 * 1024  # "文档文件须小于 500MB", else callback code 14

# code -> (kind, meaning), from the public sources DESIGN.md lists (the seed names only 0 and
# 14). Whether a code is retried is decided by the seed's own rule, in tuputech.error_for.
BUSINESS_CODES: dict[int, tuple[str, str]] = {
    0: ("ok", "success"),
    1: ("permanent", "auth failed"),
    6: ("permanent", "secretId error"),
    11: ("permanent", "no callback"),
    12: ("transient", "time parameter error"),
    14: ("permanent", "file error"),
    100: ("transient", "server error"),
}


# --- wire models ---------------------------------------------------------------------------


class _Wire(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True, alias_generator=to_camel)

    def wire(self) -> dict[str, Any]:
        """The camelCase dict sent on the wire; absent optional fields are omitted, as the seed shows."""
        return self.model_dump(by_alias=True, exclude_none=True)


class Doc(_Wire):
    url: str
    format: str | None = None
    callback: str | None = None
    callback_rule: str | None = None


class SubmitRequest(_Wire):
    doc: Doc
    tasks: list[str] | None = None
    custom_info: dict[str, Any] | None = None
    nonce: int | float | str
    timestamp: int | float | str
    signature: str


class Signed(_Wire):
    """The envelope of every answer and callback: ``json`` is a JSON text, ``signature`` covers it exactly."""

    json_text: str = Field(alias="json")
    signature: str


class SubmitResult(_Wire):
    request_id: str
    url: str
    callback: str | None = None


class SubmitResponse(_Wire):
    code: int
    message: str | None = None  # the table says always present; the client does not depend on it
    result: SubmitResult | None = None
    nonce: int | float | str | None = None
    timestamp: int | float | None = None


class PageSummary(_Wire):
    suggestion: int
    risk_type: int


class PageImageResult(_Wire):
    url: str
    name: str
    suggestion: int
    risk_type: int
    details: dict[str, Any]  # task id -> that task's own result shape


class PageTextResult(_Wire):
    url: str
    suggestion: int
    risk_type: int
    details: dict[str, Any]


class PageResult(_Wire):
    page: int
    summary: PageSummary
    images: list[PageImageResult] | None = None
    text: PageTextResult | None = None


class DocInfo(_Wire):
    pages: int | None = None
    images: int | None = None
    text_length: int | None = None


class CallbackResult(_Wire):
    code: int
    # The table (4.5) marks message and docInfo as always present; the seed's own callback
    # example (4.7) has no message. Neither is needed to read the verdict.
    message: str | None = None
    request_id: str
    doc_info: DocInfo | None = None
    suggestion: int | None = None
    risk_type: int | None = None
    custom_info: dict[str, Any] | None = None
    pages: list[PageResult] | None = None
    nonce: int | float | str | None = None
    timestamp: int | float | None = None


# --- RSA signatures ------------------------------------------------------------------------


class SignatureError(ValueError):
    """A signed envelope whose signature does not verify (or that is not an envelope at all)."""


def generate_key_pair(bits: int = 2048) -> tuple[str, str]:
    """A fresh ``(private PEM, public PEM)``: PKCS#8 private key, SubjectPublicKeyInfo public key."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private.decode(), public.decode()


@lru_cache(maxsize=16)
def load_private_key(pem: str) -> rsa.RSAPrivateKey:
    """Loading checks the key, which costs milliseconds: done once per key, not once per request."""
    key = serialization.load_pem_private_key(pem.encode(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("not an RSA private key")
    return key


@lru_cache(maxsize=16)
def load_public_key(pem: str) -> rsa.RSAPublicKey:
    key = serialization.load_pem_public_key(pem.encode())
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("not an RSA public key")
    return key


def sign(private_key_pem: str, text: str) -> str:
    """SHA256withRSA (PKCS#1 v1.5) over the UTF-8 bytes of ``text``, base64."""
    signature = load_private_key(private_key_pem).sign(text.encode(), padding.PKCS1v15(), hashes.SHA256())
    return base64.b64encode(signature).decode()


def verify(public_key_pem: str, text: str, signature_b64: str) -> bool:
    """True when ``signature_b64`` is SHA256withRSA over ``text`` by the holder of ``public_key_pem``."""
    try:
        signature = base64.b64decode(signature_b64, validate=True)
        load_public_key(public_key_pem).verify(signature, text.encode(), padding.PKCS1v15(), hashes.SHA256())
    except (InvalidSignature, binascii.Error, ValueError, TypeError):
        return False
    return True


def signing_text(secret_id: str, timestamp: int | float | str, nonce: int | float | str) -> str:
    """What a submit's signature covers: ``secretId,timestamp,nonce`` as the values are written in the body."""
    return f"{secret_id},{timestamp},{nonce}"


def signed_submit_body(
    secret_id: str,
    private_key_pem: str,
    doc: Doc,
    *,
    tasks: list[str] | None = None,
    custom_info: dict[str, Any] | None = None,
    timestamp: int | None = None,
    nonce: int | None = None,
) -> dict[str, Any]:
    """The JSON body of a submit, signed: integers for timestamp and nonce, so their text is unambiguous."""
    timestamp = int(time.time()) if timestamp is None else timestamp
    nonce = secrets.randbelow(10**10) if nonce is None else nonce
    request = SubmitRequest(
        doc=doc,
        tasks=tasks,
        custom_info=custom_info,
        timestamp=timestamp,
        nonce=nonce,
        signature=sign(private_key_pem, signing_text(secret_id, timestamp, nonce)),
    )
    return request.wire()


def open_sealed(public_key_pem: str, envelope: Any) -> dict[str, Any]:
    """The payload of a signed envelope, after checking its signature; ``SignatureError`` otherwise."""
    try:
        signed = Signed.model_validate(envelope)
    except ValueError:
        raise SignatureError("not a signed {json, signature} envelope") from None
    if not verify(public_key_pem, signed.json_text, signed.signature):
        raise SignatureError("signature does not verify with the provider's public key")
    payload = json.loads(signed.json_text)
    if not isinstance(payload, dict):
        raise SignatureError("signed json is not an object")
    return payload
