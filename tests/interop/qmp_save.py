#!/usr/bin/env python3
"""libvirt's `virsh save --parallel` / `virsh restore --parallel`, through QEMU's own
Python QMP client (qemu.qmp): the saver and the loader get the save file as fds in an fd
set (add-fd, sent with send_fd_scm), with mapped-ram and multifd on, and the stream after
a 4 KiB header of libvirt's own (file:/dev/fdset/N,offset=4096). Each end is a helper or
a QEMU 10.0 (driven identically). The helpers' guest RAM is an inherited memfd.

Usage: qmp_save.py SAVER_SOCK LOADER_SOCK FILE SAVER_KIND LOADER_KIND CHANNELS SIZE
                   SRC_MEMFD DST_MEMFD
KIND is helper or qemu. Prints one JSON line; exits non-zero on any failure.
"""

import asyncio
import json
import os
import sys
import time

from qemu.qmp import QMPClient

HEADER = 4096


async def wait_status(qmp, wanted, timeout=120):
    deadline = time.monotonic() + timeout
    while True:
        st = await qmp.execute("query-migrate")
        if st.get("status") in wanted:
            return st
        if st.get("status") == "failed" or time.monotonic() > deadline:
            raise RuntimeError(f"migration did not reach {wanted}: {st}")
        await asyncio.sleep(0.02)


async def add_fd(qmp, path, flags, opaque):
    fd = os.open(path, flags)
    try:
        qmp.send_fd_scm(fd)
        return await qmp.execute("add-fd", {"opaque": opaque})
    finally:
        os.close(fd)


async def setup(qmp, kind, memfd, size, channels):
    if kind == "helper":
        qmp.send_fd_scm(memfd)
        await qmp.execute("getfd", {"fdname": "mem"})
        await qmp.execute(
            "ram-block-add", {"id": "ram", "fdname": "mem", "offset": 0, "size": size}
        )
    caps = [{"capability": "mapped-ram", "state": True}]
    if channels > 0:
        caps.append({"capability": "multifd", "state": True})
    await qmp.execute("migrate-set-capabilities", {"capabilities": caps})
    if channels > 0:
        await qmp.execute("migrate-set-parameters", {"multifd-channels": channels})


async def main():
    saver_sock, loader_sock, path = sys.argv[1], sys.argv[2], sys.argv[3]
    saver_kind, loader_kind = sys.argv[4], sys.argv[5]
    channels, size = int(sys.argv[6]), int(sys.argv[7])
    src_mem, dst_mem = int(sys.argv[8]), int(sys.argv[9])
    out = {}

    # libvirt's own header comes first; the stream starts after it.
    with open(path, "wb") as f:
        f.write(b"LibvirtQemudSave" + b"\0" * (HEADER - 16))

    saver = QMPClient("saver")
    await saver.connect(saver_sock)
    await setup(saver, saver_kind, src_mem, size, channels)
    info = await add_fd(saver, path, os.O_WRONLY, "save")
    out["saver_fdsets"] = await saver.execute("query-fdsets")
    t0 = time.monotonic()
    await saver.execute(
        "migrate", {"uri": f"file:/dev/fdset/{info['fdset-id']},offset={HEADER}"}
    )
    out["saver"] = await wait_status(saver, ["completed"])
    out["save_secs"] = time.monotonic() - t0
    await saver.execute("remove-fd", {"fdset-id": info["fdset-id"]})
    out["saver_fdsets_after"] = await saver.execute("query-fdsets")
    await saver.disconnect()

    loader = QMPClient("loader")
    await loader.connect(loader_sock)
    await setup(loader, loader_kind, dst_mem, size, channels)
    info = await add_fd(loader, path, os.O_RDONLY, "restore")
    t0 = time.monotonic()
    await loader.execute(
        "migrate-incoming",
        {"uri": f"file:/dev/fdset/{info['fdset-id']},offset={HEADER}"},
    )
    out["loader"] = await wait_status(loader, ["completed"])
    out["restore_secs"] = time.monotonic() - t0
    await loader.disconnect()
    with open(path, "rb") as f:
        out["header"] = f.read(16).decode("ascii", "replace")
        f.seek(HEADER)
        out["magic"] = f.read(4).decode("ascii", "replace")
    print(json.dumps(out))


asyncio.run(main())
