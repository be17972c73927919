"""The local HBase Thrift server itself: :class:`HBaseThriftServer` (socket listener, one daemon thread
per client connection, buffered/framed transports and binary/compact protocols, start and stop)
and the ``main`` entry point of ``python -m featuredao.testing.hbase``."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import socket
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any, cast

from thriftpy2.protocol import TBinaryProtocolFactory, TCompactProtocolFactory
from thriftpy2.thrift import TException, TPayload, TProcessor
from thriftpy2.transport import (
    TBufferedTransportFactory,
    TFramedTransportFactory,
    TSocket,
    TTransportException,
)

from featuredao.testing._lifecycle import StartStop
from featuredao.testing.hbase.handlers import _HBaseHandler
from featuredao.testing.hbase.idl import _io_error, hbase_thrift

logger = logging.getLogger(__name__)

TRANSPORTS = ("buffered", "framed")
PROTOCOLS = ("binary", "compact")


class _GuardedProcessor(TProcessor):
    """A TProcessor that never lets an undeclared exception escape.

    thriftpy2 re-raises exceptions a method does not declare, which ends the
    client's connection.  Every call of the Hbase service declares ``IOError``
    (field ``io``), so anything undeclared is reported as such an ``IOError``.
    """

    def handle_exception(self, e: Exception, result: TPayload) -> bool:
        if super().handle_exception(e, result):
            return True
        fields = {spec[1] for key, spec in result.thrift_spec.items() if key != 0}
        if "io" not in fields:
            return False
        if isinstance(e, TException) and hasattr(e, "message"):
            message = f"{type(e).__name__}: {e.message}"
        else:
            logger.exception("unexpected error in HBase Thrift handler")
            message = f"{type(e).__name__}: {e}"
        result.io = _io_error(message)  # type: ignore[attr-defined]
        return True



class HBaseThriftServer(StartStop):
    """A local HBase Thrift1 server for happybase (see the package docstring).

    ``port=0`` picks a free port when :meth:`start` binds; the bound port is
    then available as :attr:`port` and is reused by a later ``start()``, so
    ``stop()`` + ``start()`` simulates a server restart on the same address.
    Data lives in this object and survives such a restart.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        transport: str = "buffered",
        protocol: str = "binary",
    ) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
        if not 0 <= port <= 65535:
            raise ValueError(f"invalid port {port}")
        self.host = host
        self.port = port
        self.transport = transport
        self.protocol = protocol
        self._handler = _HBaseHandler()
        self._processor = _GuardedProcessor(hbase_thrift.Hbase, self._handler)
        self._trans_factory: Any = (
            TFramedTransportFactory() if transport == "framed" else TBufferedTransportFactory()
        )
        # decode_response=True (the default) only decodes IDL ``string`` fields; ``Text``/``Bytes``
        # are ``binary`` in the IDL and always arrive as bytes.  (The compact protocol also needs
        # it to decode method names.)
        self._proto_factory: Any = (
            cast(Any, TCompactProtocolFactory)()
            if protocol == "compact"
            else cast(Any, TBinaryProtocolFactory)()
        )
        self._state_lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._clients: dict[socket.socket, threading.Thread] = {}
        self._clients_lock = threading.Lock()

    # ------------------------------------------------------------- lifecycle
    @property
    def running(self) -> bool:
        return self._listener is not None

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def connection_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``happybase.Connection``/``ConnectionPool``."""
        return {"host": self.host, "port": self.port, "transport": self.transport, "protocol": self.protocol}

    def start(self) -> HBaseThriftServer:
        """Bind and serve in a background daemon thread; return once accepting."""
        with self._state_lock:
            if self._listener is not None:
                return self
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            listener = socket.socket(family, socket.SOCK_STREAM)
            try:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind((self.host, self.port))
                listener.listen(128)
                listener.settimeout(0.2)
            except OSError:
                listener.close()
                raise
            self.port = listener.getsockname()[1]
            self._handler.server_host = self.host
            self._handler.server_port = self.port
            self._listener = listener
            self._stopping = threading.Event()
            ready = threading.Event()
            self._accept_thread = threading.Thread(
                target=self._accept_loop,
                args=(listener, self._stopping, ready),
                name=f"hbase-thrift-accept-{self.port}",
                daemon=True,
            )
            self._accept_thread.start()
            ready.wait()
            logger.info(
                "local HBase Thrift server listening on %s:%d (%s/%s)",
                self.host,
                self.port,
                self.transport,
                self.protocol,
            )
            return self

    def stop(self) -> None:
        """Stop accepting, drop all client connections and join the threads."""
        with self._state_lock:
            listener, self._listener = self._listener, None
            if listener is None:
                return
            self._stopping.set()
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
            if self._accept_thread is not None:
                self._accept_thread.join(timeout=5)
                self._accept_thread = None
            with self._clients_lock:
                clients = list(self._clients.items())
            for sock, _thread in clients:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            for _sock, thread in clients:
                thread.join(timeout=5)
            logger.info("local HBase Thrift server on %s:%d stopped", self.host, self.port)


    def serve_forever(self) -> None:
        """Start (if needed) and block until Ctrl-C / SIGTERM, then stop."""
        self.start()
        done = threading.Event()
        previous: Any = None
        if threading.current_thread() is threading.main_thread():

            def on_sigterm(signum: int, frame: FrameType | None) -> None:
                done.set()

            previous = signal.signal(signal.SIGTERM, on_sigterm)
        try:
            while not done.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            self.stop()

    # ------------------------------------------------------------ internals
    def _accept_loop(
        self, listener: socket.socket, stopping: threading.Event, ready: threading.Event
    ) -> None:
        ready.set()
        while not stopping.is_set():
            try:
                sock, _addr = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if stopping.is_set():
                    return
                logger.exception("accept failed")
                time.sleep(0.05)
                continue
            sock.settimeout(None)  # no idle timeout: pooled connections stay open
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            thread = threading.Thread(
                target=self._serve_client,
                args=(sock, stopping),
                name=f"hbase-thrift-conn-{self.port}",
                daemon=True,
            )
            with self._clients_lock:
                self._clients[sock] = thread
            thread.start()

    def _serve_client(self, sock: socket.socket, stopping: threading.Event) -> None:
        trans = self._trans_factory.get_transport(cast(Any, TSocket)(sock=sock))
        prot = self._proto_factory.get_protocol(trans)
        try:
            while not stopping.is_set():
                self._processor.process(prot, prot)
        except (TTransportException, OSError, EOFError):
            pass  # client went away (or the server is stopping)
        except Exception:
            if not stopping.is_set():
                logger.warning("closing HBase Thrift connection after a protocol error", exc_info=True)
        finally:
            with contextlib.suppress(Exception):
                trans.close()
            with self._clients_lock:
                self._clients.pop(sock, None)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m featuredao.testing.hbase",
        description="Local in-memory HBase Thrift1 server for development and tests (not a real HBase).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=9090, help="port to bind, 0 = any free port (default: 9090)"
    )
    parser.add_argument("--transport", choices=TRANSPORTS, default="buffered")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="binary")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
    )
    server = HBaseThriftServer(args.host, args.port, transport=args.transport, protocol=args.protocol)
    server.start()
    print(
        f"local HBase Thrift server on {server.host}:{server.port} "
        f"(transport={server.transport}, protocol={server.protocol}); Ctrl-C to stop",
        flush=True,
    )
    server.serve_forever()
    return 0
