"""ReplayBuffer: the DGL authors' rule (issue 3, item 5) against a reference model."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bpsim.replay import ReplayBuffer


class Reference:
    """Obvious O(M) model of the rule: overwrite oldest; serve least-read, newest on ties."""

    def __init__(self, capacity, max_reuse):
        self.capacity, self.max_reuse = capacity, max_reuse
        self.entries = []  # [seq, item, step, reads], oldest first
        self.retired = []
        self.seq = 0
        self.last = None
        self.stale = []

    def put(self, item, step):
        if len(self.entries) == self.capacity:
            self.retired.append(self.entries.pop(0)[3])
        self.entries.append([self.seq, item, step, 0])
        self.seq += 1
        self.last = step

    def get(self):
        ok = [e for e in self.entries if self.max_reuse is None or e[3] < self.max_reuse]
        if not ok:
            return None
        e = min(ok, key=lambda e: (e[3], -e[0]))
        e[3] += 1
        self.stale.append(self.last - e[2])
        return e[1]


ops = st.lists(st.one_of(st.just("get"), st.integers(0, 10**6)), max_size=200)


@settings(max_examples=150, deadline=None)
@given(capacity=st.integers(1, 8), max_reuse=st.one_of(st.none(), st.integers(1, 4)), seq=ops)
def test_matches_reference_model(capacity, max_reuse, seq):
    buf, ref = ReplayBuffer(capacity, max_reuse), Reference(capacity, max_reuse)
    step = 0
    for op in seq:
        if op == "get":
            assert buf.get() == ref.get()
        else:
            buf.put(op, step=step)
            ref.put(op, step)
            step += 1
        assert len(buf) == len(ref.entries)
    assert buf.reads() == [e[3] for e in ref.entries]
    assert buf.reuse_counts() == ref.retired + [e[3] for e in ref.entries]
    assert buf.staleness() == ref.stale
    used = [r for r in buf.reuse_counts() if r > 0]
    if used:
        assert buf.reuse_mean == pytest.approx(sum(used) / len(used))


def test_empty_and_exhausted_return_none():
    buf = ReplayBuffer(3, max_reuse=2)
    assert buf.get() is None
    buf.put("a")
    assert buf.get() == "a" and buf.get() == "a"
    assert buf.get() is None                 # used up
    buf.put("b")
    assert buf.get() == "b"


def test_overwrites_oldest_and_serves_newest_first():
    buf = ReplayBuffer(2)
    for x in "abc":
        buf.put(x)
    assert len(buf) == 2
    assert [buf.get(), buf.get(), buf.get()] == ["c", "b", "c"]
    assert buf.reuse_counts() == [0, 1, 2]    # 'a' evicted unread
    assert buf.reuse_mean == 1.5


def test_staleness_with_explicit_now():
    buf = ReplayBuffer(4)
    buf.put("x", step=3)
    assert buf.get(with_staleness=True, now=7) == ("x", 4)
    buf.put("y")                              # no step: no staleness sample
    assert buf.get(with_staleness=True) == ("y", None)
    assert buf.staleness() == [4]
    assert buf.staleness_mean == 4


@pytest.mark.parametrize("kw", [dict(capacity=0), dict(capacity=-1), dict(capacity=2.5),
                                dict(capacity=3, max_reuse=0), dict(capacity=3, max_reuse=1.5)])
def test_bad_arguments_say_what_to_do(kw):
    with pytest.raises(ValueError, match=">= 1"):
        ReplayBuffer(**kw)


def test_thread_safe_under_concurrent_put_and_get():
    buf = ReplayBuffer(16)
    got = []

    def producer():
        for i in range(5000):
            buf.put(i, step=i)

    def consumer():
        for _ in range(5000):
            x = buf.get()
            if x is not None:
                got.append(x)

    ts = [threading.Thread(target=producer), threading.Thread(target=consumer)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert buf.n_puts == 5000
    assert buf.n_gets == len(got)
    assert sum(buf.reuse_counts()) == len(got)
    assert len(buf) == 16


def test_no_torch_import():
    import subprocess
    import sys
    code = "import bpsim.replay, bpsim.trace, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_state_dict_round_trip_continues_identically():
    """A buffer restored from its state_dict answers every later get like the original."""
    a = ReplayBuffer(4, max_reuse=3)
    for i in range(7):
        a.put(i, step=i)
        if i % 2:
            a.get()
    b = ReplayBuffer.from_state_dict(a.state_dict())
    assert b.stats() == a.stats() and len(b) == len(a)
    for i in range(7, 12):
        a.put(i, step=i)
        b.put(i, step=i)
        for _ in range(2):
            assert a.get(with_staleness=True, now=i) == b.get(with_staleness=True, now=i)
    assert b.stats() == a.stats()
