"""A minimal client of QEMU's QMP (JSON over a UNIX socket), for benchmarks that drive QEMU."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any


class Qmp:
    """One QMP session: connects (waiting for QEMU to create the socket), reads the greeting
    and leaves capabilities negotiation mode; cmd() runs a command and returns its result."""

    def __init__(self, path: Path, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.002)  # QEMU creates the socket soon after it starts
        self.file = self.sock.makefile("rwb")
        self.events: list[dict[str, Any]] = []
        self._read()  # the greeting
        self.cmd("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self.file.readline()
        if not line:
            raise ConnectionError("QMP: QEMU closed the connection")
        return dict(json.loads(line))

    def cmd(self, name: str, **arguments: object) -> Any:
        self.file.write(json.dumps({"execute": name, "arguments": arguments}).encode() + b"\n")
        self.file.flush()
        while True:
            msg = self._read()
            if "event" in msg:
                self.events.append(msg)
            elif "error" in msg:
                raise RuntimeError(f"QMP {name}: {msg['error']}")
            else:
                return msg["return"]

    def wait_migration(self, timeout: float = 120) -> None:
        """Until query-migrate says completed (polled every ms); RuntimeError if it failed."""
        deadline = time.monotonic() + timeout
        while (status := self.cmd("query-migrate").get("status")) != "completed":
            if status == "failed" or time.monotonic() > deadline:
                raise RuntimeError(f"QMP: migration {status}")
            time.sleep(0.001)

    def close(self) -> None:
        self.file.close()
        self.sock.close()
