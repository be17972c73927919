"""One module per adapter: how to point the contract suite at that adapter's server.

Each module defines ``VARIANTS`` (a list of ``(variant_id, marker_name)``) and
``make(variant_id, request) -> ContractBackend``. The suite discovers modules here by itself.

A module is named after its adapter's ``type``: tests marked ``needs(flag, ...)`` run only on variants
whose adapter's ``capabilities`` have every flag, less those in the optional ``LACKS`` (variant id: flags
its view options switch off, e.g. a tall layout's ``scan``). The optional ``slow(dao)`` function is the
pseudo-flag ``slow``: it makes reads of the DAO's view take seconds (see ``ContractBackend.slow``).
"""
