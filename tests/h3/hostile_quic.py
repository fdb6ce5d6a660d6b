"""A hostile QUIC peer against a ztunnel's 15009, built on aioquic (independent of Trellis's quinn).

Each mode attacks one way and, while the attack is on, runs a well-behaved tunnel (a plain
HTTP/3 CONNECT with a mesh certificate, then an HTTP GET through it). Prints one JSON line with
what the attack met and what the well-behaved tunnel got, for the caller to assert on:

- garbage:    --count random and malformed datagrams (short headers with unknown connection IDs,
              long headers with an unknown version, truncated Initials), then the tunnel;
- handshakes: --count Initial flights from as many UDP sockets that never answer, counting what
              each got back (Retry, Initial, nothing); the tunnel runs while they are pending;
- silent:     on one connection, a request stream that sends half a HEADERS frame and then
              nothing, and beside it the tunnel; reports when the server gave up on the silent
              stream;
- streams:    a tunnel opened first on its own connection; then on a second connection the
              client ignores the server's stream limit and opens --count request streams;
              reports how the server ended the second connection and whether the first tunnel
              still carries its request.
"""

import argparse
import asyncio
import json
import os
import random
import socket
import ssl
import sys
import time

from aioquic.asyncio import connect
from aioquic.h3.connection import H3_ALPN
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import StopSendingReceived, StreamReset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hbone_h3_client import Tunnel  # noqa: E402

GET = b"GET / HTTP/1.1\r\nHost: tgt\r\nConnection: close\r\n\r\n"
UNTIL = b"hello from"


def config(args):
    c = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name=args.sni)
    c.verify_mode = ssl.CERT_NONE
    if args.cert:
        c.load_cert_chain(args.cert, args.key)
    return c


class Watched(Tunnel):
    """A Tunnel that also records, per stream, when the server stopped or reset it."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.given_up = {}
        self.ended_streams = {}

    def quic_event_received(self, event):
        if isinstance(event, (StopSendingReceived, StreamReset)):
            self.given_up.setdefault(event.stream_id, time.monotonic())
        if getattr(event, "end_stream", False):
            self.ended_streams.setdefault(event.stream_id, time.monotonic())
        super().quic_event_received(event)


async def open_tunnel(p, args):
    """A CONNECT on a new stream of `p`; its status (the Tunnel protocol records the first)."""
    stream = p._quic.get_next_available_stream_id()
    p.h3.send_headers(stream, [(b":method", b"CONNECT"), (b":authority", args.authority.encode())], end_stream=False)
    p.transmit()
    status = await asyncio.wait_for(p.status, args.timeout)
    return stream, status


async def request(p, stream, args):
    """Sends the GET through the open tunnel on `stream`; whether the answer came."""
    p.h3.send_data(stream, GET, end_stream=False)
    p.transmit()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + args.timeout
    while UNTIL not in p.body and not p.ended and loop.time() < deadline:
        p.more.clear()
        try:
            await asyncio.wait_for(p.more.wait(), max(0.01, deadline - loop.time()))
        except asyncio.TimeoutError:
            break
    return UNTIL in p.body


async def tunnel(args):
    """The well-behaved tunnel on its own connection: {"status", "answered"} or {"error"}."""
    try:
        host, port = args.connect.rsplit(":", 1)
        async with connect(host, int(port), configuration=config(args), create_protocol=Tunnel) as p:
            stream, status = await open_tunnel(p, args)
            answered = status == 200 and await request(p, stream, args)
            return {"status": status, "answered": answered}
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}


def server_addr(args):
    host, port = args.connect.rsplit(":", 1)
    return (host, int(port))


async def garbage(args):
    rng = random.Random(15009)
    target = server_addr(args)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for i in range(args.count):
        kind = i % 4
        if kind == 0:  # random bytes of a random size
            data = rng.randbytes(rng.randint(1, 1400))
        elif kind == 1:  # a short header with a connection ID the server never issued
            data = bytes([0x40 | rng.randint(0, 0x3F)]) + rng.randbytes(rng.randint(20, 1200))
        elif kind == 2:  # a long header of an unknown version
            data = bytes([0xC0]) + b"\x1a\x2a\x3a\x4a" + bytes([8]) + rng.randbytes(8) + bytes([8]) + rng.randbytes(1200)
        else:  # an Initial of QUIC v1 whose payload is garbage (fails to decrypt)
            data = bytes([0xC0]) + b"\x00\x00\x00\x01" + bytes([8]) + rng.randbytes(8) + bytes([8]) + rng.randbytes(8)
            data += b"\x00" + b"\x44\xb0" + rng.randbytes(1180)
        sock.sendto(data, target)
    sock.close()
    return {"sent": args.count, "tunnel": await tunnel(args)}


def packet_kind(datagram):
    first = datagram[0]
    if not first & 0x80:
        return "short"
    if datagram[1:5] == b"\x00\x00\x00\x00":
        return "version_negotiation"
    return {0: "initial", 1: "zero_rtt", 2: "handshake", 3: "retry"}[(first & 0x30) >> 4]


async def handshakes(args):
    target = server_addr(args)
    flood = []
    now = time.time()
    cfg = config(args)
    for _ in range(args.count):
        conn = QuicConnection(configuration=cfg)
        conn.connect(target, now=now)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        for data, _ in conn.datagrams_to_send(now=now):
            sock.sendto(data, target)
        flood.append(sock)
    # Collect the first answer of each flooder (they never answer back: half-open handshakes).
    got = {}
    deadline = time.monotonic() + 1.5
    pending = set(range(len(flood)))
    while pending and time.monotonic() < deadline:
        for i in list(pending):
            try:
                data = flood[i].recv(2048)
            except BlockingIOError:
                continue
            kind = packet_kind(data)
            got[kind] = got.get(kind, 0) + 1
            pending.discard(i)
        await asyncio.sleep(0.01)
    got["nothing"] = len(pending)
    result = await tunnel(args)  # the flood's handshakes are still pending on the server
    for sock in flood:
        sock.close()
    return {"answers": got, "tunnel": result}


async def silent(args):
    host, port = args.connect.rsplit(":", 1)
    async with connect(host, int(port), configuration=config(args), create_protocol=Watched) as p:
        quiet = p._quic.get_next_available_stream_id()
        # A HEADERS frame (type 1) that announces 64 bytes and sends 3 of them.
        p._quic.send_stream_data(quiet, b"\x01\x40\x40" + b"\x00\x00\xd1", end_stream=False)
        p.transmit()
        started = time.monotonic()
        stream, status = await open_tunnel(p, args)
        answered = status == 200 and await request(p, stream, args)
        deadline = started + args.timeout
        while quiet not in p.given_up and quiet not in p.ended_streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        stopped = p.given_up.get(quiet) or p.ended_streams.get(quiet)
        return {
            "silent_stopped_after": None if stopped is None else round(stopped - started, 2),
            "tunnel": {"status": status, "answered": answered},
        }


async def streams(args):
    host, port = args.connect.rsplit(":", 1)
    async with connect(host, int(port), configuration=config(args), create_protocol=Tunnel) as first:
        stream, status = await open_tunnel(first, args)
        closed = None
        try:
            async with connect(host, int(port), configuration=config(args), create_protocol=Tunnel) as p:
                limit = p._quic._remote_max_streams_bidi
                p._quic._remote_max_streams_bidi = 1 << 40  # ignore the server's limit
                for _ in range(args.count):
                    s = p._quic.get_next_available_stream_id()
                    p.h3.send_headers(s, [(b":method", b"CONNECT"), (b":authority", args.authority.encode())], end_stream=False)
                    p.transmit()
                try:
                    await asyncio.wait_for(p.wait_closed(), args.timeout)
                except asyncio.TimeoutError:
                    pass
                closed = p._quic._close_event
        except Exception as e:
            closed = e
        answered = status == 200 and await request(first, stream, args)
    code = getattr(closed, "error_code", None)
    return {
        "stream_limit": limit,
        "flood_closed_with": code,
        "tunnel": {"status": status, "answered": answered},
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=["garbage", "handshakes", "silent", "streams"])
    parser.add_argument("--connect", required=True, help="host:port of the ztunnel's 15009")
    parser.add_argument("--sni", help="the server name to send (Trellis: the hashed identity)")
    parser.add_argument("--cert", required=True, help="PEM chain of the well-behaved client's SVID")
    parser.add_argument("--key", required=True, help="PEM key of that SVID")
    parser.add_argument("--authority", required=True, help="the tunnel's destination")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args()
    modes = {"garbage": garbage, "handshakes": handshakes, "silent": silent, "streams": streams}
    try:
        result = asyncio.run(modes[args.mode](args))
    except Exception as e:  # the caller asserts on the outcome, whatever failed
        result = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
