"""Request stages: views keyed by features that other views produce run after them, in dependency order.

A view with ``key_from`` takes its key, per row of its entity, from the request's own keys
(``<entity>.<key column>``) or from output features read in an earlier stage (``item.category_id``).
A leaf: it sees views through a small protocol, so config validation and the service share it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from featuredao.errors import ConfigIssue
from featuredao.validation import json_path


class StagedView(Protocol):
    """What planning needs of a view."""

    @property
    def name(self) -> str: ...
    @property
    def entity(self) -> str: ...
    @property
    def key(self) -> str: ...
    @property
    def prefix(self) -> str: ...
    @property
    def features(self) -> Mapping[str, Any]: ...
    @property
    def key_from(self) -> tuple[str, ...]: ...


def reference(ref: str) -> tuple[str, str]:
    """``"item.category_id"`` as ("item", "category_id")."""
    entity, _, name = ref.partition(".")
    return entity, name


def producers(views: Mapping[str, StagedView]) -> dict[tuple[str, str], str]:
    """(entity, output name) -> the view that produces it."""
    out: dict[tuple[str, str], str] = {}
    for view in views.values():
        for feature in view.features:
            out.setdefault((view.entity, view.prefix + feature), view.name)
    return out


def request_keys(views: Mapping[str, StagedView]) -> dict[str, set[str]]:
    """Per entity, the key columns that name the request's own key of that entity (``user.user_id``)."""
    out: dict[str, set[str]] = {}
    for view in views.values():
        if not view.key_from:
            out.setdefault(view.entity, set()).add(view.key)
    out.setdefault("item", set()).add("item_id")
    out.setdefault("user", set()).add("user_id")
    return out


def dependencies(view: StagedView, views: Mapping[str, StagedView]) -> set[str]:
    """The views whose outputs ``view``'s key is made of."""
    made_by = producers(views)
    own = request_keys(views)
    deps = set()
    for ref in view.key_from:
        entity, name = reference(ref)
        if name not in own.get(entity, set()) and (entity, name) in made_by:
            deps.add(made_by[(entity, name)])
    return deps


def plan(views: Mapping[str, StagedView]) -> list[list[str]]:
    """The views in stages: each stage only needs the outputs of earlier ones (names in config order)."""
    pending = dict(views)
    done: set[str] = set()
    stages: list[list[str]] = []
    while pending:
        ready = [n for n, v in pending.items() if dependencies(v, views) <= done]
        if not ready:  # a cycle: config validation reports it, so this is never reached from a Config
            raise ValueError(f"views depend on each other: {', '.join(sorted(pending))}")
        stages.append(ready)
        done.update(ready)
        for name in ready:
            del pending[name]
    return stages


def check(views: Mapping[str, StagedView], positions: Mapping[str, int],
          entities: Sequence[str]) -> list[ConfigIssue]:
    """Every ``key_from`` names a request key or a feature some view produces; no view depends on itself."""
    issues: list[ConfigIssue] = []
    made_by = producers(views)
    own = request_keys(views)
    for view in views.values():
        i = positions[view.name]
        for j, ref in enumerate(view.key_from):
            path = json_path(("views", i, "key_from", j) if len(view.key_from) > 1
                             else ("views", i, "key_from"))
            entity, name = reference(ref)
            if entity not in entities or not name:
                issues.append(ConfigIssue(path, "expected '<entity>.<feature>' with a known entity "
                                                f"({', '.join(entities)})", repr(ref)))
            elif name not in own.get(entity, set()) and (entity, name) not in made_by:
                issues.append(ConfigIssue(path, f"no view of entity {entity!r} produces {name!r} "
                                                "(nor is it that entity's key)", repr(ref)))
            elif made_by.get((entity, name)) == view.name:
                issues.append(ConfigIssue(path, "a view cannot be keyed by its own feature", repr(ref)))
    if not issues:
        loop = cycle(views)
        if loop:
            first = min(loop, key=positions.__getitem__)  # reported once, at the earliest view of it
            at = loop.index(first)
            named = [*loop[at:], *loop[:at], first]
            issues.append(ConfigIssue(json_path(("views", positions[first], "key_from")),
                                      f"key_from forms a cycle: {' -> '.join(named)} "
                                      "(each view is keyed by a feature of the next)"))
    return issues


def cycle(views: Mapping[str, StagedView]) -> list[str]:
    """One cycle of views keyed by each other's features, in dependency order ([] when there is none)."""
    deps = {name: sorted(dependencies(view, views)) for name, view in views.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done (no cycle through it)
    path: list[str] = []

    def visit(name: str) -> list[str]:
        state[name] = 1
        path.append(name)
        for dep in deps[name]:
            if state.get(dep) == 1:
                return path[path.index(dep):]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        state[name] = 2
        path.pop()
        return []

    for name in views:
        if name not in state:
            found = visit(name)
            if found:
                return found
    return []
