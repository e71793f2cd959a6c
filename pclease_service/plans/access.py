"""Which paths a plan may read and write, and whether its output fits the query.

A profile's ``data_roots`` are absolute directories and object-store URI prefixes; a plan
may touch nothing else. Local paths are resolved (symlinks included) before they are
compared, a directory or glob that is read is walked for symlinks leading out, and the
service's own files (``denied_paths``) are refused even inside a root.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from dataclasses import dataclass

from pclease_service.errors import PlanRefusal, PlanRefused
from pclease_service.plans.guard import Access, PlanInfo
from pclease_service.plans.targets import IN_MEMORY_SINK, QueryTarget

# How Polars 2.0 tells object-store URIs from local paths; anything else is a local path.
CLOUD_SCHEMES = frozenset(
    {"s3", "s3a", "gs", "gcs", "az", "azure", "abfs", "abfss", "adl", "http", "https", "hf"}
)
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_GLOB_CHARS = re.compile(r"[*?\[]")
#: At most this many entries are checked for symlinks under a scanned directory or glob.
MAX_WALK_ENTRIES = 100_000


def _refused(message: str) -> PlanRefused:
    return PlanRefused(PlanRefusal.REFUSED, message)


@dataclass(frozen=True)
class Roots:
    local: tuple[str, ...]
    uris: tuple[str, ...]
    denied: tuple[str, ...]
    shown: str

    @classmethod
    def of(cls, data_roots: tuple[str, ...], denied_paths: tuple[str, ...]) -> Roots:
        local = tuple(_real(r) for r in data_roots if r.startswith("/"))
        uris = tuple(r for r in data_roots if _cloud_scheme(r) is not None)
        denied = tuple(_real(d) for d in denied_paths if d.startswith("/"))
        return cls(local, uris, denied, ", ".join(data_roots))

    def outside(self, verb: str, shown: str) -> PlanRefused:
        if not self.shown:
            return _refused(
                f"the plan {verb} {shown}, but the profile has no data roots (data_roots), so "
                "its plans may not read or write files; use a profile that has them"
            )
        return _refused(
            f"the plan {verb} {shown}, outside the profile's data roots ({self.shown}); "
            "read and write only under those roots"
        )


def _real(path: str) -> str:
    # POSIX keeps a leading "//" through realpath; Linux treats it as "/".
    return "/" + os.path.realpath(path).lstrip("/")


def _cloud_scheme(path: str) -> str | None:
    match = _SCHEME.match(path)
    if match and path[match.end() : match.end() + 2] == "//":
        scheme = match.group(1)
        if scheme in CLOUD_SCHEMES:
            return scheme
    return None


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def check_access(
    info: PlanInfo,
    target: QueryTarget,
    data_roots: tuple[str, ...],
    denied_paths: tuple[str, ...],
) -> None:
    """Refuse the plan unless every path it touches is allowed and its output matches the
    query's target."""
    _check_target(info, target)
    roots = Roots.of(data_roots, denied_paths)
    for access in info.accesses:
        if access.path == IN_MEMORY_SINK and access.is_output and target is QueryTarget.COLLECT:
            continue
        _check_path(access, roots)


def lineage(info: PlanInfo) -> tuple[list[str], list[str]]:
    """What the plan reads and writes, for lineage: every scanned path or pattern and every
    file sink, once each, sorted, as the client named them. A URI loses its query
    string and fragment (a presigned URL's signature is a credential); the in-memory sink
    of a collect is no output."""
    inputs: dict[str, None] = {}
    outputs: dict[str, None] = {}
    for access in info.accesses:
        if access.path == IN_MEMORY_SINK:
            continue
        path = _without_query(access.path)
        (inputs if access.mode == "read" else outputs)[path] = None
    return sorted(inputs), sorted(outputs)


def _without_query(path: str) -> str:
    if _cloud_scheme(path) is None:
        return path
    return path.split("#", 1)[0].split("?", 1)[0]


def _check_target(info: PlanInfo, target: QueryTarget) -> None:
    output = info.output
    if target is QueryTarget.COLLECT:
        if output is not None and output.path != IN_MEMORY_SINK:
            raise _refused(
                f"a collect query's plan must end in sink_*({IN_MEMORY_SINK!r}) or no sink, "
                f"but this one sinks to {output.path!r}; submit it as a "
                f"{output.format.value} sink instead"
            )
        return
    if output is None:
        raise _refused(
            f"a {target.value} query's plan must end in sink_{target.value}(path, lazy=True); "
            "this one has no file sink (submit it as collect instead)"
        )
    if output.path == IN_MEMORY_SINK:
        raise _refused(
            f"the plan sinks to {IN_MEMORY_SINK!r}, which only a collect query may do; "
            "sink to a path inside a data root"
        )
    if output.format is not target:
        raise _refused(
            f"the query's target is {target.value} but the plan sinks "
            f"{output.format.value}; make them agree"
        )


def _check_path(access: Access, roots: Roots) -> None:
    verb = "reads" if access.mode == "read" else "writes"
    path = access.path
    if path == IN_MEMORY_SINK:
        raise _refused(
            f"the plan {verb} {IN_MEMORY_SINK!r} somewhere other than a collect query's final sink"
        )
    if _cloud_scheme(path) is not None:
        _check_uri(path, verb, roots)
        return
    if _SCHEME.match(path) and path.lower().startswith("file:"):
        raise _refused(
            f"the plan {verb} {path!r}; use a plain absolute path instead of a file: URI"
        )
    if not path.startswith("/"):
        raise _refused(
            f"the plan {verb} {path!r}, a relative path; use an absolute path inside one of "
            f"the profile's data roots ({roots.shown or 'none'})"
        )
    _check_local(path, verb, access, roots)


def _check_uri(uri: str, verb: str, roots: Roots) -> None:
    rest = uri.split("://", 1)[1]
    segments = urllib.parse.unquote(rest).split("/")
    if "\\" in uri or any(s in (".", "..") for s in segments[1:]):
        raise _refused(f"the plan {verb} {uri!r}; URIs may not contain '.', '..' or '\\'")
    for root in roots.uris:
        if uri == root or uri.startswith(root if root.endswith("/") else root + "/"):
            return
    raise roots.outside(verb, repr(uri))


def _check_local(path: str, verb: str, access: Access, roots: Roots) -> None:
    is_glob = access.glob and access.mode == "read" and bool(_GLOB_CHARS.search(path))
    if is_glob:
        parts = path.split("/")
        first = next(i for i, p in enumerate(parts) if _GLOB_CHARS.search(p))
        if ".." in parts[first:]:
            raise _refused(f"the plan {verb} {path!r}; a glob pattern may not contain '..'")
        base = "/".join(parts[:first]) or "/"
    else:
        base = path
    resolved = _real(base)
    _check_resolved(path, resolved, verb, roots)
    if os.path.isdir(resolved):
        _check_tree(path, resolved, verb, roots)


def _check_resolved(path: str, resolved: str, verb: str, roots: Roots) -> None:
    shown = f"{path!r}" if resolved == path else f"{path!r} (which resolves to {resolved!r})"
    if not any(_inside(resolved, root) for root in roots.local):
        raise roots.outside(verb, shown)
    for denied in roots.denied:
        if _inside(resolved, denied):
            raise _refused(
                f"the plan {verb} {shown}, inside {denied!r}, which pclease keeps to itself; "
                "use another path"
            )


def _check_tree(path: str, directory: str, verb: str, roots: Roots) -> None:
    """A directory (or glob base) is read recursively: no denied path may lie inside it
    and no symlink in it may lead outside the roots."""
    for denied in roots.denied:
        if _inside(denied, directory):
            raise _refused(
                f"the plan {verb} {path!r}, which covers {denied!r}, a path pclease keeps to "
                "itself; name a narrower directory or pattern"
            )
    seen = 0
    for parent, dirnames, filenames in os.walk(directory):
        for name in (*dirnames, *filenames):
            seen += 1
            if seen > MAX_WALK_ENTRIES:
                raise _refused(
                    f"the plan {verb} {path!r}, which holds more than {MAX_WALK_ENTRIES} "
                    "entries to check; name a narrower directory or pattern"
                )
            entry = os.path.join(parent, name)
            if os.path.islink(entry):
                _check_resolved(entry, _real(entry), verb, roots)
