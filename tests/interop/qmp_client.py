#!/usr/bin/env python3
"""Drives a whole migration from a helper through QEMU's own Python QMP client, qemu.qmp
(PyPI), as any QMP tool would: objects sent without newlines, oob negotiated, fds passed
with send_fd_scm before getfd. The destination is another helper or a QEMU started with
-incoming defer (the same client drives both).

Usage: qmp_client.py SRC_SOCKET DST_SOCKET SRC_MEMFD DST_MEMFD SIZE [helper|qemu]
The memfds are inherited fds holding the source's guest RAM and the destination's
(DST_MEMFD is ignored for a QEMU destination, which has its own RAM).
Prints one JSON line with what happened; exits non-zero on any failure.
"""

import asyncio
import json
import socket
import sys
import time

from qemu.qmp import QMPClient


async def add_ram(qmp, memfd, size):
    qmp.send_fd_scm(memfd)
    await qmp.execute("getfd", {"fdname": "mem"})
    await qmp.execute(
        "ram-block-add",
        {"id": "ram", "fdname": "mem", "offset": 0, "size": size},
    )


async def wait_status(qmp, wanted, timeout=120):
    deadline = time.monotonic() + timeout
    while True:
        st = await qmp.execute("query-migrate")
        if st.get("status") in wanted:
            return st
        if st.get("status") == "failed" or time.monotonic() > deadline:
            raise RuntimeError(f"migration did not reach {wanted}: {st}")
        await asyncio.sleep(0.02)


async def main():
    src_path, dst_path = sys.argv[1], sys.argv[2]
    src_mem, dst_mem, size = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    dst_is_qemu = len(sys.argv) > 6 and sys.argv[6] == "qemu"
    src, dst = QMPClient("src"), QMPClient("dst")
    await src.connect(src_path)
    await dst.connect(dst_path)
    greeting = list(src.greeting.QMP.capabilities) if src.greeting else None

    events = []

    async def collect():
        async for ev in dst.events:
            events.append(ev["data"].get("status") if ev["event"] == "MIGRATION" else ev["event"])

    collector = asyncio.create_task(collect())

    await add_ram(src, src_mem, size)
    if not dst_is_qemu:
        await add_ram(dst, dst_mem, size)
    a, b = socket.socketpair()
    src.send_fd_scm(a.fileno())
    await src.execute("getfd", {"fdname": "mig"})
    dst.send_fd_scm(b.fileno())
    await dst.execute("getfd", {"fdname": "mig"})
    a.close()
    b.close()

    version = await src.execute("query-version")
    await dst.execute("migrate-set-capabilities",
                      {"capabilities": [{"capability": "events", "state": True}]})
    await dst.execute("migrate-incoming", {"uri": "fd:mig"})
    await src.execute("migrate-set-parameters", {"max-bandwidth": 0})
    await src.execute("migrate", {"uri": "fd:mig"})
    # exec-oob, which qemu.qmp allows once oob is negotiated: query-migrate is not an
    # oob command in QEMU, so the helper must refuse it the same way.
    oob_error = None
    try:
        await src.execute("query-migrate", oob=True)
    except Exception as e:  # qemu.qmp raises ExecuteError with QEMU's desc
        oob_error = str(e)
    src_end = await wait_status(src, ("completed",))
    dst_end = await wait_status(dst, ("completed",))
    await src.execute("quit")
    if not dst_is_qemu:
        await dst.execute("quit")
    await asyncio.sleep(0.1)
    collector.cancel()
    for qmp in (src, dst):
        # After quit the server hangs up; qemu.qmp reports that as EOFError on disconnect,
        # with QEMU too. (A QEMU destination is left running for the test to read its RAM.)
        try:
            await qmp.disconnect()
        except EOFError:
            pass
    print(json.dumps({
        "greeting": greeting,
        "version": version,
        "oob_error": oob_error,
        "src": src_end,
        "dst": dst_end,
        "dst_events": events,
    }))


asyncio.run(main())
