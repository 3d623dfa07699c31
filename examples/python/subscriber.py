#!/usr/bin/env python3
"""Subscribe to packet-ingest and print one JSON line per packet.

    python3 subscriber.py --addr 127.0.0.1:50051 --channel 3 --from 1 --count 1000

Each packet line has sequence, channel, source, source_sequence,
received_unix_nanos, digest (hex) and payload (text when UTF-8, else
payload_hex), the same shape as `packet-ingest tail --format json`.

When the server reports that this subscriber lost packets (the response's
`missed` field: a slow subscriber under --slow-subscriber gap, or --from older
than the retained history), a line {"missed": N, "before_sequence": S} is printed
before the packet it precedes; with --no-gaps that ends the run with status 5.

Heartbeats (empty responses on an idle stream) are skipped unless --heartbeats.
Once the server has accepted the subscription, {"ready": true, ...} goes to
stderr, so a script can start producing only after that (or use --from 1 and
not care about start-up order).

The server names its stream in the `packet-ingest-stream-id` response header
(printed in the ready line). A resume sends it back: `--from SEQ --stream-id ID`
is refused with FAILED_PRECONDITION if the server's stream is another one (it
restarted without its data), so packets of two streams are never mixed. With
--reconnect N the subscriber itself resumes after the server goes away
(UNAVAILABLE, connection lost), from the sequence after the last one it saw,
within the same stream, up to N times.

Exit status: 0 after --count packets (or when the server ends the stream
cleanly); 1 gRPC error (message on stderr; OUT_OF_RANGE means the server
restarted, so resubscribe); 3 a sequence that is not strictly increasing;
4 a digest that does not verify (--verify); 5 packets missed with --no-gaps;
6 the stream changed under a resume (FAILED_PRECONDITION: resubscribe live or
from StreamInfo.first_sequence); 124 --timeout expired before --count packets.
SIGTERM or Ctrl-C ends the run with status 0 when following without --count,
130 before --count packets.
"""

import argparse
import hashlib
import time
import hmac
import json
import os
import signal
import sys

import grpc

import pktcommon


def packet_json(packet):
    line = {
        "sequence": packet.sequence,
        "channel": packet.channel,
        "source": packet.source,
        "source_sequence": packet.source_sequence,
        "received_unix_nanos": packet.received_unix_nanos,
        "digest": packet.digest.hex(),
    }
    try:
        line["payload"] = packet.payload.decode("utf-8")
    except UnicodeDecodeError:
        line["payload_hex"] = packet.payload.hex()
    return line


def digest_ok(packet, key):
    """True if the digest is the SHA-256 (or, with a key, HMAC) the producer sent."""
    # The digest covers the producer's flags byte, which a delivered packet does
    # not carry: 0, or FLAG_ACK if the producer asked for acknowledgements.
    for ack in (0, pktcommon.FLAG_ACK):
        plain = pktcommon.signed_header(packet.channel, len(packet.payload), ack) + packet.payload
        if hashlib.sha256(plain).digest() == packet.digest:
            return True
        if key is not None:
            signed = pktcommon.signed_header(packet.channel, len(packet.payload), pktcommon.FLAG_HMAC | ack)
            expected = hmac.new(key, signed + packet.payload, hashlib.sha256).digest()
            if hmac.compare_digest(expected, packet.digest):
                return True
    return False


def follow(args, pb2, pb2_grpc, key, state, from_sequence, deadline):
    """One Subscribe call, printing packets. Returns (status, worth_retrying)."""
    channel = pktcommon.open_channel(grpc, args.addr)
    stub = pb2_grpc.PacketsStub(channel)
    request = pb2.SubscribeRequest(channels=args.channel, stream_id=state["stream_id"])
    if from_sequence is not None:
        request.from_sequence = from_sequence
    timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
    call = stub.Subscribe(request, timeout=timeout, metadata=pktcommon.call_metadata(args.token_file))
    state["call"] = call
    status = 0
    out = sys.stdout
    try:
        headers = dict(call.initial_metadata())  # returns once the server has answered
        state["stream_id"] = headers.get("packet-ingest-stream-id", state["stream_id"])
        if not call.done():  # a refused call ends with its headers (trailers-only)
            print(json.dumps({"ready": True, "addr": args.addr, "channels": args.channel,
                              "from_sequence": from_sequence, "stream_id": state["stream_id"]}),
                  file=sys.stderr, flush=True)
        for response in call:
            if not response.packets and not response.missed:
                if args.heartbeats:
                    print(json.dumps({"heartbeat": True}), file=out, flush=True)
                continue
            if response.missed:
                state["missed"] += response.missed
                before = response.packets[0].sequence if response.packets else None
                print(json.dumps({"missed": response.missed, "before_sequence": before}), file=out)
                if args.no_gaps:
                    print(f"subscriber: server reports {response.missed} missed packets "
                          f"before sequence {before}", file=sys.stderr)
                    return 5, False
            for packet in response.packets:
                last = state["last_sequence"]
                if last is not None and packet.sequence <= last:
                    print(f"subscriber: sequence {packet.sequence} after {last}: "
                          "not strictly increasing", file=sys.stderr)
                    return 3, False
                state["last_sequence"] = packet.sequence
                if args.verify and not digest_ok(packet, key):
                    print(f"subscriber: packet {packet.sequence} has a digest that does not "
                          "verify", file=sys.stderr)
                    return 4, False
                if not args.quiet:
                    print(json.dumps(packet_json(packet)), file=out)
                state["seen"] += 1
                if args.count is not None and state["seen"] >= args.count:
                    out.flush()
                    return 0, False
            out.flush()
        return 0, False
    except grpc.RpcError as error:
        code = error.code()
        if code == grpc.StatusCode.CANCELLED and state["stopped"]:
            status = 130 if args.count is not None else 0  # asked to stop
            return status, False
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and args.timeout is not None:
            print(f"subscriber: timed out after {args.timeout}s with {state['seen']} packets"
                  + (f" of {args.count}" if args.count is not None else ""), file=sys.stderr)
            return 124, False
        if code == grpc.StatusCode.FAILED_PRECONDITION:
            print(f"subscriber: FAILED_PRECONDITION: {error.details()}", file=sys.stderr)
            return 6, False
        hint = ""
        if code == grpc.StatusCode.OUT_OF_RANGE and "restart" not in (error.details() or ""):
            hint = " (the server restarted and numbers from 1 again: resubscribe)"
        print(f"subscriber: {code.name}: {error.details()}{hint}", file=sys.stderr)
        return 1, code == grpc.StatusCode.UNAVAILABLE
    finally:
        call.cancel()
        channel.close()


def main():
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    pktcommon.add_grpc_args(parser)
    parser.add_argument("--channel", type=int, action="append", default=[],
                        help="only this channel (repeat for several); all when absent")
    parser.add_argument("--from", dest="from_sequence", type=int,
                        help="replay retained packets from this sequence, then follow live")
    parser.add_argument("--count", type=int, help="exit 0 after this many packets")
    parser.add_argument("--timeout", type=float,
                        help="give up (status 124) after this many seconds")
    parser.add_argument("--verify", action="store_true",
                        help="check every packet's digest (SHA-256, or HMAC with --hmac-key-file)")
    parser.add_argument("--hmac-key-file", help="key for --verify of HMAC-signed packets")
    parser.add_argument("--no-gaps", action="store_true",
                        help="treat a non-zero `missed` as an error (status 5)")
    parser.add_argument("--heartbeats", action="store_true",
                        help='print {"heartbeat": true} for empty keep-alive responses')
    parser.add_argument("--quiet", action="store_true",
                        help="print no packet lines, only the summary on stderr")
    parser.add_argument("--stream-id", default="",
                        help="resume only within this stream (the id a server sent before)")
    parser.add_argument("--reconnect", type=int, default=0, metavar="N",
                        help="resume up to N times after the server goes away")
    args = parser.parse_args()

    pb2, pb2_grpc = pktcommon.load_stubs()
    key = pktcommon.read_key(args.hmac_key_file)
    state = {"seen": 0, "missed": 0, "last_sequence": None, "stream_id": args.stream_id,
             "stopped": False, "call": None}

    # SIGTERM or Ctrl-C cancels the call: the run ends cleanly with its summary.
    def stop(*_):
        state["stopped"] = True
        if state["call"] is not None:
            state["call"].cancel()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    attempts_left = args.reconnect
    while True:
        from_sequence = args.from_sequence
        if state["last_sequence"] is not None:
            from_sequence = state["last_sequence"] + 1  # resume where we stopped
        status, retry = follow(args, pb2, pb2_grpc, key, state, from_sequence, deadline)
        if not retry or attempts_left <= 0 or state["stopped"]:
            break
        attempts_left -= 1
        resume_at = None if state["last_sequence"] is None else state["last_sequence"] + 1
        print(json.dumps({"reconnecting": True, "from_sequence": resume_at,
                          "stream_id": state["stream_id"]}), file=sys.stderr, flush=True)
        time.sleep(0.5)

    seen = state["seen"]
    if status == 0 and args.count is not None and seen < args.count:
        status = 1
        print(f"subscriber: stream ended after {seen} of {args.count} packets", file=sys.stderr)
    summary = {"received": seen, "missed": state["missed"], "last_sequence": state["last_sequence"],
               "stream_id": state["stream_id"], "status": status}
    print(json.dumps(summary), file=sys.stderr, flush=True)
    return status


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        # Output piped into `head` and closed: not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
