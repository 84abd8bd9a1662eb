"""Property-based tests (hypothesis) for the parsers that read untrusted input: CIFAR-10's binary
records, CIFAR-10's python-version pickles, architecture declarations and command-line numbers.

Each property: any input gives either the parser's own clear error or a correct result; never any
other exception.
"""
from __future__ import annotations

import argparse
import math
import pickle

import numpy as np
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cifarlab.cli.args import bounded_float as _bounded_float, bounded_int as _bounded_int
from cifarlab.data.cifar10 import RECORD_BYTES, parse_records
from cifarlab.errors import DataError, DeclarationError
from cifarlab.models import LAYER_KEYS, REQUIRED, Net, count_parameters, summary, validate
from cifarlab.data.safe_pickle import RestrictedUnpickler, safe_load

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------------------------------------------
# Binary records


def write_records(images: np.ndarray, labels: np.ndarray) -> bytes:
    """The inverse of parse_records: one label byte then 3,072 pixel bytes per record."""
    return np.concatenate([labels.astype(np.uint8).reshape(-1, 1), images.reshape(len(labels), -1)], axis=1).tobytes()


def _record_buffers():
    whole = st.integers(1, 4).flatmap(lambda n: st.binary(min_size=n * RECORD_BYTES, max_size=n * RECORD_BYTES))
    near = st.tuples(st.integers(0, 3), st.integers(-3, 3)).flatmap(
        lambda t: st.binary(min_size=max(0, t[0] * RECORD_BYTES + t[1]), max_size=max(0, t[0] * RECORD_BYTES + t[1])))
    return st.one_of(st.binary(max_size=2 * RECORD_BYTES + 10), whole, near)


@SETTINGS
@given(_record_buffers())
def test_any_bytes_parse_to_a_data_error_or_records_that_round_trip(raw):
    n, rest = divmod(len(raw), RECORD_BYTES)
    try:
        images, labels = parse_records(raw, "fuzz.bin")
    except DataError as e:
        message = str(e)
        assert message.startswith("fuzz.bin: ")
        if rest or n == 0:
            assert f"{len(raw):,} bytes is not a whole number of 3073-byte records" in message
        else:
            first_bad = next(i for i in range(n) if raw[i * RECORD_BYTES] >= 10)
            assert f"record {first_bad} has label {raw[first_bad * RECORD_BYTES]}, expected 0..9" in message
        return
    assert rest == 0 and n >= 1
    assert images.shape == (n, 3, 32, 32) and images.dtype == np.uint8
    assert labels.shape == (n,) and labels.dtype == np.uint8 and labels.max() < 10
    assert write_records(images, labels) == raw


@SETTINGS
@given(st.integers(1, 6).flatmap(lambda n: st.tuples(
    hnp.arrays(np.uint8, (n, 3, 32, 32)), hnp.arrays(np.uint8, (n,), elements=st.integers(0, 9)))))
def test_written_records_parse_back_exactly(images_labels):
    images, labels = images_labels
    parsed_images, parsed_labels = parse_records(write_records(images, labels))
    assert np.array_equal(parsed_images, images) and np.array_equal(parsed_labels, labels)
    # Channel planes are R, G, B, each row-major: pixel (c, y, x) is byte 1 + c*1024 + y*32 + x.
    raw = write_records(images, labels)
    assert raw[1 + 2 * 1024 + 5 * 32 + 7] == images[0, 2, 5, 7]


# ---------------------------------------------------------------------------------------------------
# The restricted unpickler


def _load(data: bytes):
    import io

    return RestrictedUnpickler(io.BytesIO(data), "fuzz").load()


NUMERIC = st.sampled_from([np.uint8, np.int8, np.int16, np.int32, np.int64, np.uint16, np.float32, np.float64,
                           np.bool_, np.dtype(">i4"), np.dtype("<f8")])
ARRAYS = NUMERIC.flatmap(lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)))
PLAIN = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.binary(max_size=20) |
    st.text(max_size=20) | ARRAYS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.binary(max_size=8) | st.text(max_size=8), inner,
                                                                max_size=4), max_leaves=12)


def _same(a, b) -> bool:
    if isinstance(b, np.ndarray):
        a = np.asarray(a)
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()  # NaN == NaN here
    if isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in b)
    return type(a) is type(b) and a == b


@SETTINGS
@given(PLAIN, st.integers(0, 5))
def test_containers_of_numeric_arrays_unpickle_exactly_as_pickle_does(obj, protocol):
    data = pickle.dumps(obj, protocol=protocol)
    assert _same(_load(data), pickle.loads(data, encoding="bytes"))


@SETTINGS
@given(st.binary(max_size=300))
def test_random_bytes_only_ever_give_a_data_error(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("fuzz") / "data_batch_1"
    path.write_bytes(raw)
    try:
        safe_load(path)  # a plain object made of bytes, numbers, containers and numeric arrays is fine too
    except DataError as e:
        assert str(e).startswith(f"{path}: ")


@SETTINGS
@given(st.data())
def test_mutated_cifar_batches_load_or_give_a_data_error(tmp_path_factory, data):
    from cifarlab.data.safe_pickle import read_python_batch

    batch = {b"batch_label": b"b", b"labels": [1, 2, 3], b"data": np.arange(3 * 3072, dtype=np.uint32).astype(np.uint8)
             .reshape(3, 3072), b"filenames": [b"a", b"b", b"c"]}
    raw = bytearray(pickle.dumps(batch, protocol=data.draw(st.integers(0, 5))))
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(raw) - 1))
        raw[position] = data.draw(st.integers(0, 255))
    path = tmp_path_factory.mktemp("mutated") / "data_batch_1"
    path.write_bytes(bytes(raw))
    try:
        images, labels = read_python_batch(path)
    except DataError as e:
        assert str(path) in str(e)
    else:
        assert images.dtype == np.uint8 and images.shape[1:] == (3, 32, 32) and labels.max() <= 9
        assert len(images) == len(labels) >= 1


# ---------------------------------------------------------------------------------------------------
# Declarations


def _value(good):
    """Mostly good values; one in 12 is out of range or of the wrong type."""
    bad = st.one_of(st.integers(-3, 70_000), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
                    st.booleans())
    return st.integers(0, 11).flatmap(lambda i: bad if i == 0 else good)


SMALL = {
    "filters": st.integers(1, 12), "kernel": st.integers(1, 5), "stride": st.integers(1, 3),
    "padding": st.sampled_from(["same", "valid", 0, 1, 2]), "bias": st.booleans(), "eps": st.floats(1e-6, 0.1),
    "units": st.integers(1, 48), "slope": st.floats(0, 1), "size": st.integers(1, 4),
    "rate": st.floats(0, 0.9), "momentum": st.floats(0, 1), "factor": st.floats(-10, 10),
}


@st.composite
def _layer(draw):
    kind = draw(st.sampled_from(sorted(LAYER_KEYS) + ["flatten", "relu", "conv", "conv"]))
    layer = {"type": kind}
    for key, (_, default) in LAYER_KEYS[kind].items():
        if draw(st.integers(0, 3 if default is not REQUIRED else 25)) == 0:
            continue  # use the default (or, rarely, miss a required key)
        layer[key] = draw(_value(SMALL.get(key, st.none()) if key != "stride" or kind == "conv"
                                 else st.none() | SMALL["stride"]))
    if draw(st.integers(0, 30)) == 0:
        layer[draw(st.sampled_from(["evil", "units", "filters", "name"]))] = draw(st.text(max_size=4))
    return layer


@st.composite
def _declaration(draw):
    layers = draw(st.lists(_layer(), max_size=5))
    if draw(st.integers(0, 9)):
        layers += [{"type": "flatten"}, {"type": "dense", "units": draw(st.sampled_from([10, 10, 10, 9]))}]
    decl = {"layers": layers}
    if draw(st.booleans()):
        decl["init"] = draw(st.sampled_from(["glorot", "torch", "glorot", "torch", "keras"]))
    if draw(st.integers(0, 10)) == 0:
        decl[draw(st.sampled_from(["name", "description", "extra"]))] = draw(st.text(max_size=8))
    return decl


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(_declaration())
def test_declarations_are_rejected_clearly_or_build_with_the_validated_parameter_count(decl):
    """Grammar-shaped declarations with good, out-of-range and wrong-typed values. (Ints beyond the
    float range, null for a required key, unhashable 'type' values and non-string keys are the known
    validate() bugs; see test_hostile_files.)"""
    try:
        valid = validate(decl, num_classes=10)
    except DeclarationError as e:
        event(f"rejected: {str(e).split(':')[-1].split(' is ')[0].split(' must ')[0][:30]}")
        return
    count = count_parameters(valid)
    event("valid")
    assert f"Total params: {count:,}" in summary(valid)
    if count > 3_000_000:  # validated by arithmetic alone; not worth allocating here
        return
    net = Net(valid)
    assert net.num_parameters() == sum(p.numel() for p in net.parameters()) == count
    with torch.no_grad():
        assert net.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10) |
    st.sampled_from(sorted(LAYER_KEYS)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["type", "filters", "units", "kernel", "name", "layers", "size", "padding"]) | st.text(max_size=5),
        inner, max_size=5), max_leaves=20)


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(JSONISH, st.fixed_dictionaries({"layers": st.lists(JSONISH, max_size=5)})))
@example({"layers": [{"type": []}]})
def test_any_json_value_is_a_declaration_error_or_a_valid_declaration(decl):
    try:
        validate(decl)
    except DeclarationError:
        pass


# ---------------------------------------------------------------------------------------------------
# Command-line numbers


@SETTINGS
@given(st.one_of(st.text(max_size=30), st.integers().map(str), st.floats().map(repr),
                 st.sampled_from(["nan", "-nan", "inf", "-inf", "1e309", "0x10", "1_000", " 7 ", "٣", "10**12"])))
def test_bounded_numbers_parse_into_range_or_give_an_argparse_error(text):
    for parse, lo, hi in ((_bounded_int(1, 10_000), 1, 10_000), (_bounded_float(1e-12, 100.0), 1e-12, 100.0)):
        try:
            value = parse(text)
        except argparse.ArgumentTypeError as e:
            assert str(e).startswith(("expected an integer, got", "expected a number, got")) or "is outside" in str(e)
        else:
            assert lo <= value <= hi and math.isfinite(value)
