"""Local TableStore-compatible server for development and tests.

Alibaba Cloud TableStore (OTS) is a managed service with no installable server.  This package
provides an in-memory stand-in that the *unmodified* ``tablestore`` SDK (``tablestore.OTSClient``)
talks to over a real HTTP/1.1 socket, so adapters can be exercised end to end: request signing,
protobuf bodies, PlainBuffer rows, error codes and retry behaviour all go through the SDK's own
code paths.

What it implements
------------------
* Wire protocol: ``POST /<ApiName>`` with the SDK's ``table_store_pb2`` (proto2) bodies; rows in
  PlainBuffer with per-cell and per-row CRC-8 (own codec in :mod:`featuredao.testing.tablestore.plainbuffer`).
* Request authentication: ``x-ots-contentmd5``, ``x-ots-date`` skew (15 minutes), access key id,
  instance name, and both signature schemes (v2 HMAC-SHA1 ``x-ots-signature`` and v4
  HMAC-SHA256 ``x-ots-signaturev4`` with the derived key).  Failures are 403 ``OTSAuthFailed``.
* Response signing: ``x-ots-contentmd5``/``x-ots-requestid``/``x-ots-date``/``x-ots-contenttype``
  and ``Authorization: OTS <ak>:<sig>`` exactly as the SDK verifies them.
* APIs: CreateTable, DeleteTable, ListTable, DescribeTable, UpdateTable, PutRow, UpdateRow (put,
  delete one version, delete all versions, increment), DeleteRow, GetRow (columns_to_get,
  max_versions, time_range, column filter), BatchGetRow, BatchWriteRow (per-row results),
  GetRange (FORWARD/BACKWARD, INF_MIN/INF_MAX, limit, column filter, next_start_primary_key; as the
  service, a response also ends once 5,000 rows or about 4 MB were scanned, rows the filter dropped
  included, so it may carry fewer rows than the limit, or none, and a next start key).
* Row existence conditions (IGNORE/EXPECT_EXIST/EXPECT_NOT_EXIST) and column conditions
  (single/composite, EXIST/NOT_EXIST, regex value transfer rules) for writes and read filters.
* Multi-version cells with millisecond timestamps, per-table ``max_versions``, TTL (read side),
  ``max_time_deviation`` for explicit timestamps, multi-column primary keys of INTEGER, STRING,
  BINARY (and BOOLEAN) kept in primary-key order, AUTO_INCREMENT primary-key columns.
* Service-shaped errors: an ``Error`` protobuf with code/message and the matching HTTP status
  (``OTSObjectNotExist`` 404, ``OTSObjectAlreadyExist`` 409, ``OTSConditionCheckFail`` 403,
  ``OTSAuthFailed`` 403, ``OTSParameterInvalid`` 400, ...).  As documented for the service, a
  missing table or an invalid/duplicated primary key fails a whole BatchGetRow/BatchWriteRow
  request; ``missing_table_in_batch="row"`` reports missing tables per row instead.
* Fault injection for tests: :meth:`TableStoreServer.inject_failure` (request-level errors such
  as 5xx) and :meth:`TableStoreServer.inject_row_error` (per-row errors inside batch responses).

What it is not
--------------
It is **not a replacement for TableStore** and must not be used to store real data: everything
lives in process memory and is lost on stop; there are no partitions, capacity-unit accounting
or throttling, no search/secondary indexes, streams, transactions, SQL or timeseries APIs, no
TLS, no STS token validation, and size/count limits are only partly enforced.  Behaviour was
modelled on the public documentation and the SDK's expectations, not on the service's code.

Run standalone::

    python -m featuredao.testing.tablestore --port 8080 --instance featuredao \\
        --access-key-id my-ak   # secret from --access-key-secret or $FEATUREDAO_TABLESTORE_ACCESS_KEY_SECRET
"""

from featuredao.testing.tablestore.errors import OTSError
from featuredao.testing.tablestore.server import (
    DEFAULT_ACCESS_KEY_ID,
    DEFAULT_ACCESS_KEY_SECRET,
    TableStoreServer,
    main,
)

__all__ = ["DEFAULT_ACCESS_KEY_ID", "DEFAULT_ACCESS_KEY_SECRET", "OTSError", "TableStoreServer", "main"]
