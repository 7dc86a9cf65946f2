#!/usr/bin/env python3
"""SMTP client helpers for scripts/bench (loopback only, bounded waits).

  client.py lat PORT N SIZE OUTFILE
      N messages of SIZE bytes, each on its own connection, one after the other (lock-step
      SMTP, TCP_NODELAY). Writes each message's time (connect to the 250 after the final dot;
      QUIT not counted) in seconds, one a line, to OUTFILE.
  client.py prime PORT SRC FAILURES
      From source address SRC: one session with FAILURES relay attempts (RCPT to a foreign
      domain, each refused), to build up a bad reputation; closes without QUIT.
  client.py hold PORT SRC N WAIT_BANNER(0|1) HOLD_SECONDS STATUSFILE
      Opens N connections from SRC; with WAIT_BANNER=1 reads each banner first. Writes
      "connected=C banners=B" to STATUSFILE when all are connected (and greeted), holds them
      idle for HOLD_SECONDS, writes the final counts again, closes them.
"""
import os, selectors, socket, sys, time

HOST = "127.0.0.1"


def recv_reply(s, buf=b""):
    """Reads one (possibly multi-line) SMTP reply; returns (code, rest of buffer)."""
    while True:
        lines = buf.split(b"\r\n")
        for i, line in enumerate(lines[:-1]):
            if len(line) >= 4 and line[3:4] == b" ":
                return int(line[:3]), b"\r\n".join(lines[i + 1:])
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk


def cmd(s, line, want):
    s.sendall(line)
    code, _ = recv_reply(s)
    if code != want:
        raise RuntimeError(f"{line!r}: got {code}, wanted {want}")


def message(size):
    head = (b"From: <bench@sender.test>\r\nTo: <rcpt@bench.test>\r\n"
            b"Subject: latency probe\r\nMessage-ID: <%d.%d@sender.test>\r\n\r\n"
            % (os.getpid(), time.monotonic_ns()))
    line = b"La de da de da, the quick brown fox jumps over the lazy dog. 0123456789\r\n"
    body = line * (max(size - len(head), 0) // len(line) + 1)
    return head + body[: max(size - len(head), 0)] + b"\r\n.\r\n"


def lat(port, n, size, out):
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        s = socket.create_connection((HOST, port), timeout=30)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        code, _ = recv_reply(s)
        assert code == 220, code
        cmd(s, b"EHLO client.bench.test\r\n", 250)
        cmd(s, b"MAIL FROM:<bench@sender.test>\r\n", 250)
        cmd(s, b"RCPT TO:<rcpt@bench.test>\r\n", 250)
        cmd(s, b"DATA\r\n", 354)
        cmd(s, message(size), 250)
        times.append(time.perf_counter() - t0)
        try:
            s.sendall(b"QUIT\r\n")
            recv_reply(s)
        except OSError:
            pass
        s.close()
    with open(out, "w") as f:
        f.write("".join(f"{t:.6f}\n" for t in times))


def prime(port, src, failures):
    s = socket.socket()
    s.bind((src, 0))
    s.settimeout(30)
    s.connect((HOST, port))
    recv_reply(s)
    cmd(s, b"EHLO client.bench.test\r\n", 250)
    cmd(s, b"MAIL FROM:<bench@sender.test>\r\n", 250)
    # The reply to the last attempt may already be tarpitted: send it, do not wait for it.
    for i in range(failures):
        s.sendall(b"RCPT TO:<victim%d@elsewhere.test>\r\n" % i)
        if i == failures - 1:
            time.sleep(1)
            break
        code, _ = recv_reply(s)
        if code < 500:
            raise RuntimeError(f"relay attempt got {code}, wanted a 5xx")
    s.close()


def hold(port, src, n, wait_banner, hold_secs, status):
    sel = selectors.DefaultSelector()
    socks, connected, banners = [], 0, 0
    deadline = time.monotonic() + 120
    pending = {}
    # Connect in batches of 200 so the listen backlog is never overrun.
    i = 0
    while (i < n or pending) and time.monotonic() < deadline:
        while i < n and len(pending) < 200:
            s = socket.socket()
            s.bind((src, 0))
            s.setblocking(False)
            s.connect_ex((HOST, port))
            sel.register(s, selectors.EVENT_WRITE)
            pending[s] = "connect"
            socks.append(s)
            i += 1
        for key, ev in sel.select(timeout=1):
            s = key.fileobj
            if pending.get(s) == "connect":
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, os.strerror(err))
                connected += 1
                if wait_banner:
                    pending[s] = "banner"
                    sel.modify(s, selectors.EVENT_READ)
                else:
                    del pending[s]
                    sel.modify(s, selectors.EVENT_READ)
            else:
                data = s.recv(4096)
                if data.startswith(b"220"):
                    banners += 1
                if pending.get(s) == "banner" and data:
                    del pending[s]
    with open(status + ".tmp", "w") as f:
        f.write(f"connected={connected} banners={banners}\n")
    os.rename(status + ".tmp", status)
    # Hold: count banners that still arrive (tarpitted), never answer.
    end = time.monotonic() + hold_secs
    while time.monotonic() < end:
        for key, ev in sel.select(timeout=0.5):
            try:
                data = key.fileobj.recv(4096)
            except OSError:
                data = b""
            if data.startswith(b"220"):
                banners += 1
            if not data:
                sel.unregister(key.fileobj)
    with open(status + ".final", "w") as f:
        f.write(f"connected={connected} banners={banners}\n")
    for s in socks:
        s.close()


if __name__ == "__main__":
    a = sys.argv
    if a[1] == "lat":
        lat(int(a[2]), int(a[3]), int(a[4]), a[5])
    elif a[1] == "prime":
        prime(int(a[2]), a[3], int(a[4]))
    elif a[1] == "hold":
        hold(int(a[2]), a[3], int(a[4]), a[5] == "1", float(a[6]), a[7])
    else:
        sys.exit(__doc__)
