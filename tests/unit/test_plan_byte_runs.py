"""The plan decoder's byte runs (how serde writes a ``Vec<u8>``, and so an embedded
DataFrame): recognised with bytes methods over windows of the buffer, checked here against
the one-token-at-a-time definition, the msgpack library and hostile plans that hide nodes,
pickles or malformed integers in or right after a run."""

from __future__ import annotations

import pickle
import re
from typing import Any

import msgpack as msgpack_lib
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pclease_client.plans import build_submission
from pclease_service.errors import PlanRefused
from pclease_service.plans import guard, messagepack
from pclease_service.plans.header import HEADER_LEN, read_header
from pclease_service.plans.messagepack import Blob, byte_run_end, byte_run_values, decode


def reference_end(buf: bytes, pos: int, count: int) -> int | None:
    """The definition: ``count`` integers 0..255, each a positive fixint or 0xcc + a byte
    from 0x80, one after the other."""
    run = re.compile(rb"(?:[\x00-\x7f]|\xcc[\x80-\xff]){%d}" % count, re.DOTALL).match(buf, pos)
    return run.end() if run else None


def integer(value: int) -> bytes:
    return bytes([value]) if value < 0x80 else bytes([0xCC, value])


# Bytes that matter to the recogniser: low, 0xcc (a lead and a value), other high bytes,
# and MessagePack markers a hostile plan could slip into a run.
_INTERESTING = st.sampled_from([0x00, 0x41, 0x7F, 0x80, 0xCC, 0xC3, 0xFF, 0x91, 0xA3, 0xC2])


@st.composite
def runs(draw: Any) -> tuple[bytes, int, int]:
    values = draw(st.lists(st.sampled_from([0, 7, 0x7F, 0x80, 0xCC, 0xC3, 0xFF]), max_size=40))
    body = bytearray(b"".join(integer(v) for v in values))
    for _ in range(draw(st.integers(0, 2))):  # damage a few bytes
        if body:
            body[draw(st.integers(0, len(body) - 1))] = draw(_INTERESTING)
    prefix = bytes(draw(st.lists(_INTERESTING, max_size=3)))
    suffix = bytes(draw(st.lists(_INTERESTING, max_size=4)))
    count = draw(st.integers(1, len(values) + 2))
    return prefix + bytes(body) + suffix, len(prefix), count


@pytest.mark.parametrize("window", [2, 3, 7, 1 << 20])
@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(case=runs())
def test_a_run_ends_exactly_where_the_definition_says(
    case: tuple[bytes, int, int], window: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    buf, pos, count = case
    # The same window for every example: setting it again is harmless.
    monkeypatch.setattr(messagepack, "_RUN_WINDOW", window)

    assert byte_run_end(buf, pos, count) == reference_end(buf, pos, count)


def test_runs_of_204_across_window_edges_pair_from_their_left(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    values = [0xCC] * 7 + [0x85, 0xCC, 3, 0xCC, 0xCC, 0x80]
    buf = b"".join(integer(v) for v in values)
    for window in range(2, 8):
        monkeypatch.setattr(messagepack, "_RUN_WINDOW", window)
        end = byte_run_end(buf, 0, len(values))

        assert end == len(buf)
        assert byte_run_values(buf, 0, len(buf)) == bytes(values)
        # One integer fewer: 0xcc 0xcc is 204, never 0xcc then a lead.
        assert byte_run_end(buf, 0, len(values) - 1) == len(buf) - 2


@pytest.mark.parametrize(
    ("tail", "why"),
    [
        (b"\xcc\x05", "uint8 holding a value below 0x80 (not the shortest form)"),
        (b"\xc3", "true"),
        (b"\xc2", "false"),
        (b"\xff", "negative fixint"),
        (b"\xa1x", "a string"),
        (b"\x81\xa1a\x01", "a map"),
        (b"\xcd\x01\x00", "uint16"),
        (b"\xcc", "0xcc at the end of the buffer"),
    ],
)
def test_anything_but_a_small_integer_ends_the_run(tail: bytes, why: str) -> None:
    head = b"".join(integer(v) for v in range(0, 256, 9))
    count = len(range(0, 256, 9)) + 1

    assert byte_run_end(head + tail, 0, count) is None, why
    assert byte_run_end(head + tail, 0, count - 1) == len(head)


def plan_with_frame(rows: int) -> bytes:
    frame = pl.LazyFrame({"v": pl.int_range(rows, eager=True).cast(pl.Float64) / 7})
    return build_submission(frame.select(pl.col("v").sum()), "collect").plan


def test_an_embedded_frame_is_one_blob_holding_the_bytes_msgpack_reads() -> None:
    plan = plan_with_frame(300_000)
    payload = plan[HEADER_LEN:]

    tree = decode(payload)
    expected = msgpack_lib.unpackb(payload, raw=True, strict_map_key=False)

    frames = [f for f in tree["dataframes"] if isinstance(f["value"], list)]
    blobs = [v for f in frames for v in f["value"] if isinstance(v, Blob)]
    assert len(blobs) == 1
    values = [v for f in expected[b"dataframes"] if f[b"value"] for v in f[b"value"]]
    assert byte_run_values(payload, blobs[0].start, blobs[0].stop) == bytes(values[0])
    info = guard.inspect(plan, allow_python_udfs=False)
    assert info.collects
    assert [a.mode for a in info.accesses] == ["write"]  # only the in-memory output


def hand_plan(node: Any, dataframes: list[Any]) -> bytes:
    header = read_header(pl.LazyFrame().serialize())
    tree = {
        "root": {"idx": 1, "version": 1},
        "dataframes": dataframes,
        "dsl_plans": [{"value": None, "version": 0}, {"value": node, "version": 1}],
    }
    return header.encode() + msgpack_lib.packb(tree)


SCAN = {
    "Scan": {
        "sources": {"Paths": [{"inner": "/etc/passwd"}]},
        "unified_scan_args": {"cloud_options": None},
        "scan_type": "Csv",
    }
}


def test_a_scan_hidden_after_a_long_byte_run_is_found() -> None:
    frame = list(range(1, 256)) * 5000  # not a pickle: its first byte is not 0
    plan = hand_plan({"Union": {"inputs": [{"x": frame}, SCAN]}}, [])

    info = guard.inspect(plan, allow_python_udfs=False)

    assert [a.path for a in info.accesses] == ["/etc/passwd"]


def test_a_scan_inside_what_starts_as_a_byte_run_is_found() -> None:
    # Sixteen and more small integers, then the node: the array is not a run, so it is
    # decoded item by item and the node is walked.
    plan = hand_plan({"Union": {"inputs": [[*range(200), 204, 204, SCAN]]}}, [])

    info = guard.inspect(plan, allow_python_udfs=False)

    assert [a.path for a in info.accesses] == ["/etc/passwd"]


def test_a_pickle_in_a_large_byte_run_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(messagepack, "_RUN_WINDOW", 64)  # the pickle spans many windows
    payload = list(b"\x00\x0b\x07" + pickle.dumps(print) + bytes(range(256)) * 4)
    node = {"MapFunction": {"input": None, "function": {"SomethingNew": {"f": payload}}}}

    with pytest.raises(PlanRefused, match="pickled Python object at"):
        guard.inspect(hand_plan(node, []), allow_python_udfs=False)


def test_a_truncated_frame_is_refused_as_truncated() -> None:
    plan = plan_with_frame(50_000)

    with pytest.raises(PlanRefused, match="truncated"):
        guard.inspect(plan[: len(plan) // 2], allow_python_udfs=False)
