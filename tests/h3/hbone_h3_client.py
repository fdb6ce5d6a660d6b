"""An HBONE-over-QUIC client built on aioquic, an HTTP/3 stack independent of Trellis's (quinn, h3).

Opens one QUIC connection (ALPN h3, TLS 1.3, a client certificate if given) to a ztunnel's
15009, sends a plain HTTP/3 CONNECT (RFC 9114 section 4.4: only :method and :authority), and on
a 200 sends --send through the tunnel and reads the answer. Prints one JSON line:
{"status": ..., "server_id": ..., "body": ...} or {"error": ...}.
"""

import argparse
import asyncio
import json
import ssl
import sys

from aioquic.asyncio import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated
from cryptography import x509


class Tunnel(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.status = asyncio.get_running_loop().create_future()
        self.body = bytearray()
        self.more = asyncio.Event()
        self.ended = False

    def quic_event_received(self, event):
        if isinstance(event, ConnectionTerminated) and not self.status.done():
            self.status.set_exception(ConnectionError(f"connection closed: {event.reason_phrase or event.error_code}"))
        for ev in self.h3.handle_event(event):
            if isinstance(ev, HeadersReceived) and not self.status.done():
                status = dict(ev.headers).get(b":status", b"0")
                self.status.set_result(int(status))
            elif isinstance(ev, DataReceived):
                self.body.extend(ev.data)
                self.ended = self.ended or ev.stream_ended
                self.more.set()
            if getattr(ev, "stream_ended", False):
                self.ended = True
                self.more.set()


def server_id(protocol):
    # aioquic keeps the peer's certificate on its TLS context; the SPIFFE ID is its URI SAN.
    cert = protocol._quic.tls._peer_certificate
    if cert is None:
        return None
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


async def run(args):
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name=args.sni)
    # The server's SVID has no DNS name to check a host against: Trellis checks SPIFFE IDs, and
    # this client reports the one it got for the caller to check.
    config.verify_mode = ssl.CERT_NONE
    if args.cert:
        config.load_cert_chain(args.cert, args.key)
    host, port = args.connect.rsplit(":", 1)
    async with connect(host, int(port), configuration=config, create_protocol=Tunnel, wait_connected=True) as p:
        stream = p._quic.get_next_available_stream_id()
        headers = [(b":method", b"CONNECT"), (b":authority", args.authority.encode())]
        if args.baggage:
            headers.append((b"baggage", args.baggage.encode()))
        p.h3.send_headers(stream, headers, end_stream=False)
        p.transmit()
        status = await asyncio.wait_for(p.status, args.timeout)
        result = {"status": status, "server_id": server_id(p), "body": ""}
        if status == 200 and args.send:
            p.h3.send_data(stream, args.send.encode().decode("unicode_escape").encode(), end_stream=False)
            p.transmit()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + args.timeout
            while args.until.encode() not in p.body and not p.ended and loop.time() < deadline:
                p.more.clear()
                try:
                    await asyncio.wait_for(p.more.wait(), max(0.01, deadline - loop.time()))
                except asyncio.TimeoutError:
                    break
            result["body"] = p.body.decode(errors="replace")
        return result


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connect", required=True, help="host:port of the ztunnel's 15009")
    parser.add_argument("--sni", help="the server name to send (Trellis: the hashed identity)")
    parser.add_argument("--cert", help="PEM chain of the client's SVID")
    parser.add_argument("--key", help="PEM key of the client's SVID")
    parser.add_argument("--authority", required=True)
    parser.add_argument("--baggage")
    parser.add_argument("--send", default="", help="bytes to send through the tunnel (\\r\\n escapes)")
    parser.add_argument("--until", default="hello from", help="stop reading once the answer holds this")
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args()
    try:
        result = asyncio.run(run(args))
    except Exception as e:  # the caller asserts on the outcome, whatever failed
        result = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
