"""Shared helpers of configuration validation: base model, identifiers, JSON paths, ``${ENV}``
references, secret-safe values.

A leaf: the config module and every section validator (``sync``) use it, and it imports nothing of
featuredao but its errors.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError

from featuredao.errors import ConfigIssue

IDENTIFIER = r"^[A-Za-z_][A-Za-z0-9_]{0,62}$"
QUALIFIED = r"^[A-Za-z_][A-Za-z0-9_]{0,62}(\.[A-Za-z_][A-Za-z0-9_]{0,62})?$"

Identifier = Annotated[str, StringConstraints(pattern=IDENTIFIER)]
"""A column, field or key name: letters, digits and underscores, not starting with a digit."""
QualifiedName = Annotated[str, StringConstraints(pattern=QUALIFIED)]
"""A table name, optionally qualified by one schema/database name."""


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are errors, instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Values at paths whose last segment matches this are never echoed back.
_SECRET_NAME = re.compile(r"(pass|secret|token|credential|auth|private)", re.IGNORECASE)


def json_path(loc: tuple[int | str, ...] | list[int | str]) -> str:
    """Render a location as a JSON path: ``$.views[0].features.age``."""
    out = "$"
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def resolve_env(node: Any, loc: tuple[int | str, ...], issues: list[ConfigIssue],
                 secrets: dict[str, str]) -> Any:
    """Replace ``${VAR}`` references; remember which paths hold resolved values (never shown)."""
    if isinstance(node, dict):
        return {k: resolve_env(v, (*loc, k), issues, secrets) for k, v in node.items()}
    if isinstance(node, list):
        return [resolve_env(v, (*loc, i), issues, secrets) for i, v in enumerate(node)]
    if isinstance(node, str) and "${" in node:
        def sub(m: re.Match[str]) -> str:
            var = m.group(1)
            if var not in os.environ:
                issues.append(ConfigIssue(json_path(loc), f"environment variable {var} is not set",
                                          repr(node)))
                return ""
            return os.environ[var]

        resolved = _ENV_REF.sub(sub, node)
        secrets[json_path(loc)] = node
        return resolved
    return node


def shown(path: str, value: Any, secrets: Mapping[str, str] | None = None) -> str | None:
    """How a value may appear in an error: references instead of secrets, scalars only."""
    if secrets and path in secrets:
        return repr(secrets[path])
    if _SECRET_NAME.search(path.rsplit(".", 1)[-1]):
        return "'***'"
    if isinstance(value, str | int | float | bool) or value is None:
        text = repr(value)
        return text if len(text) <= 80 else text[:77] + "..."
    return None


def pydantic_issues(exc: ValidationError, prefix: tuple[int | str, ...],
                    secrets: Mapping[str, str] | None = None) -> list[ConfigIssue]:
    """Pydantic's errors as issues at JSON paths under ``prefix``, values shown only where safe."""
    issues = []
    for err in exc.errors(include_url=False):
        loc = (*prefix, *err["loc"])
        path = json_path(loc)
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        elif err["type"] == "enum":
            message = "unknown type; " + message.lower()
        elif err["type"] == "string_pattern_mismatch":
            message = ("invalid name: letters, digits and underscores only, not starting with a digit, "
                       "at most 63 characters")
        # A missing key's "input" is the enclosing object: never echo it.
        value = None if err["type"] == "missing" else shown(path, err.get("input"), secrets)
        issues.append(ConfigIssue(path, message, value))
    return issues
