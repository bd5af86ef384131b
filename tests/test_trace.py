"""Trace schema: statistics, checks, Chrome export/import (bpsim.chrome), atomic save."""

from __future__ import annotations

import json
import os

import pytest

from bpsim.trace import Span, Trace, TraceError


def small() -> Trace:
    return Trace([
        Span(0, "compute", "fwd", 1, 0, t0=0.0, t1=1.0),
        Span(0, "comm", "send", 1, 0, t0=1.0, t1=1.25, msg=7),
        Span(1, "comm", "recv", 2, 0, t0=1.1, t1=1.35, msg=7),
        Span(1, "compute", "fwd", 2, 0, t0=1.35, t1=2.35),
        Span(0, "compute", "aux", 1, 0, t0=1.0, t1=1.2),
        Span(1, "compute", "wait", 2, 1, t0=2.35, t1=3.0),
    ], meta={"algo": "dgl", "blocks": 2})


def test_span_fields_and_defaults():
    s = Span(2, "compute", "bwd", 3, 5, t0=1.5, t1=2.0)
    assert s.microbatch == 0 and s.msg is None and s.duration == 0.5
    with pytest.raises(Exception):
        s.t0 = 0.0                       # frozen


def test_statistics():
    t = small()
    assert t.makespan == 3.0
    assert t.busy(0) == pytest.approx(1.2)
    assert t.busy(1) == pytest.approx(1.0)            # wait excluded
    assert t.busy_fraction() == pytest.approx({0: 0.4, 1: 1 / 3})
    assert t.ranks == [0, 1] and len(t) == 6


def test_overlap():
    # small(): rank 0 computes over [0, 1.2], rank 1 over [1.35, 2.35] (the
    # wait and the comm spans do not count): they never compute at once
    assert small().overlap() == 0.0
    t = Trace([Span(0, "compute", "fwd", 1, 0, t0=0.0, t1=2.0),
               Span(1, "compute", "fwd", 2, 0, t0=1.0, t1=3.0),
               Span(1, "compute", "wait", 2, 1, t0=3.0, t1=9.0),
               Span(0, "comm", "send", 1, 0, t0=2.0, t1=9.0)])
    # [1, 2] is shared: 2 of the 4 busy seconds
    assert t.overlap() == pytest.approx(0.5)
    assert t.span_overlaps() == [pytest.approx(0.5), pytest.approx(0.5), None, None]
    assert t.overlap("comm") == 0.0
    assert Trace([Span(0, "compute", "fwd", 1, 0, t0=0.0, t1=1.0)]).overlap() == 0.0
    assert Trace([]).overlap() == 0.0
    # back to back on one rank beside a long op on the other: all shared
    t = Trace([Span(0, "compute", "fwd", 1, 0, t0=0.0, t1=1.0),
               Span(0, "compute", "bwd", 1, 0, t0=1.0, t1=2.0),
               Span(1, "compute", "fwd", 2, 0, t0=0.0, t1=2.0)])
    assert t.overlap() == pytest.approx(1.0)


def test_overlap_of_simulated_schedules():
    from bpsim.sim import Costs, simulate

    c = Costs(fwd=1.0, bwd=2.0, aux=0.2, update=0.1, comm=0.05)
    # bp takes turns, except that block 2's update [U] runs while its gradient
    # travels (c) and block 1's backward begins: U - c = 0.05 of each step's
    # 2 (F + B + U) = 6.2 busy seconds is shared, on both ranks
    assert simulate("bp", blocks=2, steps=20, costs=c).trace.overlap() == pytest.approx(0.1 / 6.2)
    assert simulate("dgl", blocks=2, steps=20, costs=c).trace.overlap() > 0.9   # pipelined


def test_check_accepts_valid_and_rejects_overlap():
    small().check()
    bad = Trace([Span(0, "compute", "fwd", 1, 0, t0=0.0, t1=1.0),
                 Span(0, "compute", "bwd", 1, 0, t0=0.5, t1=2.0)])
    with pytest.raises(ValueError, match="overlapping spans on rank 0"):
        bad.check()
    # the same times on different lanes or ranks are fine; zero-length markers too
    Trace([Span(0, "compute", "fwd", 1, 0, t0=0.0, t1=1.0),
           Span(0, "comm", "send", 1, 0, t0=0.5, t1=0.5),
           Span(1, "compute", "fwd", 2, 0, t0=0.0, t1=1.0)]).check()


def test_check_rejects_recv_before_send():
    t = Trace([Span(0, "comm", "send", 1, 0, t0=2.0, t1=2.5, msg=1),
               Span(1, "comm", "recv", 2, 0, t0=0.0, t1=1.0, msg=1)])
    with pytest.raises(ValueError, match="before its send"):
        t.check()


def test_chrome_export_structure():
    obj = small().to_chrome(pid=3)
    ev = obj["traceEvents"]
    names = {e["args"]["name"] for e in ev if e.get("name") == "thread_name"}
    assert names == {"rank 0 compute", "rank 0 comm", "rank 1 compute", "rank 1 comm"}
    xs = [e for e in ev if e["ph"] == "X"]
    assert len(xs) == 6 and all(e["pid"] == 3 for e in ev)
    fwd = next(e for e in xs if e["name"] == "fwd" and e["args"]["block"] == 2)
    assert fwd["ts"] == pytest.approx(1.35e6) and fwd["dur"] == pytest.approx(1e6)
    tids = {(e["args"]["rank"], e["args"]["lane"]): e["tid"] for e in xs}
    assert len(set(tids.values())) == len(tids)
    s = [e for e in ev if e["ph"] == "s"]
    f = [e for e in ev if e["ph"] == "f"]
    assert len(s) == len(f) == 1 and s[0]["id"] == f[0]["id"] == 7
    assert s[0]["tid"] == tids[(0, "comm")] and f[0]["tid"] == tids[(1, "comm")]
    json.dumps(obj, allow_nan=False)


def test_round_trip_is_exact(tmp_path):
    t = small()
    t.append(Span(1, "compute", "bwd", 2, 0, 3, t0=0.1 + 0.2, t1=1 / 3))  # awkward floats
    back = Trace.from_chrome(json.loads(json.dumps(t.to_chrome())))
    assert back.spans == t.spans and back.meta == t.meta
    p = tmp_path / "sub" / "t.json"
    t.save(p)
    assert Trace.load(p) == t
    assert not [f for f in os.listdir(p.parent) if f.startswith(".tmp")]


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Trace.load(tmp_path / "missing.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        Trace.load(tmp_path / "x.json")
    with pytest.raises(ValueError, match="not a Chrome trace"):
        Trace.from_chrome({"foo": 1})


@pytest.mark.parametrize("content,msg", [
    ("[1, 2, 3]", "event 0 must be an object"),
    ('{"traceEvents": "x"}', "must be a list"),
    ('{"traceEvents": [{"ph": "X", "name": "fwd", "ts": 0, "dur": 1}]}', "no args"),
    ('{"traceEvents": [{"ph": "X", "name": "fwd", "args": {"block": 1, "step": 0, '
     '"t0": NaN, "t1": 1}}]}', "finite"),
    ('{"traceEvents": [{"ph": "X", "name": "fwd", "args": {"block": 1, "step": 0, '
     '"t0": 2, "t1": 1}}]}', "ends before it starts"),
])
def test_load_names_the_file_and_the_problem(tmp_path, content, msg):
    p = tmp_path / "bad.json"
    p.write_text(content)
    with pytest.raises(TraceError, match=msg) as e:
        Trace.load(p)
    assert "bad.json" in str(e.value)


def test_load_refuses_binary_data_and_folders(tmp_path):
    (tmp_path / "b.json").write_bytes(bytes(range(256)))
    with pytest.raises(TraceError, match="b.json.*not a text file"):
        Trace.load(tmp_path / "b.json")
    with pytest.raises(TraceError, match="folder"):
        Trace.load(tmp_path)


def test_load_runs_check(tmp_path):
    t = Trace([Span(0, "compute", "fwd", 1, 0, t0=0.0, t1=2.0),
               Span(0, "compute", "bwd", 1, 0, t0=1.0, t1=3.0)])
    p = tmp_path / "overlap.json"
    t.save(p)                                   # save writes what it is given
    with pytest.raises(TraceError, match="overlap.json.*overlapping"):
        Trace.load(p)


def test_save_refuses_a_folder_before_writing(tmp_path):
    with pytest.raises(ValueError, match="is a folder"):
        small().save(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_from_rows_is_lazy():
    rows = [(0, "compute", "fwd", 1, i, 0, float(i), i + 0.5, None) for i in range(10)]
    t = Trace.from_rows(rows)
    assert t.rows is rows and t._spans is None
    assert t.spans[3] == Span(0, "compute", "fwd", 1, 3, t0=3.0, t1=3.5)


def test_without_warmup_drops_first_steps_and_orphaned_messages():
    t = Trace([
        Span(0, "compute", "fwd", 1, 0, t0=0.0, t1=5.0),           # slow warm-up step
        Span(0, "comm", "send", 1, 0, t0=5.0, t1=5.1, msg=1),
        Span(1, "comm", "recv", 2, 1, t0=5.0, t1=5.2, msg=1),      # its recv counts in step 1
        Span(0, "compute", "fwd", 1, 1, t0=6.0, t1=7.0),
        Span(0, "comm", "send", 1, 1, t0=7.0, t1=7.1, msg=2),
        Span(1, "comm", "recv", 2, 1, t0=7.0, t1=7.2, msg=2),
    ], meta={"algo": "dgl"})
    w = t.without_warmup(1)
    assert [r[4] for r in w.rows] == [0, 0, 0, 0]
    assert w.start == 5.0 and w.makespan == pytest.approx(2.2)
    assert [r[8] for r in w.rows if r[2] == "recv"] == [None, 2]   # message 1 lost its send
    w.check()
    assert t.without_warmup(0).rows == [r[:8] + (r[8],) for r in t.rows]
    assert w.meta["warmup_steps_dropped"] == 1 and t.meta == {"algo": "dgl"}
    with pytest.raises(ValueError, match="warm-up"):
        t.without_warmup(-1)


def test_without_warmup_renumbers_the_meta_steps_and_buffer_reads():
    from bpsim import sim

    t = sim.simulate("dgl-async", blocks=2, steps=12, costs="fwd=1,bwd=2,comm=0.1",
                     slowdown={2: 2.0}).trace
    w = t.without_warmup(3)
    assert w.meta["steps"] == 9 and t.meta["steps"] == 12
    reads = t.meta["buffer_reads"]["2"]
    assert w.meta["buffer_reads"]["2"] == [[s - 3, p - 3, c] for s, p, c in reads if s >= 3 and p >= 3]
