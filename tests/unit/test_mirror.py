"""The monitor's register mirror (monitor/mirror.py) and its MIRROR frame (protocol/wire.py):
when the monitor may answer a read itself, and what a device may put in a MIRROR."""

from __future__ import annotations

import pytest

from splitvmm.errors import ProtocolError
from splitvmm.monitor.mirror import NEWS_EVERY, NEWS_MAX_AGE_NS, RegisterMirror
from splitvmm.protocol import wire
from splitvmm.protocol.models import check_mirrored

REGISTERS = ((1, 1), (4, 2), (7, 1))  # three registers: a byte, a word, a byte
WINDOW = 8
THR = 0


def mirror_at(stamp: int, credit: int = 0, scr: bytes | None = b"\x5a") -> RegisterMirror:
    mirror = RegisterMirror(REGISTERS)
    mirror.take(wire.Mirror((b"\x01", b"\x02\x03", scr), THR, credit, stamp))
    return mirror


def test_mirror_current_stamp_answers_the_value():
    assert mirror_at(stamp=3).answer(4, 2, frames=3) == b"\x02\x03"


def test_mirror_behind_a_write_without_credit_asks_the_device():
    mirror = mirror_at(stamp=3)
    mirror.sent(THR)
    assert mirror.answer(7, 1, frames=4) is None


def test_mirror_writes_within_credit_at_its_offset_answer():
    mirror = mirror_at(stamp=3, credit=2)
    mirror.sent(THR)
    mirror.sent(THR)
    assert mirror.answer(7, 1, frames=5) == b"\x5a"


def test_mirror_writes_past_credit_ask_the_device():
    mirror = mirror_at(stamp=3, credit=2)
    for _ in range(3):
        mirror.sent(THR)
    assert mirror.answer(7, 1, frames=6) is None


def test_mirror_write_elsewhere_after_stamp_asks_the_device():
    mirror = mirror_at(stamp=3, credit=100)
    mirror.sent(THR)
    mirror.sent(7)  # a write the credit does not cover, then one it does
    mirror.sent(THR)
    assert mirror.answer(1, 1, frames=6) is None


# -- writes KVM holds (monitor/writebehind.py): sent after the frames, before the read ------
def test_mirror_held_writes_within_credit_answer():
    assert mirror_at(stamp=3, credit=2).answer(7, 1, frames=3, held=2, held_at=THR) == b"\x5a"


def test_mirror_held_writes_past_credit_ask_the_device():
    assert mirror_at(stamp=3, credit=2).answer(7, 1, frames=3, held=3, held_at=THR) is None


def test_mirror_held_writes_without_credit_ask_the_device():
    assert mirror_at(stamp=3).answer(7, 1, frames=3, held=1, held_at=THR) is None


def test_mirror_held_writes_elsewhere_than_the_credit_ask_the_device():
    assert mirror_at(stamp=3, credit=100).answer(7, 1, frames=3, held=1, held_at=7) is None


def test_mirror_sent_and_held_writes_count_together_against_the_credit():
    mirror = mirror_at(stamp=3, credit=3)
    mirror.sent(THR)
    mirror.sent(THR)
    assert mirror.answer(7, 1, frames=5, held=1, held_at=THR) == b"\x5a"
    assert mirror.answer(7, 1, frames=5, held=2, held_at=THR) is None


def test_mirror_held_writes_after_a_sent_frame_the_credit_does_not_cover_ask_the_device():
    mirror = mirror_at(stamp=3, credit=100)
    mirror.sent(None)  # a read the device applied after the stamp: its values may differ
    assert mirror.answer(7, 1, frames=4, held=1, held_at=THR) is None


def test_mirror_values_are_the_latests_whatever_was_sent_since():
    mirror = mirror_at(stamp=3)
    mirror.sent(None)
    assert mirror.values([4, 7]) == [b"\x02\x03", b"\x5a"]
    assert mirror.values([4, 0]) is None  # one not declared


def test_mirror_values_while_paused_or_one_marked_not_valid_are_none():
    mirror = mirror_at(stamp=3, scr=None)
    assert (mirror.values([7]), mirror.values([1, 7])) == (None, None)
    mirror.paused = True
    assert mirror.values([1]) is None


def test_mirror_read_frame_after_stamp_asks_the_device():
    mirror = mirror_at(stamp=3, credit=100)
    mirror.sent(None)  # a read (or host input) the device applied after the stamp
    assert mirror.answer(1, 1, frames=4) is None


def test_mirror_register_marked_not_valid_asks_the_device():
    assert mirror_at(stamp=3, scr=None).answer(7, 1, frames=3) is None


@pytest.mark.parametrize("offset,size", [(4, 1), (5, 1), (0, 1), (1, 2)])
def test_mirror_read_not_of_a_whole_register_asks_the_device(offset, size):
    assert mirror_at(stamp=3).answer(offset, size, frames=3) is None


def test_mirror_paused_asks_the_device():
    mirror = mirror_at(stamp=3)
    mirror.paused = True
    assert mirror.answer(1, 1, frames=3) is None


def test_mirror_invalidated_asks_the_device():
    mirror = mirror_at(stamp=3)
    mirror.invalidate()
    assert mirror.answer(1, 1, frames=3) is None


def test_mirror_stamp_wraps_with_the_frame_count():
    mirror = mirror_at(stamp=wire.STAMP_MASK, credit=1)
    mirror.sent(THR)
    assert mirror.answer(1, 1, frames=1 << 32) == b"\x01"


def test_mirror_restamped_after_a_forwarded_read_answers():
    mirror = mirror_at(stamp=3)
    mirror.sent(None)  # a read the device answered RESTAMPED: its values hold after it
    mirror.restamp(4)
    assert mirror.answer(1, 1, frames=4) == b"\x01"


def test_mirror_restamp_of_a_dropped_copy_gives_no_values():
    mirror = mirror_at(stamp=3)
    mirror.invalidate()  # a quiesce dropped it
    mirror.restamp(4)
    assert mirror.answer(1, 1, frames=4) is None


# -- news: how often a read asks for the device's (the module docstring) ----------------------
QUIET_WHILE = ((1, 0x02, 0x00), (7, 0x80, 0x00))  # bit 1 of the first byte, bit 7 of the last


class Clock:
    def __init__(self) -> None:
        self.ns = 5_000_000

    def __call__(self) -> int:
        return self.ns


def quiet_mirror(
    first: bytes | None = b"\x01", last: bytes | None = b"\x5a", clock: Clock | None = None
) -> RegisterMirror:
    mirror = RegisterMirror(REGISTERS, QUIET_WHILE, clock or Clock())
    mirror.take(wire.Mirror((first, b"\x02\x03", last), THR, 0, 3))
    return mirror


def dues(mirror: RegisterMirror, reads: int, clock: Clock | None = None, step_ns: int = 0):
    """Whether each of `reads` reads took the news, as the slot does (the channel's drain
    says it was taken); `step_ns` apart on `clock`."""
    due = []
    for _ in range(reads):
        due.append(mirror.news_due())
        if due[-1]:
            mirror.news_taken()
        if clock is not None:
            clock.ns += step_ns
    return due


def test_news_due_at_every_read_of_a_device_that_declares_no_quiet():
    assert dues(mirror_at(stamp=3), 3) == [True] * 3


def test_news_due_once_in_news_every_reads_while_quiet():
    mirror = quiet_mirror()
    mirror.news_taken()
    once = [False] * (NEWS_EVERY - 1) + [True]
    assert dues(mirror, 2 * NEWS_EVERY) == once * 2


def test_news_due_while_quiet_once_it_is_older_than_its_age():
    clock = Clock()
    mirror = quiet_mirror(clock=clock)
    mirror.news_taken()
    step = NEWS_MAX_AGE_NS // 2  # a driver that sleeps between polls
    assert dues(mirror, 6, clock, step) == [False, False, True, False, True, False]


def test_news_due_at_once_for_a_quiet_mirror_never_refreshed_since_it_was_made():
    clock = Clock()
    mirror = quiet_mirror(clock=clock)
    clock.ns += NEWS_MAX_AGE_NS
    assert dues(mirror, 1) == [True]


def test_news_taken_by_another_path_starts_the_count_again():
    mirror = quiet_mirror()
    mirror.news_taken()
    dues(mirror, NEWS_EVERY - 2)
    mirror.news_taken()  # a forwarded read's request, or the console's input
    assert dues(mirror, NEWS_EVERY) == [False] * (NEWS_EVERY - 1) + [True]


@pytest.mark.parametrize(
    ("first", "last"),
    [(b"\x03", b"\x5a"), (b"\x01", b"\x80"), (None, b"\x5a")],
    ids=["first fails", "second fails", "not valid"],
)
def test_news_due_at_every_read_unless_every_condition_holds(first, last):
    mirror = quiet_mirror(first, last)
    mirror.news_taken()
    assert (mirror.quiet, dues(mirror, 3)) == (False, [True] * 3)


def test_news_due_at_once_after_a_mirror_that_is_not_quiet():
    mirror = quiet_mirror()
    mirror.news_taken()
    mirror.news_due()
    mirror.take(wire.Mirror((b"\x02", b"\x02\x03", b"\x5a"), THR, 0, 4))  # THRI-like bit on
    assert dues(mirror, 2) == [True, True]


def test_news_due_at_every_read_once_the_copy_is_dropped():
    mirror = quiet_mirror()
    mirror.news_taken()
    mirror.invalidate()
    assert dues(mirror, 2) == [True, True]


def test_mirror_quiet_answers_with_what_it_has_while_newer_news_waits_unread():
    """The slot's way: a read the news is not due for is answered from the MIRROR taken last,
    whatever the device published since (its full line drained: THRE and TEMT set, here the
    last byte)."""
    mirror = quiet_mirror(last=b"\x00")
    mirror.news_taken()
    newer = wire.Mirror((b"\x01", b"\x02\x03", b"\x60"), THR, 0, 3)  # published, unread
    answers = []
    for _ in range(NEWS_EVERY):
        if mirror.news_due():
            mirror.take(newer)  # what drain_events does with it
            mirror.news_taken()
        answers.append(mirror.answer(7, 1, frames=3))
    assert answers == [b"\x00"] * (NEWS_EVERY - 1) + [b"\x60"]


# -- the MIRROR frame -------------------------------------------------------------------------
def test_mirror_frame_round_trips():
    sent = wire.Mirror((b"\x01", None, b"\x5a"), 0, 0xFFFF, 77)
    assert wire.decode_mirror(wire.encode_mirror(sent, REGISTERS), REGISTERS, WINDOW) == sent


def frame(mask: int, data: bytes, credit_offset: int = 0) -> bytes:
    return wire.FRAME.pack(wire.Op.MIRROR, mask, 1, 5, credit_offset, data)


@pytest.mark.parametrize(
    "buf,why",
    [
        (frame(0b1000, b"\x00" * 8), "mirror gives register 3, the model mirrors 3"),
        (frame(0b111, b"\x01\x02\x03\x04\x05"), "data past its registers"),
        (frame(0b101, b"\x01\x02\x03\x04"), "a value for register 1, marked not valid"),
        (frame(0b111, b"\x01" * 4, credit_offset=8), "credit at offset 0x8, outside"),
        (wire.encode_read_done(5, b"\x00"), "expected MIRROR"),
        (b"\x08" * 23, "frame is 23 bytes"),
    ],
)
def test_mirror_frame_outside_its_declaration_raises_protocol_error(buf, why):
    with pytest.raises(ProtocolError, match=why):
        wire.decode_mirror(buf, REGISTERS, WINDOW)


@pytest.mark.parametrize(
    "registers",
    [
        ((0, 1),) * 9,
        ((0, 8), (8, 1)),
        ((3, 2), (4, 1)),  # overlapping
        ((7, 2),),  # past the window
        ((0, 3),),  # not an access size
    ],
)
def test_mirror_declaration_a_frame_cannot_carry_is_refused(registers):
    with pytest.raises(ValueError, match="serial: mirror"):
        check_mirrored("serial", registers, WINDOW)
