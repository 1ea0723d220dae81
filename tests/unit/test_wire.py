"""Frame codec: what the monitor accepts from a device (hostile) and a device from the monitor."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitvmm.errors import ProtocolError
from splitvmm.protocol import control, wire


def test_read_done_matching_reply_returns_data():
    assert wire.decode_read_done(wire.encode_read_done(7, b"\xab"), 7, 1) == b"\xab"


# Each frame is a good reply to READ 7 of 1 byte but for the one field its id names, and the
# error must name that field: a frame wrong in two ways passed on the other check alone (a
# READY frame has seq 0 and size 0 too, so the opcode check went untested).
@pytest.mark.parametrize(
    "frame,problem",
    [
        (wire.encode_read_done(6, b"\xab"), "seq=6 \\(want 7\\)"),
        (wire.FRAME.pack(wire.Op.READ_DONE, 2, 0, 7, 0, b"\xab"), "size=2 \\(want 1\\)"),
        (wire.FRAME.pack(wire.Op.SYNC_DONE, 1, 0, 7, 0, b"\xab"), "op=7 "),
        (wire.encode_read_done(7, b"\xab")[:-1], "frame is 23 bytes"),
        (wire.encode_read_done(7, b"\xab") + b"\x00", "frame is 25 bytes"),
        (wire.FRAME.pack(wire.Op.READ_DONE, 1, 0, 7, 0, b"\xab\x01"), "data past its size"),
        (wire.FRAME.pack(wire.Op.READ_DONE, 1, 2, 7, 0, b"\xab"), "flags 0x2 "),
        (wire.FRAME.pack(wire.Op.READ_DONE, 1, 0, 7, 9, b"\xab"), "flags 0x0 and offset 0x9"),
        (wire.FRAME.pack(wire.Op.READ_DONE, 1, 1, 7, 1 << 32, b"\xab"), "offset 0x100000000"),
    ],
    ids=[
        "stale-seq",
        "wrong-size",
        "wrong-op",
        "short",
        "long",
        "trailing-data",
        "unknown-flag",
        "offset-unflagged",
        "stamp-too-big",
    ],
)
def test_read_done_bad_reply_raises_protocol_error(frame, problem):
    with pytest.raises(ProtocolError, match=problem):
        wire.decode_read_done(frame, 7, 1)


def test_read_done_restamped_reply_decodes_its_data_and_stamp():
    frame = wire.encode_read_done(7, b"\xab", stamp=(1 << 32) + 5)  # stamps wrap at 2**32
    assert wire.decode_read_reply(frame, 7, 1) == (b"\xab", 5)


def test_read_done_plain_reply_has_no_stamp():
    assert wire.decode_read_reply(wire.encode_read_done(7, b"\xab"), 7, 1) == (b"\xab", None)


def test_access_write_outside_window_raises_protocol_error():
    with pytest.raises(ProtocolError):
        wire.decode_access(wire.encode_write(7, b"\x00\x00"), window=8)


def test_access_write_decodes_offset_and_data():
    access = wire.decode_access(wire.encode_write(3, b"\x80"), window=8)
    assert (access.op, access.offset, access.data) == (wire.Op.WRITE, 3, b"\x80")


def test_sync_done_wrong_seq_raises_protocol_error():
    with pytest.raises(ProtocolError):
        wire.decode_sync_done(wire.encode_sync_done(2), 3)


def test_ready_frame_decodes():
    wire.decode_ready(wire.encode_ready())


# As for READ_DONE above: each frame is a READY but for the one field its id names.
@pytest.mark.parametrize(
    "frame",
    [
        wire.FRAME.pack(wire.Op.SYNC_DONE, 0, 0, 0, 0, b""),
        wire.FRAME.pack(wire.Op.READY, 1, 0, 0, 0, b""),
        wire.FRAME.pack(wire.Op.READY, 0, 1, 0, 0, b""),
        wire.FRAME.pack(wire.Op.READY, 0, 0, 1, 0, b""),
        wire.FRAME.pack(wire.Op.READY, 0, 0, 0, 1, b""),
        wire.FRAME.pack(wire.Op.READY, 0, 0, 0, 0, b"\x00" * 7 + b"\x01"),
    ],
    ids=["op", "size", "flags", "seq", "offset", "data"],
)
def test_ready_with_a_field_set_raises_protocol_error(frame):
    with pytest.raises(ProtocolError, match="expected READY"):
        wire.decode_ready(frame)


# Each frame is SYNC_DONE 7 but for the one field its id names (test_sync_done_wrong_seq_...
# above has the sequence number).
@pytest.mark.parametrize(
    "frame",
    [
        wire.FRAME.pack(wire.Op.READY, 0, 0, 7, 0, b""),
        wire.FRAME.pack(wire.Op.SYNC_DONE, 1, 0, 7, 0, b""),
        wire.FRAME.pack(wire.Op.SYNC_DONE, 0, 1, 7, 0, b""),
        wire.FRAME.pack(wire.Op.SYNC_DONE, 0, 0, 7, 1, b""),
        wire.FRAME.pack(wire.Op.SYNC_DONE, 0, 0, 7, 0, b"\x00" * 7 + b"\x01"),
    ],
    ids=["op", "size", "flags", "offset", "data"],
)
def test_sync_done_with_a_field_set_raises_protocol_error(frame):
    with pytest.raises(ProtocolError, match="to SYNC 7"):
        wire.decode_sync_done(frame, 7)


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=64), st.integers(0, 2**32 - 1), st.sampled_from([1, 2, 4, 8]))
def test_read_done_random_bytes_never_crash_the_decoder(buf, seq, size):
    try:
        data = wire.decode_read_done(buf, seq, size)
    except ProtocolError:
        return
    assert len(data) == size


@settings(max_examples=2000, deadline=None)
@given(st.binary(min_size=wire.FRAME.size, max_size=wire.FRAME.size))
def test_access_random_frames_never_crash_the_decoder(buf):
    try:
        access = wire.decode_access(buf, window=8)
    except ProtocolError:
        return
    assert access.offset + access.size <= 8 or access.op in (wire.Op.INPUT, wire.Op.SYNC)


@pytest.mark.slow
@settings(max_examples=100_000, deadline=None, database=None)
@given(st.binary(max_size=64), st.integers(0, 2**32 - 1), st.sampled_from([1, 2, 4, 8]))
def test_device_reply_decoders_survive_100k_random_frames(buf, seq, size):
    """Everything the monitor decodes from a device: read replies, sync replies, READY,
    control replies. Each either decodes within bounds or raises ProtocolError."""
    from splitvmm.protocol import control

    for decode in (
        lambda: wire.decode_read_done(buf, seq, size),
        lambda: wire.decode_sync_done(buf, seq),
        lambda: wire.decode_ready(buf),
        lambda: control.check_reply(control.decode(bytes([0x10]) + buf), "save", seq, "serial"),
    ):
        try:
            decode()
        except ProtocolError:
            pass


# -- valid frames decode to what was encoded (the fuzzers above only show nothing else is raised)
SIZES = st.sampled_from([1, 2, 4, 8])
SEQS = st.integers(0, 2**32 - 1)


@settings(max_examples=500, deadline=None)
@given(SEQS, st.data())
def test_read_done_valid_reply_decodes_to_its_data(seq, data):
    size = data.draw(SIZES)
    payload = data.draw(st.binary(min_size=size, max_size=size))

    assert wire.decode_read_done(wire.encode_read_done(seq, payload), seq, size) == payload


@settings(max_examples=500, deadline=None)
@given(SEQS, st.data())
def test_access_valid_read_decodes_to_its_fields(seq, data):
    size = data.draw(SIZES)
    offset = data.draw(st.integers(0, 8 - size))

    access = wire.decode_access(wire.encode_read(seq, offset, size), window=8)

    assert (access.op, access.seq, access.offset, access.size) == (wire.Op.READ, seq, offset, size)


@settings(max_examples=500, deadline=None)
@given(st.data())
def test_access_valid_write_decodes_to_its_data(data):
    size = data.draw(SIZES)
    offset = data.draw(st.integers(0, 8 - size))
    payload = data.draw(st.binary(min_size=size, max_size=size))

    access = wire.decode_access(wire.encode_write(offset, payload), window=8)

    assert (access.op, access.offset, access.data) == (wire.Op.WRITE, offset, payload)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=wire.MAX_INPUT_CHUNK), SEQS)
def test_valid_input_and_sync_frames_decode(payload, seq):
    access = wire.decode_access(wire.encode_input(payload), window=8)
    sync = wire.decode_access(wire.encode_sync(seq), window=8)

    assert (access.op, access.data) == (wire.Op.INPUT, payload)
    assert (sync.op, sync.seq) == (wire.Op.SYNC, seq)
    wire.decode_sync_done(wire.encode_sync_done(seq), seq)


# -- CHECKPOINT: a device's last published state holds at a later point (protocol/events.py)
def test_checkpoint_decodes_its_counts():
    frame = wire.encode_checkpoint(2**40 + 3, 2**62)

    assert wire.is_checkpoint(frame)
    assert wire.decode_checkpoint(frame) == (2**40 + 3, 2**62)


@pytest.mark.parametrize(
    "frame,problem",
    [
        (wire.FRAME.pack(wire.Op.CHECKPOINT, 1, 0, 0, 5, bytes(8)), "size=1"),
        (wire.FRAME.pack(wire.Op.CHECKPOINT, 0, 1, 0, 5, bytes(8)), "flags=1"),
        (wire.FRAME.pack(wire.Op.CHECKPOINT, 0, 0, 9, 5, bytes(8)), "seq=9"),
        (wire.FRAME.pack(wire.Op.CHECKPOINT, 0, 0, 0, 2**63, bytes(8)), "over 2\\*\\*63-1"),
        (wire.FRAME.pack(wire.Op.CHECKPOINT, 0, 0, 0, 5, b"\xff" * 8), "over 2\\*\\*63-1"),
        (wire.encode_mirror(wire.Mirror((b"\x60",)), ((5, 1),)), "expected CHECKPOINT"),
        (wire.encode_checkpoint(1, 1)[:-1], "frame is 23 bytes"),
    ],
)
def test_checkpoint_bad_frame_raises_protocol_error(frame, problem):
    with pytest.raises(ProtocolError, match=problem):
        wire.decode_checkpoint(frame)


@settings(max_examples=2000, deadline=None)
@given(st.binary(min_size=wire.FRAME.size, max_size=wire.FRAME.size))
def test_checkpoint_random_frames_never_crash_the_decoder(buf):
    try:
        applied, emitted = wire.decode_checkpoint(buf)
    except ProtocolError:
        return
    assert 0 <= applied <= wire.MAX_COUNT and 0 <= emitted <= wire.MAX_COUNT


def test_access_replies_are_told_from_every_other_frame_a_device_sends():
    assert wire.is_access_reply(wire.encode_read_done(1, b"\x01"))
    assert wire.is_access_reply(wire.encode_sync_done(2))
    others = (
        wire.encode_ready(),
        wire.encode_checkpoint(3, 4),
        wire.encode_mirror(wire.Mirror((b"\x00",)), ((0, 1),)),
        wire.encode_read(1, 0, 1),
        control.encode({"op": "pong", "seq": 1}),
        wire.encode_read_done(1, b"\x01")[:-1],  # a frame's length is part of what it is
    )
    assert not any(wire.is_access_reply(frame) for frame in others)
