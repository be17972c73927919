"""A local, in-memory HBase Thrift (Thrift1) server for development and tests.

What it is
----------
This package serves the ``Hbase`` Thrift1 service (the API spoken by the HBase
"thrift" server, ``hbase thrift start``) from a plain Python process, so that
the **unmodified** `happybase` client can talk to it over a real TCP socket.
It loads the ``Hbase.thrift`` IDL bundled with happybase through
``thriftpy2.load`` (under the same module name, ``Hbase_thrift``, that
happybase uses, so both share the very same generated classes) and serves it
with thriftpy2's processor, transports and protocols:

* buffered transport + binary protocol by default (happybase's defaults, and
  the default ``-threadpool`` mode of the HBase Thrift server);
* ``transport="framed"`` and ``protocol="compact"`` as options (happybase's
  ``Connection(transport="framed", protocol="compact")``).

Every client connection is served on its own daemon thread; there is no idle
timeout, so pooled happybase connections stay usable.  Calls a client pipelines
(sends before reading earlier answers) are answered one after the other, in
order, as HBase's thread-pool server does.  All data lives in
memory, guarded by one lock.

**This is a local development/test server, not a replacement for HBase.**  It
has no persistence, no WAL, no regions/splits, no replication, no security.

What it implements
------------------
Tables with column families (``ColumnDescriptor`` incl. ``maxVersions`` and a
best-effort ``timeToLive``), cells with millisecond timestamps, several
versions per cell kept up to ``maxVersions`` (newest first), and these Thrift
calls (all calls in the bundled IDL have a handler):

* admin: ``getTableNames``, ``createTable``, ``deleteTable``, ``enableTable``,
  ``disableTable``, ``isTableEnabled``, ``getColumnDescriptors``,
  ``getTableRegions`` (one region per table), ``getRegionInfo``,
  ``compact`` / ``majorCompact`` (no-ops);
* reads: ``get``, ``getVer``, ``getVerTs``, ``getRow``, ``getRowTs``,
  ``getRowWithColumns``, ``getRowWithColumnsTs``, ``getRows``, ``getRowsTs``,
  ``getRowsWithColumns``, ``getRowsWithColumnsTs``, ``getRowOrBefore``;
* writes: ``mutateRow``, ``mutateRowTs``, ``mutateRows``, ``mutateRowsTs``,
  ``deleteAll``, ``deleteAllTs``, ``deleteAllRow``, ``deleteAllRowTs``,
  ``atomicIncrement``, ``increment``, ``incrementRows``, ``append``,
  ``checkAndPut``;
* scanners: ``scannerOpenWithScan`` (``TScan`` startRow, stopRow, timestamp,
  columns, caching, filterString, batchSize, sortColumns, reversed),
  ``scannerOpen``, ``scannerOpenWithStop``, ``scannerOpenWithPrefix``,
  ``scannerOpenTs``, ``scannerOpenWithStopTs``, ``scannerGet``,
  ``scannerGetList``, ``scannerClose``.

Semantics follow the HBase Thrift1 server (``ThriftHBaseServiceHandler``):

* A write without timestamp gets the server's current time in milliseconds;
  all cells of one call share that time.  Writing the same cell twice with the
  same timestamp overwrites the value (as in HBase).
* Timestamps passed to reads (``getRowTs``/``getVerTs``/``TScan.timestamp``...)
  are an **exclusive** upper bound: HBase uses ``setTimeRange(0, ts)``.
* ``getRows*`` omit rows that do not exist and keep the requested order.
* Column names: ``b"cf"`` means the whole family, ``b"cf:q"`` one column and
  ``b"cf:"`` the column with the empty qualifier (modern HBase's
  ``CellUtil.parseColumn``).  A put to ``b"cf"`` writes the empty qualifier.
* A ``mutateRows*`` call applies all puts first and then all deletes (as the
  HBase handler does), so a delete wins over a put of the same cell in the
  same batch.  ``mutateRow*`` applies deletes first, then puts.
* Deletes without timestamp remove all versions up to "now"; with a timestamp
  ``T`` they remove versions ``<= T``.
* Counters are 8-byte big-endian signed integers; incrementing a cell of a
  different width is an ``IOError`` (HBase: "Field is not a long").
* Unknown tables and families, disabled tables, etc. raise the IDL-declared
  ``IOError`` with HBase-like messages (e.g. ``TableNotFoundException: t``);
  a duplicate ``createTable`` raises ``AlreadyExists``; bad arguments of
  calls that declare it raise ``IllegalArgument``.  Any other failure inside a
  handler is converted to the call's declared ``IOError`` so the client's
  connection is never dropped.

Filter strings (``TScan.filterString``) support a subset of the HBase filter
language: ``PrefixFilter``, ``RowFilter``, ``FamilyFilter``,
``QualifierFilter``, ``ValueFilter``, ``ColumnPrefixFilter``,
``MultipleColumnPrefixFilter``, ``KeyOnlyFilter``, ``FirstKeyOnlyFilter``,
``ColumnCountGetFilter``, ``PageFilter``, ``InclusiveStopFilter`` and
``SingleColumnValueFilter``, with comparators ``binary:``, ``binaryprefix:``,
``substring:`` and ``regexstring:``, combined with ``AND``.  Anything else
(``OR``, ``SKIP``, ``WHILE``, parentheses, other filters) is rejected when the
scanner is opened.  ``scannerOpenWithScan`` only declares ``IOError`` in the
IDL, so the rejection is an ``IOError`` whose message starts with
``IllegalArgumentException:`` (an ``IllegalArgument`` would be undeclared
there and would close the client's connection).

Known differences from HBase
----------------------------
* No delete markers (tombstones): a delete removes versions immediately, so a
  later put with an older timestamp becomes visible (HBase would mask it
  until a major compaction).
* ``timeToLive`` hides expired cells on read; compression,
  bloom filters, block cache and in-memory settings are stored and echoed only.
  ``getColumnDescriptors`` returns exactly what the client sent (HBase
  normalises some values, e.g. ``timeToLive`` ``-1`` is reported as
  ``2147483647``).
* One region per table; ``caching`` is ignored; scanners are a snapshot of
  the row keys at open time, found by bisection in the table's sorted keys
  (values are read at ``scannerGetList`` time), and are never expired by the
  server.
* ``getRowsWithColumnsTs`` applies the timestamp even without columns (HBase
  ignores it then; happybase works around that bug).
* Increments and appends write their new cell at ``max(now, latest version's
  timestamp)``, replacing that version when it is in the same millisecond.
* Attributes maps, ``writeToWAL`` and durability settings are ignored.
* Errors carry short messages, not Java stack traces.

Usage::

    from featuredao.testing.hbase import HBaseThriftServer
    import happybase

    with HBaseThriftServer() as server:          # port 0: a free port
        conn = happybase.Connection("127.0.0.1", server.port)
        conn.create_table("t", {"cf": {"max_versions": 3}})

or from a shell (runs in the foreground until Ctrl-C)::

    python -m featuredao.testing.hbase --port 9090 [--host H]
        [--transport framed] [--protocol compact]
"""

from featuredao.testing.hbase.idl import hbase_thrift
from featuredao.testing.hbase.model import LATEST_TIMESTAMP
from featuredao.testing.hbase.server import PROTOCOLS, TRANSPORTS, HBaseThriftServer, main

__all__ = [
    "LATEST_TIMESTAMP",
    "PROTOCOLS",
    "TRANSPORTS",
    "HBaseThriftServer",
    "hbase_thrift",
    "main",
]
