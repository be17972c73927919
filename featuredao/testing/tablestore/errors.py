"""Service-shaped errors of the local TableStore server: :class:`OTSError` (HTTP status, OTS error code,
message) and the errors the store and the APIs raise most often."""

from __future__ import annotations

_STATUS_FOR_CODE = {
    "OTSAuthFailed": 403,
    "OTSConditionCheckFail": 403,
    "OTSNotEnoughCapacityUnit": 403,
    "OTSQuotaExhausted": 403,
    "OTSParameterInvalid": 400,
    "OTSUnsupportOperation": 400,
    "OTSObjectNotExist": 404,
    "OTSObjectAlreadyExist": 409,
    "OTSRowOperationConflict": 409,
    "OTSInternalServerError": 500,
    "OTSServerBusy": 503,
    "OTSServerUnavailable": 503,
    "OTSPartitionUnavailable": 503,
    "OTSTimeout": 503,
}


class OTSError(Exception):
    """A service-shaped error: HTTP status, OTS error code and message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message


def _param_invalid(message: str) -> OTSError:
    return OTSError(400, "OTSParameterInvalid", message)


def _table_not_exist() -> OTSError:
    return OTSError(404, "OTSObjectNotExist", "Requested table does not exist.")


def _condition_failed() -> OTSError:
    return OTSError(403, "OTSConditionCheckFail", "Condition check failed.")
