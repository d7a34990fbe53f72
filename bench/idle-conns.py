#!/usr/bin/env python3
"""Portico's memory with idle keep-alive client connections (issue 2 targets:
idle RSS under 20 MB; 10,000 idle keep-alive connections under 100 MB RSS).

Starts, on loopback only:
  - a tiny origin (this script with --origin: a threaded HTTP/1.1 keep-alive
    server answering `ok`) on 127.0.0.1:18091;
  - ./target/release/portico run --config bench/idle.yaml, with
    BENCH_LISTEN=127.0.0.1:18090 BENCH_UPSTREAM=127.0.0.1:18091 BENCH_WORKERS=1.
Then:
  1. reads the gateway's idle VmRSS (/proc/PID/status) before any traffic;
  2. opens N client connections (non-blocking sockets + selectors, a bounded
     number in flight), sends one `GET` on each through the gateway to the
     origin and reads the whole response, so each is a real keep-alive HTTP
     connection, and keeps them all open;
  3. reads VmRSS again, checks how many connections are still open, and prints
     RESULT idle_rss_mb=... rss_10k_conns_mb=... conns=... (more fields follow)
  4. always (try/finally) closes every socket and stops both processes.
Bounded: everything must finish within --timeout seconds (default 120).

bench/idle.yaml is bench/passthrough.yaml with `idle_timeout: 120s`:
Portico closes keep-alive connections idle for `idle_timeout` (default 60s),
and opening 10,000 connections plus measuring could take longer than that. Use --config bench/passthrough.yaml to
measure with the defaults (then the early connections may be closed; the
`still_open` field shows it).

Usage (from anywhere; paths are relative to the repository root):
  CARGO_BUILD_JOBS=1 cargo build --release
  python3 bench/idle-conns.py [--conns 10000] [--config bench/idle.yaml]
Only the Python 3 standard library is used.
"""

import argparse
import errno
import os
import resource
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time

HOST = "127.0.0.1"
LISTEN_PORT = 18090
ORIGIN_PORT = 18091
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def log(msg):
    sys.stderr.write(f"idle-conns: {msg}\n")
    sys.stderr.flush()


class Fatal(Exception):
    pass


# --------------------------------------------------------------------------- origin

def run_origin(port):
    """The upstream: HTTP/1.1 keep-alive, `200 ok` for every GET."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            body = b"ok\n"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 1024
        allow_reuse_address = True

    # Exit with the parent even if it is killed hard.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    Server((HOST, port), Handler).serve_forever()


# --------------------------------------------------------------------------- helpers

def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise Fatal(f"no VmRSS for pid {pid}")


def fd_count(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def port_free(port):
    s = socket.socket()
    try:
        s.bind((HOST, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def wait_port(port, proc, deadline, what, log_path=None):
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = ""
            if log_path:
                with open(log_path, errors="replace") as f:
                    tail = f.read()[-2000:]
            raise Fatal(f"{what} exited with {proc.returncode} before listening\n{tail}")
        try:
            socket.create_connection((HOST, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise Fatal(f"{what} did not listen on {HOST}:{port} in time")


def raise_nofile(need):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return soft
    want = need if hard == resource.RLIM_INFINITY else min(need, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < need:
        raise Fatal(f"RLIMIT_NOFILE hard limit {hard} is below the {need} needed")
    return want


def stop(proc, name):
    """SIGTERM the process group we created, then SIGKILL after 5s."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        log(f"{name} did not stop on SIGTERM; killing it")
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=5)


# --------------------------------------------------------------------------- client

class Conn:
    __slots__ = ("sock", "n", "out", "buf")

    def __init__(self, sock, n):
        self.sock = sock
        self.n = n
        self.out = b""
        self.buf = b""


def response_complete(buf):
    """(done, status, keep_alive) for the bytes read so far."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return False, None, None
    head = buf[:end].decode("latin-1").split("\r\n")
    status = int(head[0].split()[1])
    headers = {}
    for line in head[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip().lower()
    body = buf[end + 4:]
    keep_alive = headers.get("connection") != "close"
    if "content-length" in headers:
        return len(body) >= int(headers["content-length"]), status, keep_alive
    if "chunked" in headers.get("transfer-encoding", ""):
        return body.endswith(b"0\r\n\r\n"), status, keep_alive
    if status in (204, 304):
        return True, status, keep_alive
    raise Fatal(f"response without a length: {head!r}")


def open_connections(n, window, deadline):
    """Opens `n` keep-alive connections, one GET each; returns the sockets."""
    sel = selectors.DefaultSelector()
    idle = []
    next_n = 0
    in_flight = 0
    addr = (HOST, LISTEN_PORT)
    try:
        while len(idle) < n:
            if time.monotonic() > deadline:
                raise Fatal(f"timed out with {len(idle)} of {n} connections open")
            while next_n < n and in_flight < window:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setblocking(False)
                err = s.connect_ex(addr)
                if err not in (0, errno.EINPROGRESS):
                    s.close()
                    raise Fatal(f"connect #{next_n}: {os.strerror(err)}")
                c = Conn(s, next_n)
                c.out = (
                    f"GET /idle/{next_n} HTTP/1.1\r\nHost: {HOST}:{LISTEN_PORT}\r\n"
                    "User-Agent: idle-conns\r\n\r\n"
                ).encode()
                sel.register(s, selectors.EVENT_WRITE, c)
                next_n += 1
                in_flight += 1
            for key, mask in sel.select(timeout=1.0):
                c = key.data
                if mask & selectors.EVENT_WRITE:
                    err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        raise Fatal(f"connect #{c.n}: {os.strerror(err)}")
                    try:
                        sent = c.sock.send(c.out)
                    except BlockingIOError:
                        continue
                    c.out = c.out[sent:]
                    if not c.out:
                        sel.modify(c.sock, selectors.EVENT_READ, c)
                    continue
                try:
                    data = c.sock.recv(65536)
                except BlockingIOError:
                    continue
                if not data:
                    raise Fatal(f"connection #{c.n} closed before a full response")
                c.buf += data
                done, status, keep_alive = response_complete(c.buf)
                if done:
                    if status != 200:
                        raise Fatal(f"connection #{c.n}: status {status}: {c.buf[:300]!r}")
                    if not keep_alive:
                        raise Fatal(f"connection #{c.n}: the gateway answered Connection: close")
                    sel.unregister(c.sock)
                    in_flight -= 1
                    idle.append(c.sock)
        return idle
    except BaseException:
        for key in list(sel.get_map().values()):
            key.fileobj.close()
        for s in idle:
            s.close()
        raise
    finally:
        sel.close()


def count_open(socks):
    """Sockets the peer has not closed (no EOF, no error pending)."""
    open_ = 0
    for s in socks:
        try:
            data = s.recv(1, socket.MSG_PEEK)
            if data:
                open_ += 1  # unexpected bytes, but still open
        except BlockingIOError:
            open_ += 1
        except OSError:
            pass
    return open_


# --------------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conns", type=int, default=10_000, help="client connections [10000]")
    ap.add_argument("--config", default="bench/idle.yaml", help="gateway config [bench/idle.yaml]")
    ap.add_argument("--binary", default="target/release/portico", help="[target/release/portico]")
    ap.add_argument("--window", type=int, default=128,
                    help="connections being opened/requested at once [128]")
    ap.add_argument("--timeout", type=float, default=120, help="overall limit, seconds [120]")
    ap.add_argument("--settle", type=float, default=2.5,
                    help="seconds idle before measuring [2.5]")
    ap.add_argument("--origin", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.origin:
        run_origin(args.origin)
        return 0

    start = time.monotonic()
    deadline = start + args.timeout
    # A watchdog in case anything blocks: SIGALRM raises in the main thread,
    # and the finally blocks below still clean up.
    def on_alarm(*_):
        raise Fatal(f"overall timeout of {args.timeout:.0f}s reached")
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(int(args.timeout) + 5)

    os.chdir(ROOT)
    binary = os.path.join(ROOT, args.binary)
    if not os.access(binary, os.X_OK):
        raise Fatal(f"{binary} not found: build it with `cargo build --release`")
    for port in (LISTEN_PORT, ORIGIN_PORT):
        if not port_free(port):
            raise Fatal(f"{HOST}:{port} is in use (another benchmark running?)")
    # Children inherit the limit: the gateway needs one fd per client
    # connection plus its upstream pool.
    raise_nofile(args.conns + 1024)

    env = dict(os.environ)
    env.update(
        BENCH_LISTEN=f"{HOST}:{LISTEN_PORT}",
        BENCH_UPSTREAM=f"{HOST}:{ORIGIN_PORT}",
        BENCH_WORKERS="1",
        PORTICO_LOG=os.environ.get("PORTICO_LOG", "warn"),
    )
    tmp = tempfile.mkdtemp(prefix="idle-conns-")
    gw_log = os.path.join(tmp, "portico.log")
    origin = gateway = None
    socks = []
    try:
        origin = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--origin", str(ORIGIN_PORT)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_port(ORIGIN_PORT, origin, min(deadline, time.monotonic() + 15), "origin")
        with open(gw_log, "w") as logf:
            gateway = subprocess.Popen(
                [binary, "run", "--config", args.config],
                env=env, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_port(LISTEN_PORT, gateway, min(deadline, time.monotonic() + 30), "portico", gw_log)
        time.sleep(0.5)  # let startup settle (the probe connection above is gone)
        idle_kb = rss_kb(gateway.pid)
        log(f"idle RSS {idle_kb / 1024:.1f} MB (pid {gateway.pid}); "
            f"opening {args.conns} connections")

        t0 = time.monotonic()
        socks = open_connections(args.conns, args.window, deadline)
        setup_s = time.monotonic() - t0
        # Let the gateway finish per-request work and the connections go idle:
        # plain HTTP/1 keep-alive connections park (free hyper's buffers) once
        # idle for 1 s (server::PARK_AFTER).
        time.sleep(args.settle)
        loaded_kb = rss_kb(gateway.pid)
        hwm = 0
        with open(f"/proc/{gateway.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
        still_open = count_open(socks)
        fds = fd_count(gateway.pid)
        if gateway.poll() is not None:
            raise Fatal(f"portico exited with {gateway.returncode}")
        per_conn = (loaded_kb - idle_kb) * 1024 / max(1, len(socks))
        print(
            f"RESULT idle_rss_mb={idle_kb / 1024:.1f} rss_10k_conns_mb={loaded_kb / 1024:.1f} "
            f"conns={len(socks)} still_open={still_open} per_conn_bytes={per_conn:.0f} "
            f"peak_rss_mb={hwm / 1024:.1f} gateway_fds={fds} setup_s={setup_s:.1f} "
            f"config={args.config}",
            flush=True,
        )
        if still_open < len(socks):
            log(f"warning: {len(socks) - still_open} connections were closed by the gateway "
                "before the measurement")
        return 0
    finally:
        signal.alarm(0)
        for s in socks:
            s.close()
        stop(gateway, "portico")
        stop(origin, "origin")
        try:
            os.remove(gw_log)
            os.rmdir(tmp)
        except OSError:
            pass


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Fatal as e:
        log(f"error: {e}")
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
