"""ZmtpReader and encode (protocol/zmtp.py): the ZMTP 3.0 parser of a peer's bytes (a device's,
at the monitor's end; the monitor's, at a device's), against RFC 23 and against what libzmq
4.3 sends, and fuzzed with hostile streams.

The monitor's socket end (ZmtpLink, with a real libzmq PAIR peer and raw hostile peers) is
tested in test_channel_multipart.py, a device's (devprocs/channel.py) in test_device_channel.py."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitvmm.errors import ProtocolError
from splitvmm.protocol import zmtp

MAX = 64 << 10
# What libzmq 4.3.5's PAIR socket sends (captured): its signature's padding holds a length, it
# offers ZMTP 3.1, and its READY has the socket type only.
LIBZMQ_GREETING = (
    b"\xff" + bytes(7) + b"\x01\x7f" + b"\x03\x01" + b"NULL".ljust(20, b"\0") + bytes(32)
)


def ready(*props: tuple[bytes, bytes]) -> bytes:
    body = b"\x05READY" + b"".join(
        bytes([len(n)]) + n + struct.pack(">I", len(v)) + v for n, v in props
    )
    return b"\x04" + bytes([len(body)]) + body


LIBZMQ_HANDSHAKE = LIBZMQ_GREETING + ready((b"Socket-Type", b"PAIR"))


def frames_of(data: bytes, step: int | None = None) -> list[bytes]:
    """Every frame in `data`, fed whole or `step` bytes at a time (as the channel does: more
    only once next() has nothing)."""
    reader = zmtp.ZmtpReader(MAX)
    out: list[bytes] = []
    chunks = [data] if step is None else [data[i : i + step] for i in range(0, len(data), step)]
    for chunk in chunks:
        reader.feed(chunk)
        while (frame := reader.next()) is not None:
            out.append(frame)
    return out


def short(body: bytes) -> bytes:
    return bytes((0, len(body))) + body


def test_libzmqs_handshake_then_frames_short_and_long():
    stream = LIBZMQ_HANDSHAKE + short(b"hello") + b"\x02" + struct.pack(">Q", 300) + b"x" * 300
    assert frames_of(stream) == [b"hello", b"x" * 300]


@pytest.mark.parametrize("step", [1, 2, 7, 63, 64, 65, 100])
def test_frames_cut_anywhere_come_out_the_same(step):
    stream = (
        LIBZMQ_HANDSHAKE + short(b"") + short(b"ab") + b"\x02" + struct.pack(">Q", 9) + b"9" * 9
    )
    assert frames_of(stream, step) == [b"", b"ab", b"9" * 9]


def test_a_ready_with_more_properties_and_any_case():
    handshake = LIBZMQ_GREETING + ready((b"Identity", b"dev"), (b"socket-type", b"PAIR"))
    assert frames_of(handshake + short(b"x")) == [b"x"]


def test_nothing_comes_out_before_the_handshake_is_whole():
    reader = zmtp.ZmtpReader(MAX)
    reader.feed(LIBZMQ_HANDSHAKE[:-1])
    assert reader.next() is None and not reader.ready
    reader.feed(LIBZMQ_HANDSHAKE[-1:] + short(b"x"))
    assert reader.next() == b"x" and reader.ready


@pytest.mark.parametrize(
    ("stream", "why"),
    [
        (b"GET / HTTP/1.0\r\n", "not a ZMTP greeting"),  # refused on its first byte
        (b"\xff" + bytes(8) + b"\x7e" + bytes(54), "not a ZMTP greeting"),
        (LIBZMQ_GREETING[:10] + b"\x02\x00" + LIBZMQ_GREETING[12:], "speaks ZMTP 2.0, not 3"),
        (LIBZMQ_GREETING[:12] + b"CURVE".ljust(20, b"\0") + bytes(32), "other than NULL"),
        (LIBZMQ_GREETING + short(b"data"), "sent no READY command"),
        (LIBZMQ_GREETING + b"\x04\x06\x05HELLO", "a command other than READY"),
        (LIBZMQ_GREETING + ready((b"Socket-Type", b"DEALER")), "not a ZeroMQ PAIR socket"),
        (LIBZMQ_GREETING + ready(), "not a ZeroMQ PAIR socket"),
        (LIBZMQ_GREETING + b"\x04\x08\x05READY\x0bS", "a truncated property"),
        (LIBZMQ_GREETING + b"\x06" + struct.pack(">Q", 1 << 20), "a READY command of 1048576"),
        (LIBZMQ_HANDSHAKE + b"\x01\x01a", "multipart message"),
        (LIBZMQ_HANDSHAKE + b"\x03" + struct.pack(">Q", 10), "multipart message"),
        (LIBZMQ_HANDSHAKE + b"\x04\x04PING", "a command after its handshake"),
        (LIBZMQ_HANDSHAKE + b"\x80\x00", "frame flags 0x80"),
        (LIBZMQ_HANDSHAKE + b"\x02" + struct.pack(">Q", MAX + 1), f"{MAX + 1} bytes, over"),
    ],
)
def test_a_stream_that_breaks_zmtp_or_the_channels_limits_is_refused(stream, why):
    with pytest.raises(ProtocolError, match=why):
        frames_of(stream)


def test_a_frames_size_is_refused_on_its_header_before_its_body():
    reader = zmtp.ZmtpReader(MAX)
    reader.feed(LIBZMQ_HANDSHAKE + b"\x02" + struct.pack(">Q", 1 << 62))
    with pytest.raises(ProtocolError, match="over the 65536 allowed"):
        reader.next()


def test_encode_makes_one_part_messages_in_the_long_form_past_255_bytes():
    assert zmtp.encode(b"a") == b"\x00\x01a"
    assert zmtp.encode(b"z" * 255) == b"\x00\xff" + b"z" * 255
    assert zmtp.encode(b"b" * 256) == b"\x02" + struct.pack(">Q", 256) + b"b" * 256
    assert zmtp.encode(b"") == b"\x00\x00"
    stream = zmtp.HANDSHAKE + b"".join(map(zmtp.encode, (b"a", b"b" * 256, b"")))
    assert frames_of(stream) == [b"a", b"b" * 256, b""]


def test_our_handshake_is_what_rfc_23_asks_of_a_null_pair_peer():
    greeting = zmtp.HANDSHAKE[:64]
    assert greeting[0] == 0xFF and greeting[9] == 0x7F and greeting[10:12] == b"\x03\x00"
    assert greeting[12:32] == b"NULL" + bytes(16) and greeting[32] == 0
    # a peer that reads it back as ours would: the same reader accepts it
    assert frames_of(zmtp.HANDSHAKE + short(b"ok")) == [b"ok"]


@settings(max_examples=400, deadline=None)
@given(tail=st.binary(max_size=600), step=st.integers(1, 80), max_frame=st.integers(0, 300))
def test_any_bytes_after_a_handshake_give_frames_within_the_limit_or_a_protocol_error(
    tail, step, max_frame
):
    reader = zmtp.ZmtpReader(max_frame)
    data = LIBZMQ_HANDSHAKE + tail
    try:
        for i in range(0, len(data), step):
            reader.feed(data[i : i + step])
            while (frame := reader.next()) is not None:
                assert len(frame) <= max_frame
            # what it holds unparsed: one frame's header and body (or the handshake), and
            # the chunk after it
            held = len(reader._buf) - reader._pos
            most = max_frame if reader.ready else zmtp.GREETING_SIZE + zmtp.MAX_READY
            assert held <= 9 + most + step
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(stream=st.binary(max_size=200))
def test_any_bytes_at_all_are_frames_or_a_protocol_error(stream):
    try:
        frames_of(stream, 5)
    except ProtocolError:
        pass


def test_a_refused_socket_type_is_quoted_short():
    """The device's words go into the monitor's log: a few bytes of them."""
    with pytest.raises(ProtocolError) as e:
        frames_of(LIBZMQ_GREETING + ready((b"Socket-Type", b"D" * 200)))
    assert "not a ZeroMQ PAIR socket (b'DDDDDDDDDDDDDDDD')" in str(e.value)
