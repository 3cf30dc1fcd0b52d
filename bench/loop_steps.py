"""Bench row 2's busy phase under a microscope (issue 16; not a bench row): the same snapshots during
full-speed turns as bench/inproc.py ``snapshots``, with the event loop's CPU time per round trip
(``time.thread_time``: load-insensitive, unlike the row's wall clock), the cyclic collector's passes
(``gc.callbacks``) and, unless NOINST=1, a trio Instrument's step lengths per task (wall and CPU) and
what the slowest 2% of round trips ran. PROF=file writes a cProfile of the busy phase.

    PYTHONPATH=. .venv/bin/python bench/loop_steps.py 5000 30 5000          # samples, seconds, words
    NOINST=1 PYTHONPATH=. .venv/bin/python bench/loop_steps.py 5000 30 5000 # without the instrument
"""
import sys, os, time, json, collections
import trio
from bench import datagen
from bench.util import pct, temp_dir

class Steps(trio.abc.Instrument):
    def __init__(self):
        self.on = False
        self.rows = []  # (name, wall, cpu)
        self.batches = []
        self._b = None
        self.io = []
    def before_task_step(self, task):
        self.t0 = time.perf_counter(); self.c0 = time.thread_time()
    def after_task_step(self, task):
        if self.on:
            self.rows.append((task.name, time.perf_counter() - self.t0, time.thread_time() - self.c0))
    def before_io_wait(self, timeout):
        self.i0 = time.perf_counter(); self.ic0 = time.thread_time(); self.to = timeout
    def after_io_wait(self, timeout):
        if self.on:
            self.io.append((time.perf_counter() - self.i0, time.thread_time() - self.ic0, timeout))

async def main(n, seconds, words):
    from runtime import Runtime, RuntimeConfig
    import os
    import runtime; print(runtime.__file__, file=sys.stderr)
    inst = Steps()
    if not os.environ.get('NOINST'): trio.lowlevel.add_instrument(inst)
    with temp_dir("snap") as d:
        conn = datagen.open_db(d)
        (tid,) = datagen.add_threads(conn, 1, turns=10, events_per_thread=80)
        conn.close()
        async with Runtime.open(RuntimeConfig(data_dir=d)) as rt:
            await rt.get_session_snapshot(tid)
            idle = []; idlec = []
            for _ in range(n):
                c0 = time.thread_time(); t0 = time.perf_counter(); await rt.get_session_snapshot(tid); idle.append(time.perf_counter() - t0); idlec.append(time.thread_time() - c0)
            prompt = datagen.text(words)
            busy = []; busyc = []; spans = []; turns = 0
            import gc
            gcs = []; gst = {}
            def gccb(phase, info):
                if phase == 'start': gst['t'] = time.perf_counter()
                else: gcs.append((info['generation'], time.perf_counter() - gst['t'], info['collected']))
            gc.callbacks.append(gccb)
            inst.on = True
            nobj0 = len(gc.get_objects()); backlog = []
            import cProfile, os
            prof = cProfile.Profile() if os.environ.get('PROF') else None
            if prof: prof.enable()
            deadline = time.perf_counter() + seconds
            while len(busy) < n and time.perf_counter() < deadline:
                if rt.manager.engine(tid).active is None:
                    await rt.start_turn(tid, prompt); turns += 1
                    await trio.sleep(0)
                k0 = len(inst.rows); q0 = len(inst.io)
                c0 = time.thread_time(); t0 = time.perf_counter()
                s = await rt.get_session_snapshot(tid)
                dt = time.perf_counter() - t0; dc = time.thread_time() - c0
                backlog.append(rt.store._write_rx.statistics().current_buffer_used)
                if s.turn_in_progress:
                    busy.append(dt); busyc.append(dc); spans.append((dt, dc, k0, len(inst.rows), q0, len(inst.io)))
            inst.on = False
            gc.callbacks.remove(gccb)
            print("objects", nobj0, "->", len(gc.get_objects()), "backlog p50", pct(backlog, 50), "max", max(backlog))
            for g in range(3):
                d = [x[1] for x in gcs if x[0] == g]
                if d: print(f"gc gen{g}: n={len(d)} total {sum(d)*1e3:.1f} ms p50 {pct(d,50)*1e6:.0f} max {max(d)*1e6:.0f} us collected {sum(x[2] for x in gcs if x[0]==g)}")
            if prof:
                prof.disable(); prof.dump_stats(os.environ['PROF'])
    print(f"idle p50 {pct(idle,50)*1e6:.0f} p99 {pct(idle,99)*1e6:.0f} us; busy p50 {pct(busy,50)*1e6:.0f} p99 {pct(busy,99)*1e6:.0f} us ratio {pct(busy,99)/pct(idle,99):.2f} samples {len(busy)} turns {turns}")
    print(f"CPU/roundtrip: idle p50 {pct(idlec,50)*1e6:.0f} p99 {pct(idlec,99)*1e6:.0f}; busy p50 {pct(busyc,50)*1e6:.0f} p99 {pct(busyc,99)*1e6:.0f} p99.5 {pct(busyc,99.5)*1e6:.0f} us")
    if os.environ.get('NOINST'): return
    by = collections.defaultdict(list)
    for name, w, c in inst.rows:
        short = name.split(".")[-1][:40]
        by[short].append((w, c))
    allw = [w for _, w, _ in inst.rows]
    print(f"steps {len(allw)} p50 {pct(allw,50)*1e6:.0f} p99 {pct(allw,99)*1e6:.0f} p99.9 {pct(allw,99.9)*1e6:.0f} max {max(allw)*1e6:.0f} us")
    for k, v in sorted(by.items(), key=lambda kv: -sum(w for w, _ in kv[1])):
        ws = [w for w, _ in v]; cs = [c for _, c in v]
        print(f"{k:42s} n={len(v):7d} total={sum(ws)*1e3:8.1f}ms cpu={sum(cs)*1e3:8.1f}ms p50={pct(ws,50)*1e6:6.0f} p99={pct(ws,99)*1e6:6.0f} max={max(ws)*1e6:7.0f} us  cpu p99={pct(cs,99)*1e6:6.0f}")
    iw = [w for w, c, t in inst.io if t == 0]; ic = [c for w, c, t in inst.io if t == 0]
    print(f"io waits(timeout 0) n={len(iw)} wall total {sum(iw)*1e3:.1f}ms p50 {pct(iw,50)*1e6:.0f} p99 {pct(iw,99)*1e6:.0f}; cpu total {sum(ic)*1e3:.1f}ms p50 {pct(ic,50)*1e6:.0f} p99 {pct(ic,99)*1e6:.0f}; nonzero-timeout waits {len(inst.io)-len(iw)}")
    spans.sort(key=lambda r: -r[1])
    agg = collections.Counter(); aggc = collections.Counter(); nio = 0; iot = 0
    top = spans[:len(spans)//50]
    for dt, dc, k0, k1, q0, q1 in top:
        for name, w, c in inst.rows[k0:k1]:
            agg[name.split('.')[-1][:30]] += 1; aggc[name.split('.')[-1][:30]] += c
        nio += q1 - q0; iot += sum(c for w, c, t in inst.io[q0:q1])
    print(f"slowest 2% by cpu ({len(top)}): cpu from {top[-1][1]*1e6:.0f} us; per sample:", {k: (round(agg[k]/len(top),2), round(aggc[k]/len(top)*1e6)) for k in agg}, "io waits", round(nio/len(top),2), round(iot/len(top)*1e6))
    mid = spans[len(spans)//2 - len(spans)//50: len(spans)//2 + len(spans)//50]
    agg = collections.Counter(); aggc = collections.Counter(); nio = 0; iot = 0
    for dt, dc, k0, k1, q0, q1 in mid:
        for name, w, c in inst.rows[k0:k1]:
            agg[name.split('.')[-1][:30]] += 1; aggc[name.split('.')[-1][:30]] += c
        nio += q1 - q0; iot += sum(c for w, c, t in inst.io[q0:q1])
    print(f"median 4% ({len(mid)}): per sample:", {k: (round(agg[k]/len(mid),2), round(aggc[k]/len(mid)*1e6)) for k in agg}, "io waits", round(nio/len(mid),2), round(iot/len(mid)*1e6))
    long = sorted(inst.rows, key=lambda r: -r[1])[:15]
    for name, w, c in long:
        print(f"  long {name[-50:]:50s} wall {w*1e6:7.0f} cpu {c*1e6:7.0f}")

if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]))
