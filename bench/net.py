"""virtio-net throughput: guest -> host and host -> guest, next to a veth pair (the floor).

In a network namespace of its own (made and removed here; needs root), the bench makes a
TAP (svbench0, 10.77.0.1/24) and boots the virtio-net test guest (tests/guests/virtio_net.c,
written from the virtio spec; it polls its rings at CPL3) on it through `splitvmm up`:
- guest -> host: `mode=burst`: COUNT UDP datagrams of 1472 payload bytes (1514-byte frames),
  as fast as the transmit ring takes them; the guest times its side (TSC), and a host socket
  counts what arrived;
- host -> guest: `mode=sink`: the host sends COUNT datagrams as fast as one socket can; the
  guest counts and checks each, timing from the first to the last.
The floor, in the same run: the same host sender and receiver across the two ends of a veth
pair between two namespaces (what the host's stack and one Python socket can do, with no
VMM in between). Figures are medians of RUNS runs; frames/s and MiB/s of UDP payload.

    sudo python bench/net.py [--runs R] [--count N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.vmrun import host_tsc_khz  # noqa: E402
from tests.guests.build import build_guests  # noqa: E402

NS = f"svbench{os.getpid()}"
PEER_NS = f"{NS}p"
TAP = "svbench0"
HOST_IP, GUEST_IP = "10.77.0.1", "10.77.0.2"
VETH_A, VETH_B = "svbencha", "svbenchb"
VETH_A_IP, VETH_B_IP = "10.78.0.1", "10.78.0.2"
PORT = 9000
SIZE = 1472  # UDP payload of a 1514-byte Ethernet frame
OK = 33
MIB = 1 << 20
RATE = re.compile(r"ticks=(\d+) us=(\d+) frames_s=([\d.]+) mib_s=([\d.]+)")
RECEIVED = re.compile(r"sink received=(\d+) of")
SOCKET_BUFFER = 32 << 20
# <asm-generic/socket.h>: set a socket buffer past net.core.[rw]mem_max (root); the socket
# module has no names for them.
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def in_ns(ns: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def payload(seq: int) -> bytes:
    """The guest's datagram pattern (tests/guests/README.md): seq, then (seq + j) & 0xff."""
    return seq.to_bytes(8, "little") + bytes((seq + j) & 0xFF for j in range(8, SIZE))


def receive(bind: str, count: int, ready: threading.Event) -> list[float]:
    """Count datagrams on bind:PORT until `count` or 2 s of silence: [n, seconds first->last]."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, SOCKET_BUFFER)
    sock.bind((bind, PORT))
    sock.settimeout(2)
    ready.set()
    n, first, last = 0, 0.0, 0.0
    try:
        while n < count:
            sock.recv(2048)
            last = time.perf_counter()
            first = first or last
            n += 1
    except TimeoutError:
        pass
    finally:
        sock.close()
    return [n, last - first]


def send(dest: str, count: int) -> float:
    """Send `count` datagrams to dest:PORT as fast as one socket can; seconds taken."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, SOCKET_BUFFER)
    packets = [payload(i) for i in range(256)]
    start = time.perf_counter()
    for i in range(count):
        sock.sendto(packets[i % 256], (dest, PORT))
    took = time.perf_counter() - start
    sock.close()
    return took


def guest_rates(found: re.Match[str], tsc_khz: int) -> tuple[float, float]:
    """The guest's frames/s and MiB/s over its ticks at the vCPU's TSC rate (KVM's): the
    guest converts them with a rate it measured against the PIT, too high whenever its vCPU
    was preempted in that 50 ms (up to 1.24x seen here), inflating the run's figures."""
    ticks, us = int(found[1]), int(found[2])
    scale = (us / 1e6) / (ticks / (tsc_khz * 1e3))  # the guest's seconds over the true ones
    return float(found[3]) * scale, float(found[4]) * scale


def rates(n: float, seconds: float) -> tuple[float, float]:
    return (n / seconds, n * SIZE / seconds / MIB) if seconds > 0 else (0.0, 0.0)


# -- inside the namespace (the bench re-runs itself there) ---------------------------------------
def setup_inside() -> None:
    sh("ip", "link", "set", "lo", "up")
    sh("ip", "tuntap", "add", "dev", TAP, "mode", "tap", "vnet_hdr")
    sh("ip", "addr", "add", f"{HOST_IP}/24", "dev", TAP)
    # A queue deep enough for a burst: while the guest is slower than the sender, frames
    # wait in the TAP (the device reads it only when buffers are posted) instead of being
    # dropped by the host's qdisc at its default 500.
    sh("ip", "link", "set", TAP, "up", "txqueuelen", "20000")


def guest_config(work: Path, image: Path, cmdline: str, serial: Path) -> Path:
    config = work / "vm.toml"
    config.write_text(
        f'[vm]\nname = "bench-net"\nmemory = "64M"\n[boot]\nkernel = "{image}"\n'
        f'cmdline = "{cmdline}"\n'
        f'[[device]]\nname = "serial0"\nmodel = "serial"\noutput = "{serial}"\n'
        f'[[device]]\nname = "net0"\nmodel = "virtio-net"\ntap = "{TAP}"\n'
    )
    return config


def run_guest(work: Path, image: Path, cmdline: str, host_side: object) -> str:
    """`splitvmm up` the net guest with `cmdline`; `host_side(serial_path, proc)` runs
    meanwhile. The guest's serial output."""
    serial = work / "serial.log"
    serial.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "splitvmm", "up", str(guest_config(work, image, cmdline, serial))]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    host_side(serial, proc)  # type: ignore[operator]
    _, err = proc.communicate(timeout=300)
    text = serial.read_text(errors="replace") if serial.exists() else ""
    if proc.returncode != OK:
        raise SystemExit(f"splitvmm: status {proc.returncode}:\n{err}{text[-2000:]}")
    return text


def wait_line(serial: Path, pattern: str, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if serial.exists() and pattern in serial.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            return
        time.sleep(0.01)


def guest_to_host(work: Path, image: Path, count: int) -> dict[str, float]:
    result: list[float] = []
    ready = threading.Event()

    def host_side(serial: Path, proc: subprocess.Popen[str]) -> None:
        worker = threading.Thread(target=lambda: result.extend(receive(HOST_IP, count, ready)))
        worker.start()
        ready.wait()
        worker.join()

    cmdline = f"mode=burst count={count} size={SIZE} ip={GUEST_IP} peer_ip={HOST_IP} port={PORT}"
    text = run_guest(work, image, cmdline, host_side)
    found = RATE.search(text.split("burst sent=")[-1])
    if found is None:
        raise SystemExit(f"the guest printed no burst rate:\n{text[-1500:]}")
    frames_s, mib_s = guest_rates(found, host_tsc_khz())
    return {
        "guest_frames_s": frames_s,
        "guest_mib_s": mib_s,
        "host_received": result[0],
        "host_frames_s": rates(*result)[0],
    }


def host_to_guest(work: Path, image: Path, count: int) -> dict[str, float]:
    sent: list[float] = []

    def host_side(serial: Path, proc: subprocess.Popen[str]) -> None:
        wait_line(serial, "sink ready", proc)
        sent.append(send(GUEST_IP, count))

    cmdline = f"mode=sink count={count} ip={GUEST_IP} peer_ip={HOST_IP} port={PORT} idle_ms=2000"
    text = run_guest(work, image, cmdline, host_side)
    found = RATE.search(text.split("sink received=")[-1])
    got = RECEIVED.search(text)
    if found is None or got is None:
        raise SystemExit(f"the guest printed no sink rate:\n{text[-1500:]}")
    frames_s, mib_s = guest_rates(found, host_tsc_khz())
    return {
        "guest_frames_s": frames_s,
        "guest_mib_s": mib_s,
        "guest_received": int(got[1]),
        "host_send_frames_s": count / sent[0],
    }


def inside(args: argparse.Namespace) -> None:
    """In the bench namespace: the TAP, then the guest both ways, RUNS times."""
    setup_inside()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        image = build_guests(work / "guests")["virtio-net"]
        out = [guest_to_host(work, image, args.count) for _ in range(args.runs)]
        back = [host_to_guest(work, image, args.count) for _ in range(args.runs)]
    print(json.dumps({"out": out, "in": back}))


# -- the floor: a veth pair between two namespaces -----------------------------------------------
def veth_floor(count: int, runs: int) -> list[dict[str, float]]:
    sh("ip", "netns", "add", PEER_NS)
    sh("ip", "link", "add", VETH_A, "netns", NS, "type", "veth", "peer", VETH_B, "netns", PEER_NS)
    for ns, dev, ip in ((NS, VETH_A, VETH_A_IP), (PEER_NS, VETH_B, VETH_B_IP)):
        sh(*in_ns(ns, "ip", "addr", "add", f"{ip}/24", "dev", dev))
        sh(*in_ns(ns, "ip", "link", "set", dev, "up"))
    prelude = (
        f"import sys, json, threading; sys.path.insert(0, {str(REPO)!r}); import bench.net as b; "
    )
    receiver_code = (
        prelude + f"print(json.dumps(b.receive({VETH_B_IP!r}, {count}, threading.Event())))"
    )
    sender_code = prelude + f"print(b.send({VETH_B_IP!r}, {count}))"
    samples = []
    for _ in range(runs):
        receiver = subprocess.Popen(
            in_ns(PEER_NS, sys.executable, "-c", receiver_code),
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(0.5)  # the receiver binds (a Python start)
        sender = subprocess.run(
            in_ns(NS, sys.executable, "-c", sender_code),
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        received = json.loads(receiver.communicate(timeout=60)[0])
        frames_s, mib_s = rates(*received)
        samples.append(
            {
                "received": received[0],
                "frames_s": frames_s,
                "mib_s": mib_s,
                "send_frames_s": count / float(sender.stdout),
            }
        )
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--count", type=int, default=20000, help="datagrams per run")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        inside(args)
        return
    if os.geteuid() != 0:
        raise SystemExit("bench/net.py makes network namespaces and a TAP: run it as root")
    sh("ip", "netns", "add", NS)
    try:
        this = [sys.executable, str(Path(__file__).resolve()), "--inside"]
        inner = subprocess.run(
            in_ns(NS, *this, "--runs", str(args.runs), "--count", str(args.count)),
            capture_output=True, text=True,
        )  # fmt: skip
        if inner.returncode != 0:
            raise SystemExit(inner.stderr + inner.stdout)
        guest = json.loads(inner.stdout.splitlines()[-1])
        floor = veth_floor(args.count, args.runs)
    finally:
        for ns in (NS, PEER_NS):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    result = {"count": args.count, "runs": args.runs, **guest, "veth": floor}
    if args.json:
        print(json.dumps(result))
        return
    print_table(result)


def med(samples: list[dict[str, float]], key: str) -> float:
    return statistics.median(s[key] for s in samples)


def print_table(r: dict[str, object]) -> None:
    out, back, veth = r["out"], r["in"], r["veth"]
    assert isinstance(out, list) and isinstance(back, list) and isinstance(veth, list)
    table = Table(
        title=f"virtio-net, {r['count']} UDP datagrams of {SIZE} bytes (1514-byte frames), "
        f"median of {r['runs']} runs",
        caption="frames/s and MiB/s of UDP payload; the floor is one Python socket each side",
    )
    for column in ("direction", "frames/s", "MiB/s", "delivered", "floor frames/s", "/ floor"):
        table.add_column(column, justify="left" if column == "direction" else "right")
    floor = med(veth, "frames_s")
    g2h = med(out, "guest_frames_s")
    h2g = med(back, "guest_frames_s")
    table.add_row(
        "guest -> host (guest's clock)",
        f"{g2h:.0f}",
        f"{med(out, 'guest_mib_s'):.1f}",
        f"{med(out, 'host_received'):.0f} / {r['count']}",
        f"{floor:.0f}",
        f"{g2h / floor:.2f}",
    )
    table.add_row(
        "host -> guest (guest's clock)",
        f"{h2g:.0f}",
        f"{med(back, 'guest_mib_s'):.1f}",
        f"{med(back, 'guest_received'):.0f} / {r['count']}",
        f"{floor:.0f}",
        f"{h2g / floor:.2f}",
    )
    table.add_row(
        "veth pair (floor)",
        f"{floor:.0f}",
        f"{med(veth, 'mib_s'):.1f}",
        f"{med(veth, 'received'):.0f} / {r['count']}",
        "",
        "",
    )
    Console().print(table)


if __name__ == "__main__":
    main()
