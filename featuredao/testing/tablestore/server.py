"""The local TableStore server itself: :class:`TableStoreServer` (HTTP/1.1 listener on a daemon thread,
request authentication and response signing, dispatch to the APIs, fault injection and call
counters for tests) and the ``main`` entry point of ``python -m featuredao.testing.tablestore``."""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as _dt
import hashlib
import hmac
import os
import signal
import socket
import threading
import uuid
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

import tablestore.protobuf.table_store_pb2 as pb

from featuredao.testing._lifecycle import StartStop
from featuredao.testing.tablestore.errors import OTSError
from featuredao.testing.tablestore.handlers import _ApiHandlers
from featuredao.testing.tablestore.model import PK, _InjectedFailure, _InjectedRowError, _pk_values
from featuredao.testing.tablestore.signing import _canonical_ots_headers, _hmac_b64, _v4_signing_key
from featuredao.testing.tablestore.store import _Store

DEFAULT_ACCESS_KEY_ID = "featuredao-local-ak"
DEFAULT_ACCESS_KEY_SECRET = "featuredao-local-secret"
SECRET_ENV_VAR = "FEATUREDAO_TABLESTORE_ACCESS_KEY_SECRET"
ACCESS_KEY_ENV_VAR = "FEATUREDAO_TABLESTORE_ACCESS_KEY_ID"

API_VERSION = "2015-12-31"
MAX_DATE_SKEW_SECONDS = 15 * 60
MAX_BODY_BYTES = 64 * 1024 * 1024


class TableStoreServer(_ApiHandlers, StartStop):
    """In-memory TableStore-compatible HTTP server (see the package docstring).

    ``start()`` serves from a daemon thread; ``endpoint`` is the URL to hand to ``OTSClient``.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        instance_name: str = "featuredao",
        access_key_id: str = DEFAULT_ACCESS_KEY_ID,
        access_key_secret: str = DEFAULT_ACCESS_KEY_SECRET,
        *,
        region: str | None = None,
        enforce_time_deviation: bool = True,
        missing_table_in_batch: Literal["request", "row"] = "request",
    ) -> None:
        if not access_key_id or not access_key_secret:
            raise ValueError("access_key_id and access_key_secret must be non-empty")
        self.host = host
        self._requested_port = port
        self.instance_name = instance_name
        self.access_key_id = access_key_id
        self._secret = access_key_secret
        self.region = region
        self.missing_table_in_batch = missing_table_in_batch
        self._lock = threading.RLock()
        self._store = _Store(enforce_time_deviation)
        self._failures: list[_InjectedFailure] = []
        self._row_errors: list[_InjectedRowError] = []
        self._calls: list[str] = []
        self._httpd: ThreadingHTTPServer | None = None
        self._bound_port = 0
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._api_handlers: dict[str, Callable[[bytes], Any]] = {
            "CreateTable": self._create_table,
            "DeleteTable": self._delete_table,
            "ListTable": self._list_table,
            "DescribeTable": self._describe_table,
            "UpdateTable": self._update_table,
            "GetRow": self._get_row,
            "PutRow": self._put_row,
            "UpdateRow": self._update_row,
            "DeleteRow": self._delete_row,
            "BatchGetRow": self._batch_get_row,
            "BatchWriteRow": self._batch_write_row,
            "GetRange": self._get_range,
        }

    def __repr__(self) -> str:  # never show the secret
        return f"TableStoreServer(endpoint={self.endpoint!r}, instance_name={self.instance_name!r})"

    # ----------------------------------------------------------------- lifecycle

    @property
    def port(self) -> int:
        if self._httpd is None:
            return self._bound_port or self._requested_port
        return int(self._httpd.server_address[1])

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._httpd is not None

    def start(self) -> TableStoreServer:
        if self._httpd is not None:
            return self
        httpd = ThreadingHTTPServer((self.host, self._requested_port), _make_handler(self))
        httpd.daemon_threads = True
        self._httpd = httpd
        self._bound_port = int(httpd.server_address[1])
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, name="tablestore-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        with self._lock:
            connections = list(self._connections)
            self._connections.clear()
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    # ----------------------------------------------------------------- test hooks

    def inject_failure(
        self, api: str, status: int, code: str, count: int = 1, message: str | None = None
    ) -> None:
        """Fail the next ``count`` authenticated requests to ``api`` ("*" = any API).

        The response is a properly signed error (``Error`` protobuf, given HTTP status), so the
        SDK raises ``OTSServiceError(status, code, message)`` and applies its retry policy.
        """
        if count < 1:
            raise ValueError("count must be >= 1")
        with self._lock:
            self._failures.append(
                _InjectedFailure(api, status, code, message or f"Injected failure ({code}).", count)
            )

    def inject_row_error(
        self, table: str, pk: Any, code: str, count: int = 1, message: str | None = None
    ) -> None:
        """Fail the row ``pk`` of ``table`` in the next ``count`` BatchGetRow/BatchWriteRow rows.

        ``pk`` may be ``[("name", value), ...]`` (as the SDK takes it), a dict, or bare values in
        primary-key order.  The row comes back with ``is_ok=False`` and the given code/message;
        for BatchWriteRow the row is not applied.  Single-row APIs are unaffected (use
        :meth:`inject_failure` for them).
        """
        if count < 1:
            raise ValueError("count must be >= 1")
        with self._lock:
            self._row_errors.append(
                _InjectedRowError(
                    table, _pk_values(pk), code, message or f"Injected row error ({code}).", count
                )
            )

    def clear_injections(self) -> None:
        with self._lock:
            self._failures.clear()
            self._row_errors.clear()

    def call_count(self, api: str | None = None) -> int:
        """Number of authenticated requests received (for ``api``, or all)."""
        with self._lock:
            return len(self._calls) if api is None else self._calls.count(api)

    @property
    def calls(self) -> list[str]:
        with self._lock:
            return list(self._calls)

    def reset(self) -> None:
        """Drop all tables, injections and call counters."""
        with self._lock:
            self._store.tables.clear()
            self._failures.clear()
            self._row_errors.clear()
            self._calls.clear()

    def _take_failure(self, api: str) -> _InjectedFailure | None:
        for failure in self._failures:
            if failure.api in (api, "*"):
                failure.remaining -= 1
                if failure.remaining <= 0:
                    self._failures.remove(failure)
                return failure
        return None

    def _take_row_error(self, table: str, pk: PK) -> _InjectedRowError | None:
        for err in self._row_errors:
            if err.table == table and err.pk == pk:
                err.remaining -= 1
                if err.remaining <= 0:
                    self._row_errors.remove(err)
                return err
        return None

    # ----------------------------------------------------------------- HTTP plumbing

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def _authenticate(self, api: str, headers: dict[str, str], body: bytes) -> bytes:
        """Verify the request; return the key the response must be signed with."""

        def fail(message: str) -> OTSError:
            return OTSError(403, "OTSAuthFailed", message)

        for name in (
            "x-ots-date",
            "x-ots-apiversion",
            "x-ots-accesskeyid",
            "x-ots-instancename",
            "x-ots-contentmd5",
        ):
            if name not in headers:
                raise fail(f"Missing header: {name}.")
        if headers["x-ots-accesskeyid"] != self.access_key_id:
            raise fail("The AccessKeyID does not exist.")
        if headers["x-ots-instancename"] != self.instance_name:
            raise fail(f"The instance '{headers['x-ots-instancename']}' is not found.")
        md5 = base64.b64encode(hashlib.md5(body).digest()).decode("ascii")
        if headers["x-ots-contentmd5"] != md5:
            raise fail("Mismatch between MD5 value of request body and x-ots-contentmd5 in header.")
        try:
            sent = _dt.datetime.strptime(headers["x-ots-date"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
                tzinfo=_dt.UTC
            )
        except ValueError:
            raise fail("Invalid date format: x-ots-date.") from None
        skew = abs((_dt.datetime.now(_dt.UTC) - sent).total_seconds())
        if skew > MAX_DATE_SKEW_SECONDS:
            raise fail("Mismatch between system time and x-ots-date.")
        signed = f"/{api}\nPOST\n\n"
        if "x-ots-signaturev4" in headers:
            sign_date = headers.get("x-ots-signdate", "")
            region = headers.get("x-ots-signregion", "")
            if not sign_date or not region:
                raise fail("Missing header: x-ots-signdate/x-ots-signregion.")
            if self.region is not None and region != self.region:
                raise fail(f"Invalid sign region: {region}.")
            try:
                date = _dt.datetime.strptime(sign_date, "%Y%m%d").date()
            except ValueError:
                raise fail("Invalid x-ots-signdate.") from None
            if abs((date - _dt.datetime.now(_dt.UTC).date()).days) > 1:
                raise fail("Mismatch between system time and x-ots-signdate.")
            key = _v4_signing_key(self._secret, sign_date, region)
            canonical = (
                signed + _canonical_ots_headers(headers, ("x-ots-signaturev4", "x-ots-signature")) + "\n"
            )
            expected = _hmac_b64(key, canonical + "ots", hashlib.sha256)
            if not hmac.compare_digest(expected, headers["x-ots-signaturev4"]):
                raise fail("Signature mismatch.")
            return key
        if "x-ots-signature" not in headers:
            raise fail("Missing header: x-ots-signature.")
        key = self._secret.encode("utf-8")
        canonical = signed + _canonical_ots_headers(headers, ("x-ots-signature", "x-ots-signaturev4")) + "\n"
        expected = _hmac_b64(key, canonical, hashlib.sha1)
        if not hmac.compare_digest(expected, headers["x-ots-signature"]):
            raise fail("Signature mismatch.")
        return key

    def handle(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        """Process one request; returns (status, headers, body).  Used by the HTTP handler."""
        api = path.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
        signing_key: bytes | None = None
        try:
            signing_key = self._authenticate(api, headers, body)
            if api not in self._api_handlers:
                raise OTSError(400, "OTSUnsupportOperation", f"Unsupported operation: '{api}'.")
            with self._lock:
                self._calls.append(api)
                failure = self._take_failure(api)
            if failure is not None:
                raise OTSError(failure.status, failure.code, failure.message)
            response = self._api_handlers[api](body)
            return self._respond(api, 200, response.SerializeToString(), signing_key)
        except OTSError as err:
            error = pb.Error(code=err.code, message=err.message)
            # Auth failures cannot be signed with the caller's key: the SDK does not expect it.
            key = None if err.code == "OTSAuthFailed" else signing_key
            return self._respond(api, err.status, error.SerializeToString(), key)
        except Exception as exc:  # pragma: no cover - defensive: never kill the handler thread
            error = pb.Error(code="OTSInternalServerError", message=f"Internal error: {exc}")
            return self._respond(api, 500, error.SerializeToString(), signing_key)

    def _respond(
        self, api: str, status: int, body: bytes, signing_key: bytes | None
    ) -> tuple[int, dict[str, str], bytes]:
        headers = {
            "x-ots-contentmd5": base64.b64encode(hashlib.md5(body).digest()).decode("ascii"),
            "x-ots-requestid": str(uuid.uuid4()),
            "x-ots-date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z"),
            "x-ots-contenttype": "protocol buffer",
        }
        if signing_key is not None:
            signature = _hmac_b64(signing_key, _canonical_ots_headers(headers) + "\n/" + api, hashlib.sha1)
            headers["Authorization"] = f"OTS {self.access_key_id}:{signature}"
        headers["Content-Type"] = "application/x-protobuf"
        return status, headers, body


def _make_handler(server: TableStoreServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "featuredao-tablestore-local"
        # Headers and body go out in two writes; with Nagle on, the body waits for the client's delayed ACK
        # (~40 ms per request).
        disable_nagle_algorithm = True
        timeout = 120  # idle keep-alive connections are closed after this many seconds

        def setup(self) -> None:
            super().setup()
            server._track(self.connection, True)

        def finish(self) -> None:
            server._track(self.connection, False)
            with contextlib.suppress(OSError):
                super().finish()

        def log_message(self, format: str, *args: Any) -> None:
            return

        def _send(self, status: int, headers: dict[str, str], body: bytes) -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if length < 0 or length > MAX_BODY_BYTES:
                body = pb.Error(
                    code="OTSParameterInvalid", message="Invalid Content-Length."
                ).SerializeToString()
                self.close_connection = True
                self._send(400, {"Content-Type": "application/x-protobuf"}, body)
                return
            payload = self.rfile.read(length) if length else b""
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, out_headers, body = server.handle(self.path, headers, payload)
            self._send(status, out_headers, body)

        def _not_allowed(self) -> None:
            body = pb.Error(code="OTSMethodNotAllowed", message="Only POST is allowed.").SerializeToString()
            self._send(405, {"Content-Type": "application/x-protobuf", "Allow": "POST"}, body)

        do_GET = do_PUT = do_DELETE = do_HEAD = do_PATCH = _not_allowed

    return Handler


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m featuredao.testing.tablestore",
        description="Local, in-memory TableStore-compatible server for development and tests "
        "(not a replacement for TableStore).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed on start)")
    parser.add_argument("--instance", default="featuredao", help="instance name clients must send")
    parser.add_argument("--access-key-id", default=os.environ.get(ACCESS_KEY_ENV_VAR, DEFAULT_ACCESS_KEY_ID))
    parser.add_argument(
        "--access-key-secret",
        default=None,
        help=f"secret used to verify and sign requests (default: ${SECRET_ENV_VAR}, else the dev default)",
    )
    parser.add_argument("--region", default=None, help="if set, v4-signed requests must use this region")
    args = parser.parse_args(argv)
    secret = args.access_key_secret or os.environ.get(SECRET_ENV_VAR) or DEFAULT_ACCESS_KEY_SECRET
    server = TableStoreServer(
        args.host, args.port, args.instance, args.access_key_id, secret, region=args.region
    )
    stop = threading.Event()

    def _on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    server.start()
    print(
        f"TableStore local server listening on {server.endpoint} "
        f"(instance={server.instance_name}, access_key_id={server.access_key_id})",
        flush=True,
    )
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
    return 0
