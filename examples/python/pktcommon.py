"""Helpers shared by the packet-ingest example clients.

- the TCP wire format of SPEC section 2 (header, digest, frame);
- the deterministic test payloads the producer and publisher send;
- loading the stubs that gen.sh generates into ./gen;
- gRPC channel options and call metadata (bearer token).
"""

import hashlib
import hmac
import os
import struct
import sys

MAGIC = b"PK"
VERSION = 1
FLAG_HMAC = 0x01
FLAG_ACK = 0x02  # ask for acknowledgements on this connection (SPEC section 9)
ACK = struct.Struct(">2sBBQQQ")  # magic "PA", version, reserved, settled, last_sequence, rejected
HEADER_LEN = 44
SIGNED_HEADER = struct.Struct(">2sBBII")  # magic, version, flags, channel, length

HERE = os.path.dirname(os.path.abspath(__file__))


def signed_header(channel, length, flags=0):
    """Header bytes 0..12: what the digest covers together with the payload."""
    return SIGNED_HEADER.pack(MAGIC, VERSION, flags, channel, length)


def digest(channel, payload, key=None, extra_flags=0):
    """The 32-byte digest field: SHA-256, or HMAC-SHA256 when a key is given.

    Returns (digest, flags)."""
    flags = (FLAG_HMAC if key is not None else 0) | extra_flags
    data = signed_header(channel, len(payload), flags) + payload
    if key is None:
        return hashlib.sha256(data).digest(), flags
    return hmac.new(key, data, hashlib.sha256).digest(), flags


def frame(channel, payload, key=None, extra_flags=0):
    """One complete wire frame: 12-byte signed header, 32-byte digest, payload."""
    dig, flags = digest(channel, payload, key, extra_flags)
    return signed_header(channel, len(payload), flags) + dig + payload


def payload(channel, index, size):
    """Packet `index` of a test run: b"<channel>:<index>|" then filler, `size` bytes.

    The prefix lets a subscriber check which packet it got; a size smaller than
    the prefix truncates it."""
    prefix = b"%d:%d|" % (channel, index)
    if size <= len(prefix):
        return prefix[:size]
    filler = bytes((index + i) % 26 + 97 for i in range(26))  # a rotated alphabet
    body = filler * ((size - len(prefix)) // 26 + 1)
    return prefix + body[: size - len(prefix)]


def read_key(path):
    """A key file's bytes with one trailing line ending (\\n or \\r\\n) removed,
    exactly as the server and `packet-ingest send` read it (src/keyfile.rs)."""
    if path is None:
        return None
    with open(path, "rb") as f:
        key = f.read()
    if key.endswith(b"\n"):
        key = key[:-1]
        if key.endswith(b"\r"):
            key = key[:-1]
    if not key:
        sys.exit(f"error: key file {path} is empty")
    return key


def load_stubs():
    """Imports the generated modules from ./gen (run gen.sh first)."""
    gen = os.path.join(HERE, "gen")
    if not os.path.exists(os.path.join(gen, "packet_ingest_pb2_grpc.py")):
        sys.exit(f"error: no generated stubs in {gen}; run {os.path.join(HERE, 'gen.sh')} first")
    if gen not in sys.path:
        sys.path.insert(0, gen)
    import packet_ingest_pb2  # noqa: E402
    import packet_ingest_pb2_grpc  # noqa: E402

    return packet_ingest_pb2, packet_ingest_pb2_grpc


def grpc_target(addr):
    """Accepts HOST:PORT or http://HOST:PORT (as `packet-ingest tail` does)."""
    return addr[len("http://"):].rstrip("/") if addr.startswith("http://") else addr


def open_channel(grpc, addr):
    """A plaintext channel with no limit on received message size (responses carry batches)."""
    options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    return grpc.insecure_channel(grpc_target(addr), options)


def call_metadata(token_file):
    """`authorization: Bearer <token>`, the token being the file's first
    non-empty line that is not a # comment; no metadata without a file."""
    if not token_file:
        return ()
    with open(token_file, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                return (("authorization", f"Bearer {line}"),)
    sys.exit(f"error: no token in {token_file}")


def add_grpc_args(parser, default_addr="127.0.0.1:50051"):
    parser.add_argument("--addr", default=default_addr,
                        help="gRPC address, HOST:PORT or http://HOST:PORT (default %(default)s)")
    parser.add_argument("--token-file",
                        help="send `authorization: Bearer <first non-comment line of the file>`")


def read_ack(sock):
    """The next acknowledgement record as (settled, last_sequence, rejected),
    or None once the server has closed the connection."""
    record = b""
    while len(record) < ACK.size:
        chunk = sock.recv(ACK.size - len(record))
        if not chunk:
            return None
        record += chunk
    magic, version, _, settled, last_sequence, rejected = ACK.unpack(record)
    if magic != b"PA" or version != 1:
        raise ValueError("the server sent something that is not an acknowledgement")
    return settled, last_sequence, rejected
