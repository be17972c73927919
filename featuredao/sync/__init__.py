"""Offline-to-online feature synchronization: full, incremental and change-data-capture jobs."""
