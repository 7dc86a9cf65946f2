#!/usr/bin/env python3
"""A tiny DNS responder for scripts/bench: answers every UDP query with NXDOMAIN.
Usage: dns.py PORTFILE  (binds 127.0.0.1 on a free port and writes the port to PORTFILE)."""
import socket, sys

s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 0))
with open(sys.argv[1], "w") as f:
    f.write(str(s.getsockname()[1]))
while True:
    q, addr = s.recvfrom(4096)
    if len(q) < 12:
        continue
    # Same id; QR=1, same opcode and RD; RA=1; RCODE=3 (NXDOMAIN); the question echoed.
    flags = 0x8000 | (q[2] << 8 & 0x7900) | 0x0080 | 3
    qdcount = int.from_bytes(q[4:6], "big")
    # Question section: the query up to the end of the first question.
    i = 12
    if qdcount:
        while i < len(q) and q[i] != 0:
            i += q[i] + 1
        i += 5
    s.sendto(q[:2] + flags.to_bytes(2, "big") + (1 if qdcount else 0).to_bytes(2, "big")
             + b"\0\0\0\0\0\0" + q[12:i], addr)
