"""Pure units: cut points of safetensors and generic files."""

import json
import struct

import pytest
from hypothesis import given, settings, strategies as st

from mlfs.chunking import (HeaderError, Tensor, fixed_spans, generic_spans, header_length,
                           parse_safetensors_header, safetensors_spans)


def header(tensors: dict, pad: int = 0) -> bytes:
    body = json.dumps(tensors).encode() + b" " * pad
    return struct.pack("<Q", len(body)) + body


def covers(spans, size):
    pos = 0
    for a, b in spans:
        assert a == pos and b > a
        pos = b
    assert pos == size


def test_fixed_spans_are_aligned_to_begin():
    assert fixed_spans(10, 35, 10) == [(10, 20), (20, 30), (30, 35)]
    assert generic_spans(0) == []


def test_parse_header_sorts_by_offset_and_skips_metadata():
    h = header({"__metadata__": {"a": "b"}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
                "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, pad=3)
    start, tensors = parse_safetensors_header(h, len(h) + 8)
    assert start == len(h)
    assert [t.name for t in tensors] == ["a", "b"]
    assert tensors[1] == Tensor("b", start + 4, start + 8)


@pytest.mark.parametrize("bad", [
    b"\x00" * 4,                                   # shorter than 8 bytes
    struct.pack("<Q", 10 ** 12) + b"{}",          # length larger than the file
    struct.pack("<Q", 5) + b"nope!",              # not JSON
    struct.pack("<Q", 2) + b"[]",                 # not an object
    header({"a": {"data_offsets": [0, 99]}}),     # beyond the data
    header({"a": {"data_offsets": [0, 4]}, "b": {"data_offsets": [2, 6]}}),  # overlap
    header({"a": {"data_offsets": [4, 0]}}),      # reversed
])
def test_parse_header_rejects_lies(bad):
    with pytest.raises(HeaderError):
        n = header_length(bad[:8], len(bad) + 8)
        parse_safetensors_header(bad[:8 + n], len(bad) + 8)


def test_big_tensor_pieces_survive_appended_rows():
    small = [Tensor("ln", 100, 120)]
    old = safetensors_spans(100, small + [Tensor("emb", 120, 120 + 1000)], 1120, piece=300, small=64)
    new = safetensors_spans(100, small + [Tensor("emb", 120, 120 + 1300)], 1420, piece=300, small=64)
    covers(old, 1120)
    covers(new, 1420)
    # With "glue" the small run joins the first piece; every full piece after it is identical
    # relative to the tensor start, so the grown tensor shares them.
    rel_old = {(a - 120, b - 120) for a, b in old if a >= 120}
    rel_new = {(a - 120, b - 120) for a, b in new if a >= 120}
    assert {(300, 600), (600, 900)} <= rel_old & rel_new


@pytest.mark.parametrize("policy", ["separate", "pack", "glue"])
def test_small_tensor_policies_cover_the_file(policy):
    ts = [Tensor("a", 10, 12), Tensor("b", 12, 14), Tensor("big", 14, 100), Tensor("c", 100, 101)]
    spans = safetensors_spans(10, ts, 105, piece=40, small=8, policy=policy, pack_limit=64)
    covers(spans, 105)
    if policy == "separate":
        assert (10, 12) in spans and (12, 14) in spans
    if policy == "pack":
        assert (10, 14) in spans
    if policy == "glue":
        assert (10, 54) in spans and (94, 101) in spans


def test_large_tensors_have_a_head_and_a_tail_of_their_own():
    """docs/adr/0018: read-ahead spilling into a neighbour costs its head or tail, not a piece.
    Head and tail are split off the first and last pieces, on the grid pieces have without
    them; the small run before a tensor joins its head."""
    ts = [Tensor("norm", 10, 14), Tensor("big", 14, 230), Tensor("mid", 230, 254)]
    spans = safetensors_spans(10, ts, 254, piece=64, small=8, edges=(16, 8))
    covers(spans, 254)
    assert spans == [(0, 10), (10, 30), (30, 78), (78, 142), (142, 206), (206, 222), (222, 230),
                     (230, 254)]  # "mid" is not longer than a head and two tails: one piece
    plain = safetensors_spans(10, ts, 254, piece=64, small=8, edges=(0, 0))
    assert {(78, 142), (142, 206)} <= set(plain)  # the same grid


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 5000), max_size=30), st.integers(1, 3000), st.integers(0, 2000),
       st.sampled_from(["separate", "pack", "glue"]), st.integers(0, 50),
       st.tuples(st.integers(0, 700), st.integers(0, 700)))
def test_spans_always_cover_the_file_exactly(sizes, piece, small, policy, tail, edges):
    start = 64
    tensors, pos = [], start
    for i, s in enumerate(sizes):
        tensors.append(Tensor(str(i), pos, pos + s))
        pos += s
    spans = safetensors_spans(start, tensors, pos + tail, piece=piece, small=small, policy=policy,
                              pack_limit=max(piece, 1), edges=edges)
    covers(spans, pos + tail)
