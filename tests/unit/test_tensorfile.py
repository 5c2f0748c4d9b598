"""The safetensors codec: byte-compatible with the reference library, strict on hostile input."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

from mfed.artifacts.tensorfile import (
    StoredDtype,
    TensorFileError,
    decode_tensors,
    encode_tensors,
)


def _tensors():
    rng = np.random.default_rng(0)
    return {
        "b.weight": rng.standard_normal((3, 5)).astype(np.float32),
        "a.bias": rng.standard_normal(7).astype(np.float32),
    }


@pytest.mark.parametrize("dtype", [StoredDtype.F32, StoredDtype.F16])
def test_the_reference_library_reads_our_files_and_we_read_its_files(dtype):
    tensors = _tensors()
    ours = encode_tensors(tensors, float_dtype=dtype)
    theirs = safetensors.numpy.load(ours)
    for key, value in tensors.items():
        np.testing.assert_array_equal(theirs[key], value.astype(theirs[key].dtype))
    back = decode_tensors(safetensors.numpy.save({k: v.astype(theirs[k].dtype) for k, v in tensors.items()}))
    for key in tensors:
        np.testing.assert_array_equal(back.tensors[key], theirs[key])


def test_bfloat16_rounds_like_torch_and_interoperates_with_safetensors_torch():
    values = np.array([1.0, -2.5, 3.14159, 1e-3, 65504.0, 1.00390625, -0.0], dtype=np.float32)
    ours = encode_tensors({"x": values}, float_dtype=StoredDtype.BF16)
    reference = safetensors.torch.load(ours)["x"]
    assert reference.dtype == torch.bfloat16
    expected = torch.from_numpy(values).to(torch.bfloat16)
    assert torch.equal(reference.view(torch.int16), expected.view(torch.int16))
    decoded = decode_tensors(safetensors.torch.save({"x": expected}))
    assert decoded.stored_dtypes["x"] == "BF16"
    np.testing.assert_array_equal(decoded.tensors["x"], expected.float().numpy())


def test_same_values_give_the_same_bytes_whatever_the_insertion_order():
    tensors = _tensors()
    assert encode_tensors(tensors) == encode_tensors(dict(reversed(list(tensors.items()))))


def test_decoded_arrays_are_read_only():
    decoded = decode_tensors(encode_tensors(_tensors()))
    with pytest.raises(ValueError):
        decoded.tensors["a.bias"][0] = 1.0


def _raw(header: dict, payload: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + payload


HOSTILE = {
    "shorter than the length prefix": b"\x01\x02",
    "header length beyond the file": struct.pack("<Q", 10**9) + b"{}",
    "header is not json": struct.pack("<Q", 4) + b"\xff\xfe{}",
    "header is a list": _raw([], b""),  # type: ignore[arg-type]
    "pickle dtype": _raw({"x": {"dtype": "O", "shape": [1], "data_offsets": [0, 8]}}, b"\x80\x04K\x01." + b"\x00" * 3),
    "offsets do not match the shape": _raw({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, b"\x00" * 8),
    "overlapping tensors": _raw(
        {
            "x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        },
        b"\x00" * 12,
    ),
    "a hole in the buffer": _raw({"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\x00" * 8),
    "trailing bytes": _raw({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\x00" * 9),
    "negative dimension": _raw({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, b""),
    "extra entry field": _raw({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "evil": 1}}, b"\x00" * 4),
    "metadata with non-strings": _raw({"__metadata__": {"a": 1}}, b""),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_files_are_refused_with_a_reason(case):
    with pytest.raises(TensorFileError):
        decode_tensors(HOSTILE[case])


def test_duplicate_header_keys_are_refused():
    entry = b'{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
    text = b'{"x":' + entry + b',"x":' + entry + b"}"
    with pytest.raises(TensorFileError, match="repeats"):
        decode_tensors(struct.pack("<Q", len(text)) + text + b"\x00" * 4)


def test_dtype_names_parse_with_a_helpful_error():
    assert StoredDtype.parse("bfloat16") is StoredDtype.BF16
    assert StoredDtype.parse("fp16") is StoredDtype.F16
    with pytest.raises(ValueError, match="float32, float16, bfloat16"):
        StoredDtype.parse("int8")
