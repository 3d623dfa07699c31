#!/usr/bin/env python3
"""Publish packets over the client-streaming Publish RPC.

    python3 publisher.py --addr 127.0.0.1:50051 --channel 3 --count 1000 --size 256

Sends the same packets as producer.py (b"<channel>:<i>|" then filler), each with
the digest the TCP frame would carry. --corrupt-every K spoils the digest of
every K-th packet, to see the server count them as rejected while the stream
goes on. Prints the PublishResponse as one JSON line:
{"accepted": N, "rejected": M, "last_sequence": S}. Exit status 1 on a gRPC
error (message on stderr).
"""

import argparse
import json
import sys

import grpc

import pktcommon


def requests(pb2, args, key):
    for i in range(args.start, args.start + args.count):
        payload = pktcommon.payload(args.channel, i, args.size)
        digest, flags = pktcommon.digest(args.channel, payload, key)
        if args.corrupt_every and (i - args.start + 1) % args.corrupt_every == 0:
            digest = bytes([digest[0] ^ 0xFF]) + digest[1:]
        yield pb2.PublishRequest(channel=args.channel, payload=payload, digest=digest,
                                 hmac=bool(flags & pktcommon.FLAG_HMAC))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    pktcommon.add_grpc_args(parser)
    parser.add_argument("--channel", type=int, default=0, help="channel of every packet (u32)")
    parser.add_argument("--count", type=int, default=10, help="packets to publish")
    parser.add_argument("--size", type=int, default=64, help="payload bytes per packet")
    parser.add_argument("--start", type=int, default=0, help="index of the first packet")
    parser.add_argument("--hmac-key-file", help="sign with HMAC-SHA256 using this key file")
    parser.add_argument("--corrupt-every", type=int, default=0, metavar="K",
                        help="spoil the digest of every K-th packet (0: none)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="deadline of the whole call in seconds (default %(default)s)")
    args = parser.parse_args()
    if not 0 <= args.channel < 2**32:
        parser.error("--channel must fit in a u32")

    pb2, pb2_grpc = pktcommon.load_stubs()
    key = pktcommon.read_key(args.hmac_key_file)
    with pktcommon.open_channel(grpc, args.addr) as channel:
        stub = pb2_grpc.PacketsStub(channel)
        try:
            response = stub.Publish(requests(pb2, args, key), timeout=args.timeout,
                                    metadata=pktcommon.call_metadata(args.token_file))
        except grpc.RpcError as error:
            print(f"publisher: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    print(json.dumps({"accepted": response.accepted, "rejected": response.rejected,
                      "last_sequence": response.last_sequence}), flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
