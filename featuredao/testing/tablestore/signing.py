"""The OTS signature algorithms the local TableStore server needs to verify requests and sign responses:
canonical ``x-ots-*`` headers, HMAC digests in base64 and the derived v4 signing key."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Sequence
from typing import Any


def _hmac_b64(key: bytes, message: str, digest: Any) -> str:
    return base64.b64encode(hmac.new(key, message.encode("utf-8"), digest).digest()).decode("ascii")


def _v4_signing_key(secret: str, sign_date: str, region: str) -> bytes:
    key = hmac.new(("aliyun_v4" + secret).encode("utf-8"), sign_date.encode("utf-8"), hashlib.sha256).digest()
    key = hmac.new(key, region.encode("utf-8"), hashlib.sha256).digest()
    key = hmac.new(key, b"ots", hashlib.sha256).digest()
    key = hmac.new(key, b"aliyun_v4_request", hashlib.sha256).digest()
    return base64.b64encode(key)


def _canonical_ots_headers(headers: dict[str, str], exclude: Sequence[str] = ()) -> str:
    items = [f"{k}:{v.strip()}" for k, v in headers.items() if k.startswith("x-ots-") and k not in exclude]
    return "\n".join(sorted(items))
