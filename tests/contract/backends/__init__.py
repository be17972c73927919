"""One module per adapter: how to point the contract suite at that adapter's server.

Each module defines ``VARIANTS`` (a list of ``(variant_id, marker_name)``) and
``make(variant_id, request) -> ContractBackend``. The suite discovers modules here by itself.
"""
