#!/usr/bin/env python3
"""Raw TCP producer: frames packets in the SPEC section 2 wire format and sends them.

    python3 producer.py --addr 127.0.0.1:7000 --channel 3 --count 1000 --size 256

Packet i carries b"<channel>:<i>|" followed by filler, --size bytes in all, with a
SHA-256 digest over header bytes 0..12 and the payload (HMAC-SHA256 with
--hmac-key-file). Needs only the standard library (no stubs).

The frames ask for acknowledgements (flag bit 1, SPEC section 9): after the
last frame the producer half-closes and reads the server's 28-byte "PA"
records until every frame is settled, so exit 0 means every packet was
accepted and made durable; exit 1 if some were rejected or not acknowledged
before the server closed. With --no-ack it only waits for the server to close.
It prints one JSON summary line on stdout.
"""

import argparse
import json
import socket
import sys
import time

import pktcommon


def parse_addr(addr):
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {addr!r}")
    return host.strip("[]"), int(port)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addr", type=parse_addr, default="127.0.0.1:7000",
                        help="TCP ingest address HOST:PORT (default %(default)s)")
    parser.add_argument("--channel", type=int, default=0, help="channel of every packet (u32)")
    parser.add_argument("--count", type=int, default=10, help="packets to send")
    parser.add_argument("--size", type=int, default=64, help="payload bytes per packet")
    parser.add_argument("--start", type=int, default=0, help="index of the first packet")
    parser.add_argument("--hmac-key-file", help="sign with HMAC-SHA256 using this key file")
    parser.add_argument("--no-ack", action="store_true", help="do not ask for acknowledgements")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="seconds for connect, each write and the final close (default %(default)s)")
    args = parser.parse_args()
    if not 0 <= args.channel < 2**32:
        parser.error("--channel must fit in a u32")
    if args.count < 0 or args.size < 0:
        parser.error("--count and --size must not be negative")

    key = pktcommon.read_key(args.hmac_key_file)
    host, port = args.addr
    started = time.monotonic()
    sock = socket.create_connection((host, port), timeout=args.timeout)
    sent_bytes = 0
    with sock:
        batch = []
        batch_len = 0
        for i in range(args.start, args.start + args.count):
            extra = 0 if args.no_ack else pktcommon.FLAG_ACK
            data = pktcommon.frame(args.channel, pktcommon.payload(args.channel, i, args.size), key, extra)
            batch.append(data)
            batch_len += len(data)
            if batch_len >= 64 * 1024:
                sock.sendall(b"".join(batch))
                sent_bytes += batch_len
                batch, batch_len = [], 0
        if batch:
            sock.sendall(b"".join(batch))
            sent_bytes += batch_len
        sock.shutdown(socket.SHUT_WR)
        ack = (0, 0, 0)
        if args.no_ack:
            # Wait for the server to read everything and close.
            while sock.recv(4096):
                pass
        else:
            while ack[0] < args.count:
                record = pktcommon.read_ack(sock)
                if record is None:
                    break
                ack = record
    summary = {
        "sent": args.count,
        "bytes": sent_bytes,
        "channel": args.channel,
        "addr": f"{host}:{port}",
        "seconds": round(time.monotonic() - started, 3),
    }
    if not args.no_ack:
        summary.update(acknowledged=ack[0], last_sequence=ack[1], rejected=ack[2])
    print(json.dumps(summary), flush=True)
    if not args.no_ack and (ack[0] < args.count or ack[2] > 0):
        sys.exit(f"producer: {ack[0]} of {args.count} packets acknowledged, {ack[2]} rejected")


if __name__ == "__main__":
    try:
        main()
    except OSError as error:
        sys.exit(f"producer: {error}")
    except KeyboardInterrupt:
        sys.exit(130)
