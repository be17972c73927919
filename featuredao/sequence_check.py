"""Validation of sequence views: their fields, and the views they merge and join.

A sequence view's features are one list per event field (and per joined item feature); every list
defaults to empty. What one view declares is checked with the view; ``merge`` and ``join`` name other
views, so they are checked once every view is known.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from featuredao.errors import ConfigIssue
from featuredao.schema import ViewConfig
from featuredao.types import FeatureType, FeatureValue
from featuredao.validation import json_path

Loc = tuple[int | str, ...]


def list_of(scalar: str) -> FeatureType:
    """The list type of a scalar type name (``int`` -> ``list[int]``)."""
    return FeatureType(f"list[{scalar}]")


def view_shape(vc: ViewConfig, loc: Loc, bodies: Mapping[str, Mapping[str, Any]],
               issues: list[ConfigIssue]) -> tuple[dict[str, FeatureType], dict[str, FeatureValue]] | None:
    """A view's features and defaults by its kind; None (with issues) when the declaration is inconsistent."""
    if vc.kind == "table":
        if vc.sequence is not None:
            issues.append(ConfigIssue(json_path((*loc, "sequence")), "only a view of kind 'sequence' "
                                      "takes a sequence section", "{...}"))
            return None
        if not vc.features:
            issues.append(ConfigIssue(json_path((*loc, "features")), "a table view needs at least one "
                                      "feature", "{}"))
            return None
        return dict(vc.features), {}
    seq = vc.sequence
    problems: list[ConfigIssue] = []
    if seq is None:
        issues.append(ConfigIssue(json_path((*loc, "sequence")), "a sequence view needs a sequence "
                                  "section (time_field, fields...)", "null"))
        return None
    if vc.features or vc.defaults:
        name = "features" if vc.features else "defaults"
        problems.append(ConfigIssue(json_path((*loc, name)), "a sequence view's features are its "
                                    "sequence fields (lists, empty by default): leave this out", "{...}"))
    where = (*loc, "sequence")
    fields = seq.fields

    def need(field: str | None, name: str, types: tuple[str, ...]) -> None:
        if field is None:
            return
        path = json_path((*where, name))
        if field not in fields:
            problems.append(ConfigIssue(path, "not one of the sequence's fields", repr(field)))
        elif fields[field] not in types:
            problems.append(ConfigIssue(path, f"must be a field of type {' or '.join(types)}, not "
                                        f"{fields[field]}", repr(field)))

    need(seq.time_field, "time_field", ("int", "float"))
    need(seq.item_field, "item_field", ("int", "str"))
    need(seq.event_field, "event_field", ("str", "int"))
    need(seq.dedupe, "dedupe", ("int", "float", "str"))
    for field in seq.min:
        need(field, f"min.{field}", ("int", "float"))
    if seq.events is not None and seq.event_field is None:
        problems.append(ConfigIssue(json_path((*where, "events")), "filtering events needs an "
                                    "event_field", repr(seq.events)))
    if seq.join is not None and seq.item_field is None:
        problems.append(ConfigIssue(json_path((*where, "join")), "a join needs an item_field", "{...}"))
    features = {name: list_of(kind) for name, kind in fields.items()}
    if seq.join is not None:
        joined = bodies.get(seq.join.view, {}).get("features")
        for j, name in enumerate(seq.join.features):
            path = json_path((*where, "join", "features", j))
            if name in features:
                problems.append(ConfigIssue(path, "a joined feature cannot share a name with a field",
                                            repr(name)))
                continue
            kind = joined.get(name) if isinstance(joined, Mapping) else None
            # Unknown views and features are reported by check_references, with every view known.
            features[name] = list_of(kind) if kind in ("int", "float", "str") else FeatureType.LIST_STR
    issues.extend(problems)
    if problems:
        return None
    return features, {name: [] for name in features}


def check_references(views: Mapping[str, Any], positions: Mapping[str, int]) -> list[ConfigIssue]:
    """Merged views are sequences with the same fields; joined features are scalars of an item view."""
    issues = []
    for view in views.values():
        seq = view.sequence
        if seq is None:
            continue
        where: Loc = ("views", positions[view.name], "sequence")
        for j, name in enumerate(seq.merge):
            path = json_path((*where, "merge", j))
            other = views.get(name)
            if name == view.name:
                issues.append(ConfigIssue(path, "a view cannot merge itself", repr(name)))
            elif other is None:
                issues.append(ConfigIssue(path, "unknown view", repr(name)))
            elif other.sequence is None:
                issues.append(ConfigIssue(path, "merges only sequence views", repr(name)))
            elif other.sequence.fields != seq.fields or other.sequence.time_unit != seq.time_unit:
                issues.append(ConfigIssue(path, "a merged view needs the same fields (and time unit)",
                                          repr(name)))
            elif other.sequence.merge or other.sequence.join:
                issues.append(ConfigIssue(path, "a merged view cannot merge or join views of its own",
                                          repr(name)))
        if seq.join is None:
            continue
        path = json_path((*where, "join", "view"))
        joined = views.get(seq.join.view)
        if joined is None:
            issues.append(ConfigIssue(path, "unknown view", repr(seq.join.view)))
            continue
        if joined.kind != "table" or joined.entity != "item":
            issues.append(ConfigIssue(path, "joins only table views of entity 'item'", repr(joined.name)))
            continue
        for j, name in enumerate(seq.join.features):
            kind = joined.features.get(name)
            if kind not in (FeatureType.INT, FeatureType.FLOAT, FeatureType.STR):
                problem = "not a feature of the joined view" if kind is None else \
                    f"only int, float and str features can be joined, not {kind.value}"
                issues.append(ConfigIssue(json_path((*where, "join", "features", j)), problem, repr(name)))
    return issues
