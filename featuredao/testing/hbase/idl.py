"""The ``Hbase`` Thrift1 IDL bundled with happybase, loaded once so that happybase and the local server
share the very same generated classes, plus the IDL-declared exceptions (``IOError``,
``IllegalArgument``, ``AlreadyExists``) the server raises."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import thriftpy2


def _find_idl() -> Path:
    """Locate the ``Hbase.thrift`` IDL shipped inside the happybase package."""
    spec = importlib.util.find_spec("happybase")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / "Hbase.thrift"
        if candidate.is_file():
            return candidate
    raise RuntimeError(
        "Hbase.thrift not found: the local HBase server needs happybase installed "
        "(pip install 'featuredao[hbase]')"
    )


#: The Thrift module generated from happybase's IDL.  It is loaded under the
#: module name happybase itself uses (``Hbase_thrift``); thriftpy2 caches
#: modules by that name, so happybase and this server share the same classes.
hbase_thrift: ModuleType = thriftpy2.load(str(_find_idl()), module_name="Hbase_thrift")


def _text(value: bytes | str) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="backslashreplace")
    return value


def _io_error(message: str) -> Exception:
    exc: Exception = hbase_thrift.IOError(message=message)
    return exc


def _illegal_argument(message: str) -> Exception:
    exc: Exception = hbase_thrift.IllegalArgument(message=message)
    return exc


def _already_exists(message: str) -> Exception:
    exc: Exception = hbase_thrift.AlreadyExists(message=message)
    return exc
