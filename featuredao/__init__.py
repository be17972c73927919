"""featuredao: batch-first feature serving for recommender systems."""

from featuredao.config import Config, View
from featuredao.config import load as load_config
from featuredao.dao import BaseDao, Capabilities, FeatureDao, Source
from featuredao.errors import (
    BackendAuthError,
    BackendError,
    BackendQueryError,
    BackendTimeout,
    BackendUnavailable,
    CircuitOpen,
    Closed,
    ConfigError,
    FeatureDaoError,
    FetchError,
    Overloaded,
)
from featuredao.factory import Runtime, build
from featuredao.service import FeatureService, FetchResult
from featuredao.types import BatchResult, Degraded, FeatureType, FeatureValue, Key, Reason, Row

__version__ = "0.1.0"

__all__ = [
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
    "Config",
    "ConfigError",
    "Degraded",
    "FeatureDao",
    "FeatureDaoError",
    "FeatureService",
    "FeatureType",
    "FeatureValue",
    "FetchError",
    "FetchResult",
    "Key",
    "Overloaded",
    "Reason",
    "Row",
    "Runtime",
    "Source",
    "View",
    "__version__",
    "build",
    "load_config",
]
