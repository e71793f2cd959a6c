"""Free-form text: what pclease accepts at its edge, and how it reads back what it stored.

Clients send names, labels, paths and keys that end up in database rows, JSON answers,
HTML pages and backend labels. Some characters survive none of those: a lone surrogate
(``"\\udfff"`` is legal in JSON text but is not Unicode, so it cannot be encoded as UTF-8),
NUL (PostgreSQL refuses it in text) and other control characters (never meaningful in a
name, and invisible in a page). One rule covers all of them, in two halves:

- **On the way in**, :class:`Text` is the one type for every free-form string of the API
  (``Annotated[str, Text(250)]``): it refuses those characters with a message that names
  the character and its position, before anything is written, on every database alike.
- **On the way out**, :func:`readable` repairs a value read from a stored JSON document
  (written before this rule, or by hand) so that no existing row can break a listing, a
  page or ``/metrics``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, core_schema

# C0 controls, DEL, C1 controls and the surrogate block.
_REFUSED = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")

#: The same rule as a JSON Schema pattern, for the OpenAPI document. Surrogates are left
#: out: JSON Schema regexes cannot name them portably, and a client that encodes its text
#: as UTF-8 cannot produce one anyway.
PATTERN = "^[^\\x00-\\x1f\\x7f-\\x9f]*$"


def refusal(value: str) -> str | None:
    """Why ``value`` is not acceptable text, or None if it is."""
    match = _REFUSED.search(value)
    if match is None:
        return None
    char = match.group()
    if "\ud800" <= char <= "\udfff":
        what = "a lone surrogate"
    elif char == "\x00":
        what = "a NUL character"
    else:
        what = "a control character"
    return (
        f"contains {what} (U+{ord(char):04X}) at position {match.start()}; send printable "
        "UTF-8 text"
    )


#: What to say when pydantic itself meets a lone surrogate, where no :class:`Text` sees it
#: first (a key of a model's extra fields, an unknown field's name).
UNREADABLE = (
    "a key or value holds a lone surrogate, which is not Unicode; send printable UTF-8 text"
)


def message_of(error: Mapping[str, Any]) -> str:
    """The message for one pydantic error, worded for the API's callers."""
    if error.get("type") == "string_unicode":
        return UNREADABLE
    return str(error.get("msg", "invalid")).removeprefix("Value error, ")


def _check(value: Any) -> Any:
    # Runs before the str schema: that schema would turn a lone surrogate into a vague
    # "unable to parse raw data as a unicode string". Non-strings pass on to be refused
    # there, with pydantic's own message.
    if isinstance(value, str) and (problem := refusal(value)) is not None:
        raise ValueError(problem)
    return value


@dataclass(frozen=True)
class Text:
    """Marks a ``str`` as free-form text of at most ``max_length`` characters.

    Use it as ``Annotated[str, Text(250)]`` on model fields, dict keys and values, and on
    query, header and form parameters alike.
    """

    max_length: int
    min_length: int = 0

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        if source is not str:
            raise TypeError(f"Text annotates str, not {source!r}")
        return core_schema.no_info_before_validator_function(
            _check,
            core_schema.str_schema(min_length=self.min_length or None, max_length=self.max_length),
        )

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        json_schema = handler(schema)
        json_schema["pattern"] = PATTERN
        return json_schema


def shown(value: str, limit: int = 80) -> str:
    """``value`` fit for an error message: short, and escaped if it is not acceptable."""
    if refusal(value) is not None:
        value = value.encode("ascii", "backslashreplace").decode()
    return value if len(value) <= limit else value[:limit] + "..."


def readable(value: Any) -> Any:
    """A stored JSON value made safe to answer with: lone surrogates become U+FFFD and
    numbers JSON cannot carry (NaN, infinities) become None, in keys and values at any
    depth. Everything else is returned as it is."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {readable(k): readable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [readable(v) for v in value]
    return value
