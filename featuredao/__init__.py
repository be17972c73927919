"""featuredao: batch-first feature serving for recommender systems."""

from featuredao.config import Config, View
from featuredao.config import load as load_config
from featuredao.dao import BaseDao, Capabilities, FeatureDao, Source
from featuredao.deadline import Deadline
from featuredao.errors import (
    ArgumentTypeError,
    BackendAuthError,
    BackendError,
    BackendQueryError,
    BackendTimeout,
    BackendUnavailable,
    CircuitOpen,
    Closed,
    CoercionError,
    ConfigError,
    FeatureDaoError,
    FetchError,
    InvalidKeyError,
    Overloaded,
    UnknownAdapter,
    UnknownView,
    Unsupported,
    UsageError,
)
from featuredao.factory import Runtime, build
from featuredao.service import FeatureService, FetchResult
from featuredao.types import BatchResult, Degraded, FeatureType, FeatureValue, Key, Reason, Row, coercion_plan

__version__ = "0.1.0"

__all__ = [
    "ArgumentTypeError",
    "BackendAuthError",
    "BackendError",
    "BackendQueryError",
    "BackendTimeout",
    "BackendUnavailable",
    "BaseDao",
    "BatchResult",
    "Capabilities",
    "CircuitOpen",
    "Closed",
    "CoercionError",
    "Config",
    "ConfigError",
    "Deadline",
    "Degraded",
    "FeatureDao",
    "FeatureDaoError",
    "FeatureService",
    "FeatureType",
    "FeatureValue",
    "FetchError",
    "FetchResult",
    "InvalidKeyError",
    "Key",
    "Overloaded",
    "Reason",
    "Row",
    "Runtime",
    "Source",
    "UnknownAdapter",
    "UnknownView",
    "Unsupported",
    "UsageError",
    "View",
    "__version__",
    "build",
    "coercion_plan",
    "load_config",
]
