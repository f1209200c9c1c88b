"""The demonstration's judge (pyiommufd.vm.vmm_demo.judge) fails each promise
it checks: it cannot pass a rebooted guest, a changed RAM pattern, an
unfinished session or a leaked fd."""
from __future__ import annotations

import copy

import pytest

from pyiommufd.vm import vmm_demo
from pyiommufd.vm.nested_guest import CHECK_EVERY, parse_console

BOOT, SUM = "b00t", "a" * 64


def console(ticks: range, boot: str = BOOT, pattern: str = SUM, boots: int = 1) -> str:
    """What the nested guest prints: ``boots`` boot lines, then ``ticks``."""
    lines = [f"nested: boot {boot} pattern-sha256 {pattern}"] * boots
    for n in ticks:
        lines.append(f"nested: tick {n} uptime {n + 0.5:.2f} boot {boot}")
        if n % CHECK_EVERY == 0:
            lines.append(f"nested: check {n} pattern-sha256 {pattern}")
    return "\n".join(lines) + "\n"


GOOD_RECORDS = [
    {"last_tick": 10, "qemu_alive_after_update": False, "updated": {"state_bytes": 284725},
     "handoff": {"bdf": "0000:00:04.0", "pages": 256, "translated": 256,
                 "qmp": [{"qdev_id": "pyiommufd-dev0", "vendor": 0x1AF4, "device": 0x1041, "class": "Ethernet"}]},
     "agent_status": {"sessions": [{"name": "demo", "direction": "outgoing", "tokens": [
         {"token": 0, "kind": "manifest"}, {"token": 1, "kind": "memfd"}, {"token": 2, "kind": "memfd"}]}]}},
    {"agent_status": {"sessions": [{"name": "demo", "direction": "outgoing", "tokens": [{"token": 1}]}]},
     "agent_fds": {"before_resume": 5, "after_resume": 7, "after_stop": 5}},
]


def test_a_guest_that_went_on_passes():
    problems, state = vmm_demo.judge(console(range(1, 26)), GOOD_RECORDS)
    assert problems == [] and state.ticks[-1].number == 25


@pytest.mark.parametrize("text, words", [
    (console(range(1, 11)) + console(range(1, 16), boot="other"), "booted 2 times"),
    (console(range(1, 11)) + console(range(1, 16), boots=0), "counter"),
    (console(range(1, 11)) + console(range(11, 26), pattern="b" * 64, boots=0), "sha256 changed"),
    (console(range(1, 14)), "only 3 ticks after the resume"),
])
def test_what_a_reboot_or_a_lost_page_looks_like_fails(text, words):
    problems, _ = vmm_demo.judge(text, GOOD_RECORDS)
    assert any(words in p for p in problems), problems


@pytest.mark.parametrize("change, words", [
    (lambda r: r[1]["agent_status"]["sessions"].append({"name": "demo", "direction": "incoming"}),
     "not finished"),
    (lambda r: r[1]["agent_fds"].update(after_stop=6), "leaked 1 fds"),
    (lambda r: r[1]["agent_fds"].update(after_resume=8), "not 2"),
    (lambda r: r[0].update(qemu_alive_after_update=True), "QEMU still ran"),
    (lambda r: r[0]["agent_status"]["sessions"][0]["tokens"][2].update(kind="other"), "not a memfd"),
    (lambda r: r[0]["handoff"].update(translated=255), "255 of 256"),
    (lambda r: r[0]["handoff"].update(qmp=[]), "did not realize the device"),
    (lambda r: r.pop(), "1 of 2 stage records"),
])
def test_each_broken_promise_fails(change, words):
    records = copy.deepcopy(GOOD_RECORDS)
    change(records)
    problems, _ = vmm_demo.judge(console(range(1, 26)), records)
    assert any(words in p for p in problems), problems


def test_the_console_parser_reads_what_the_guest_prints():
    state = parse_console("noise\n" + console(range(1, 21)) + "[  3.1] kernel line\n")
    assert state.boots == [(BOOT, SUM)] and [t.number for t in state.ticks] == list(range(1, 21))
    assert state.checks == [(10, SUM), (20, SUM)]
