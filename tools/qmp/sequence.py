#!/usr/bin/env python3
"""Drives a QMP server with QEMU's own client library (qemu.qmp) through a fixed scenario and
prints what it saw as JSON: each command's return or error (class, desc), the events that
followed it (timestamps dropped, JOB_STATUS_CHANGE reduced to its status), and query-jobs
entries. Run it against `qemu-system-x86_64 -qmp` to record fixtures (tools/qmp/record.sh)
and against `vmsnap run --qmp` in tests/qmp_*.rs, which compare the two.

Usage: sequence.py SOCKET snapshot NODE      # snapshot-save/-load/-delete, every error case
       sequence.py SOCKET migrate URI        # migrate with events on, query-migrate polling
       sequence.py SOCKET rawdev NODE RAWNODE # a writable raw node in the jobs' devices
       sequence.py SOCKET protocol           # query-*, unknown commands, bad arguments
       sequence.py SOCKET dirtyrate          # calc-dirty-rate / query-dirty-rate, errors
       sequence.py SOCKET cmd COMMAND JSON   # one command
       sequence.py SOCKET job COMMAND JSON   # one job: events, query-jobs, job-dismiss
"""

import asyncio
import json
import sys

from qemu.qmp import ExecuteError, QMPClient

# Events whose data we keep (their sequences are what clients rely on).
KEEP = {"JOB_STATUS_CHANGE", "STOP", "RESUME", "MIGRATION", "SHUTDOWN"}


def brief(event):
    name = event["event"]
    data = event.get("data", {})
    if name == "JOB_STATUS_CHANGE":
        return f"JOB_STATUS_CHANGE {data['id']} {data['status']}"
    if name == "MIGRATION":
        return f"MIGRATION {data['status']}"
    return name


class Run:
    def __init__(self, qmp):
        self.qmp = qmp
        self.steps = []
        self.listener = None

    async def drain(self, until=None, timeout=60.0):
        """Events received so far; with `until`, waits for that event text first."""
        seen = []
        while True:
            try:
                wait = timeout if until and until not in seen else 0.2
                ev = await asyncio.wait_for(self.listener.get(), wait)
            except asyncio.TimeoutError:
                if until and until not in seen:
                    seen.append(f"TIMEOUT waiting for {until}")
                return seen
            if ev["event"] in KEEP:
                seen.append(brief(ev))

    async def cmd(self, name, args=None, until=None, record=True):
        step = {"execute": name}
        if args:
            step["arguments"] = args
        try:
            ret = await self.qmp.execute(name, args)
            step["return"] = ret
        except ExecuteError as e:
            step["error"] = {"class": e.error_class, "desc": str(e)}
        step["events"] = await self.drain(until)
        if record:
            self.steps.append(step)
        return step

    async def job(self, name, args):
        jid = args["job-id"]
        step = await self.cmd(name, args, until=f"JOB_STATUS_CHANGE {jid} concluded")
        jobs = await self.qmp.execute("query-jobs")
        step["query-jobs"] = [j for j in jobs if j["id"] == jid]
        dis = await self.cmd("job-dismiss", {"id": jid}, until=f"JOB_STATUS_CHANGE {jid} null")
        step["job-dismiss"] = dis.get("return", dis.get("error"))
        self.steps.pop()  # the dismiss is part of this step
        step["dismiss-events"] = dis["events"]
        return step


async def snapshot(run, node):
    dev = {"vmstate": node, "devices": [node]}
    await run.job("snapshot-save", {"job-id": "save0", "tag": "snap0", **dev})
    # Every error case of QEMU 6.0+'s snapshot jobs.
    await run.job("snapshot-save", {"job-id": "e1", "tag": "snap0", **dev})
    await run.job("snapshot-save", {"job-id": "e2", "tag": "x", "vmstate": node, "devices": []})
    await run.job("snapshot-save", {"job-id": "e3", "tag": "x", "vmstate": node,
                                    "devices": ["nosuchnode"]})
    await run.job("snapshot-save", {"job-id": "e4", "tag": "x", "vmstate": "nosuchnode",
                                    "devices": [node]})
    await run.job("snapshot-delete", {"job-id": "e6", "tag": "nosuchtag", "devices": [node]})
    await run.cmd("snapshot-save", {"job-id": "save0x", "tag": "t"})
    await run.job("snapshot-load", {"job-id": "load0", "tag": "snap0", **dev})
    await run.cmd("query-status")
    await run.job("snapshot-delete", {"job-id": "del0", "tag": "snap0", "devices": [node]})
    # A failed load leaves the VM stopped (QEMU's restore-vm state).
    await run.job("snapshot-load", {"job-id": "e5", "tag": "snap0", **dev})
    await run.cmd("query-status")
    await run.cmd("job-dismiss", {"id": "nosuchjob"})


async def rawdev(run, node, raw):
    """A writable raw node among the devices: every job refuses it."""
    both = {"vmstate": node, "devices": [node, raw]}
    await run.job("snapshot-save", {"job-id": "r1", "tag": "t", **both})
    await run.job("snapshot-load", {"job-id": "r2", "tag": "t", **both})
    await run.job("snapshot-delete", {"job-id": "r3", "tag": "t", "devices": [node, raw]})
    await run.cmd("query-status")


async def protocol(run):
    await run.cmd("query-status")
    await run.cmd("stop", until="STOP")
    await run.cmd("query-status")
    await run.cmd("cont", until="RESUME")
    await run.cmd("query-status")
    await run.cmd("no-such-command")
    await run.cmd("query-status", {"bogus": 1})
    await run.cmd("snapshot-delete", {"job-id": "x"})
    await run.cmd("snapshot-delete", {"job-id": 5, "tag": "t", "devices": []})
    await run.cmd("human-monitor-command", {"command-line": "info status"})
    await run.cmd("qmp_capabilities")
    await run.cmd("query-migrate")
    await run.cmd("migrate-set-capabilities",
                  {"capabilities": [{"capability": "nosuch", "state": True}]})
    await run.cmd("getfd", {"fdname": "f"})
    await run.cmd("closefd", {"fdname": "nosuch"})
    await run.cmd("job-cancel", {"id": "nosuch"})


async def migrate(run, uri):
    await run.cmd("migrate-set-capabilities",
                  {"capabilities": [{"capability": "events", "state": True}]})
    # The URI differs from run to run: recorded without it, events after the polling.
    await run.qmp.execute("migrate", {"uri": uri})
    run.steps.append({"execute": "migrate", "return": {}})
    statuses = []
    for _ in range(1200):
        info = await run.qmp.execute("query-migrate")
        st = info.get("status")
        if not statuses or statuses[-1] != st:
            statuses.append(st)
        if st in ("completed", "failed", "cancelled"):
            break
        await asyncio.sleep(0.1)
    run.steps.append({"query-migrate statuses": statuses,
                      "events": await run.drain(until="MIGRATION completed")})
    await run.cmd("query-status")


async def dirtyrate(run):
    """A page-sampling measurement and its refusals. start-time and dirty-rate vary from run to
    run: recorded as their types."""
    def steady(step):
        ret = step.get("return")
        if isinstance(ret, dict):
            for k in ("start-time", "dirty-rate"):
                if k in ret:
                    ret[k] = type(ret[k]).__name__
        return step
    steady(await run.cmd("query-dirty-rate"))
    await run.cmd("calc-dirty-rate", {})
    await run.cmd("calc-dirty-rate", {"calc-time": "1"})
    await run.cmd("calc-dirty-rate", {"calc-time": 0})
    await run.cmd("calc-dirty-rate", {"calc-time": 61})
    await run.cmd("calc-dirty-rate", {"calc-time": 1, "bogus": 1})
    await run.cmd("calc-dirty-rate", {"calc-time": 1, "sample-pages": 256})
    await run.cmd("calc-dirty-rate", {"calc-time": 1})
    steady(await run.cmd("query-dirty-rate"))
    for _ in range(100):
        info = await run.qmp.execute("query-dirty-rate")
        if info.get("status") == "measured":
            break
        await asyncio.sleep(0.1)
    steady(await run.cmd("query-dirty-rate"))


async def main():
    sock, scenario, *rest = sys.argv[1:]
    qmp = QMPClient("sequence")
    await qmp.connect(sock)
    run = Run(qmp)
    with qmp.listener() as listener:
        run.listener = listener
        if scenario == "snapshot":
            await snapshot(run, rest[0])
        elif scenario == "migrate":
            await migrate(run, rest[0])
        elif scenario == "protocol":
            await protocol(run)
        elif scenario == "rawdev":
            await rawdev(run, rest[0], rest[1])
        elif scenario == "dirtyrate":
            await dirtyrate(run)
        elif scenario == "cmd":
            await run.cmd(rest[0], json.loads(rest[1]))
        elif scenario == "job":
            await run.job(rest[0], json.loads(rest[1]))
        else:
            raise SystemExit(f"unknown scenario {scenario}")
    greeting = json.loads(bytes(qmp.greeting._raw)) if qmp.greeting else None
    await qmp.disconnect()
    json.dump({"greeting": greeting, "steps": run.steps}, sys.stdout, indent=1)
    print()


asyncio.run(main())
