#!/usr/bin/env python3
"""Talk to a VM's QMP passthrough endpoint directly, with QEMU's own client library
(qemu.qmp), independently of libvirt and of ozone's code.

    scripts/qmp-client.py tcp:127.0.0.1:24330 query-status
    scripts/qmp-client.py unix:/var/lib/libvirt/qemu/x.qmp query-name
"""

from __future__ import annotations

import asyncio
import json
import sys

from qemu.qmp import QMPClient


async def execute(endpoint: str, command: str, arguments: dict[str, object] | None) -> object:
    client = QMPClient("ozone-demo")
    if endpoint.startswith("tcp:"):
        host, _, port = endpoint[4:].rpartition(":")
        address: str | tuple[str, int] = (host, int(port))
    elif endpoint.startswith("unix:"):
        address = endpoint[5:]
    else:
        raise SystemExit(f"not a QMP endpoint: {endpoint!r} (expected tcp:HOST:PORT or unix:PATH)")
    await asyncio.wait_for(client.connect(address), timeout=10)
    try:
        return await client.execute(command, arguments)
    finally:
        await client.disconnect()


def main() -> None:
    if len(sys.argv) not in (3, 4):
        raise SystemExit(__doc__)
    arguments = json.loads(sys.argv[3]) if len(sys.argv) == 4 else None
    result = asyncio.run(execute(sys.argv[1], sys.argv[2], arguments))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
