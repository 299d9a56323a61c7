#!/usr/bin/env python3
"""Write the checked-in seed corpora of the fuzz targets (fuzz/corpus/).

Each seed is a well-formed case the target's input format describes, so
the fuzzer starts from inputs that reach deep into the code instead of
being refused at the first check. Run from anywhere: python3 make_seeds.py
(it rewrites only the seed-* files).
"""
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
AVAIL = 0x1000
NEXT, WRITE, INDIRECT = 1, 2, 4


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


class Image:
    """A guest memory image: descriptor table at 0, avail ring at 0x1000."""

    def __init__(self, size=0x5000):
        self.b = bytearray(size)

    def put(self, at, data):
        end = at + len(data)
        if end > len(self.b):
            self.b.extend(bytes(end - len(self.b)))
        self.b[at:end] = data

    def desc(self, index, addr, length, flags, nxt=0, table=0):
        self.put(table + 16 * index, struct.pack("<QIHH", addr, length, flags, nxt))

    def avail(self, heads):
        self.put(AVAIL, struct.pack("<HH", 0, len(heads)))
        for i, h in enumerate(heads):
            self.put(AVAIL + 4 + 2 * i, struct.pack("<H", h))


def ring_input(size_log2, image, extra=0, event_idx=False, next_avail=0):
    head = bytes([size_log2 | (0x80 if event_idx else 0)]) + struct.pack("<H", next_avail) + bytes([extra])
    return head + bytes(image.b)


def blk_seeds():
    def header(img, at, kind, sector):
        img.put(at, struct.pack("<IIQ", kind, 0, sector))

    # A read, a write, a flush and a GET_ID, each its own 3- or 2-descriptor chain.
    img = Image()
    header(img, 0x2000, 0, 1)
    img.desc(0, 0x2000, 16, NEXT, 1)
    img.desc(1, 0x2200, 512, WRITE | NEXT, 2)
    img.desc(2, 0x2400, 1, WRITE)
    header(img, 0x2600, 1, 2)
    img.desc(3, 0x2600, 16, NEXT, 4)
    img.desc(4, 0x2800, 1024, NEXT, 5)
    img.desc(5, 0x2c00, 1, WRITE)
    header(img, 0x2e00, 4, 0)
    img.desc(6, 0x2e00, 16, NEXT, 7)
    img.desc(7, 0x2f00, 1, WRITE)
    header(img, 0x3000, 8, 0)
    img.desc(8, 0x3000, 16, NEXT, 9)
    img.desc(9, 0x3100, 20, WRITE | NEXT, 10)
    img.desc(10, 0x3200, 1, WRITE)
    img.avail([0, 3, 6, 8])
    write("blk_chain", "four-requests", ring_input(4, img))
    # One read through an indirect table, on an EVENT_IDX ring.
    img = Image()
    header(img, 0x2000, 0, 4)
    img.desc(0, 0x2000, 16, NEXT, 1, table=0x3000)
    img.desc(1, 0x2200, 4096, WRITE | NEXT, 2, table=0x3000)
    img.desc(2, 0x4000, 1, WRITE, table=0x3000)
    img.desc(0, 0x3000, 48, INDIRECT)
    img.avail([0])
    write("blk_chain", "indirect-read", ring_input(3, img, event_idx=True))
    # Discard and write-zeroes with their segment.
    img = Image()
    header(img, 0x2000, 11, 0)
    img.put(0x2010, struct.pack("<QII", 8, 8, 0))
    img.desc(0, 0x2000, 32, NEXT, 1)
    img.desc(1, 0x2100, 1, WRITE)
    header(img, 0x2200, 13, 0)
    img.put(0x2210, struct.pack("<QII", 16, 8, 1))
    img.desc(2, 0x2200, 32, NEXT, 3)
    img.desc(3, 0x2300, 1, WRITE)
    img.avail([0, 2])
    write("blk_chain", "discard-write-zeroes", ring_input(2, img))


def net_seeds():
    # TX: header and frame in two descriptors, twice; one indirect.
    img = Image()
    img.put(0x2100, bytes(range(60)))
    img.desc(0, 0x2000, 12, NEXT, 1)
    img.desc(1, 0x2100, 60, 0)
    img.desc(2, 0x2200, 72, 0)
    img.desc(0, 0x2000, 12, NEXT, 1, table=0x3000)
    img.desc(1, 0x2100, 60, 0, table=0x3000)
    img.desc(3, 0x3000, 32, INDIRECT)
    img.avail([0, 2, 3])
    write("net_tx", "three-frames", ring_input(2, img, extra=8))
    # RX: four writable buffers, one a chain of two, one indirect.
    img = Image()
    img.desc(0, 0x2000, 2048, WRITE)
    img.desc(1, 0x2800, 64, WRITE | NEXT, 2)
    img.desc(2, 0x2900, 1500, WRITE)
    img.desc(0, 0x3400, 512, WRITE, table=0x3000)
    img.desc(3, 0x3000, 16, INDIRECT)
    img.desc(4, 0x4000, 128, WRITE)
    img.avail([0, 1, 3, 4])
    write("net_rx", "merged-buffers", ring_input(3, img, extra=0x0d))
    write("net_rx", "one-chain-each", ring_input(3, img, extra=0x0c))
    # Issue 18: a writable 16-byte descriptor whose next is itself.
    img = Image()
    img.desc(0, 0x2000, 16, WRITE | NEXT, 0)
    img.avail([0])
    write("net_rx", "self-loop", ring_input(4, img, extra=0x0c))


def inflight_seeds():
    qs = 16
    stride = (16 + 16 * qs + 63) // 64 * 64
    region = bytearray(2 * stride)
    for q in range(2):
        base = q * stride
        struct.pack_into("<QHHHH", region, base, 0, 1, qs, 3, 5)
        for i, (head, counter) in enumerate([(3, 7), (9, 2), (14, 11)]):
            at = base + 16 + 16 * head
            region[at] = 1
            struct.pack_into("<H", region, at + 6, i)
            struct.pack_into("<Q", region, at + 8, counter + q)
    head = bytes([4]) + struct.pack("<H", 5) + bytes([0]) + struct.pack("<H", 2 * stride // 64) + bytes([0, 0x41])
    write("inflight_begin", "three-in-flight", head + bytes(region))
    write("inflight_begin", "fresh", bytes([4, 0, 0, 1, 0x21, 0, 0, 0x42]) + bytes(2 * stride))


def control_seeds():
    blk_config = {
        "version": 1,
        "acked_features": 0x150007E44,
        "protocol_features": 0x10209,
        "memory": [{"file": {"device": 5, "inode": 42}, "file_offset": 0, "size_bytes": 16777216,
                    "guest_phys_addr": 0, "user_addr": 140000000000000}],
        "rings": [{"index": 0, "size": 16, "addresses": {"desc_table": 140000000000000,
                                                         "avail_ring": 140000000000256,
                                                         "used_ring": 140000000000296},
                   "next_avail": 0, "enabled": True, "kick_fd": True, "call_fd": True}],
        "device": {"blk": {"num_queues": 1, "queue_size": 16, "readonly": True, "direct": False,
                           "writeback": True}},
    }
    lines = [
        {"execute": "query-commands"},
        {"execute": "query-devices", "id": 1},
        {"execute": "query-metrics", "arguments": {"device": "dst", "format": "prometheus"}},
        {"execute": "query-config", "arguments": {"device": "src"}, "id": "x"},
        {"execute": "fence-release", "arguments": {"device": "dst"}},
        {"execute": "presetup", "arguments": {"device": "dst", "config": blk_config}},
        {"execute": "remove-device", "arguments": {"device": "src"}},
        {"execute": "add-device", "arguments": {"kind": "blk", "spec": "socket=/tmp/x.sock,image=/tmp/x.img,num-queues=2,queue-size=64"}},
        {"execute": "add-device", "arguments": {"kind": "net", "spec": "socket=/tmp/y.sock,dataplane=loop,queue-pairs=2,mtu=9000,rss=on"}},
        {"execute": "quit"},
    ]
    for i, line in enumerate(lines):
        write("control_line", "%02d-%s" % (i, line["execute"]), (json.dumps(line) + "\n").encode())
    write("control_line", "garbage", b"{\"execute\": 7, \"arguments\": [1,2]}\n")
    return blk_config


def presetup_seeds(blk_config):
    net_config = {
        "version": 1,
        "acked_features": 0x130000000,
        "protocol_features": 0,
        "memory": [{"file": {"device": 5, "inode": 7}, "file_offset": 4096, "size_bytes": 1073741824,
                    "guest_phys_addr": 4294967296, "user_addr": 139000000000000}],
        "rings": [{"index": i, "size": 256, "addresses": {"desc_table": 139000000000000 + i * 65536,
                                                          "avail_ring": 139000000004096 + i * 65536,
                                                          "used_ring": 139000000008192 + i * 65536},
                   "next_avail": 3, "enabled": True, "kick_fd": True, "call_fd": False} for i in range(4)],
        "device": {"net": {"mtu": 9000, "mac": [82, 84, 0, 18, 52, 86], "queue_pairs": 2,
                           "rss": {"hash_types": 0x3f, "key": list(range(40)),
                                   "indirection_table": [0, 1] * 64, "default_queue": 0}}},
    }
    write("presetup_config", "blk", json.dumps(blk_config).encode())
    write("presetup_config", "net", json.dumps(net_config).encode())
    changed = dict(net_config, device={"net": dict(net_config["device"]["net"], mtu=1500, rss=None)})
    write("presetup_config", "net-then-net", json.dumps(net_config).encode() + b"\0" + json.dumps(changed).encode())
    write("presetup_config", "blk-then-net", json.dumps(blk_config).encode() + b"\0" + json.dumps(net_config).encode())


# session_stream: vhost-user requests (fuzz_targets/session_stream.rs,
# `decode`, describes the encoding).
MEMFD, SEALED_MEMFD, EVENTFD, DEVNULL, PIPE = range(5)
RAM = 1 << 20
UADDR = 0x7F0000000000


def memfd(size, sealed=False):
    pages, extra = divmod(size, 4096)
    assert pages < 4096 and extra in (0, 512)
    return bytes([SEALED_MEMFD if sealed else MEMFD]) + struct.pack("<H", pages << 1 | (extra == 512))


def fd(kind):
    return bytes([kind])


def msg(code, payload=b"", fds=(), need_reply=False, size=None):
    """One message; `size`, if given, is the header's (raw) size field."""
    head = bytes([code - 1]) if 1 <= code <= 50 else b"\xf0" + struct.pack("<I", code)
    out = head + bytes([0x08 if need_reply else 0]) + struct.pack("<H", len(payload))
    out += b"\xff" if size is not None else b"\0"
    out += bytes([len(fds)]) + b"".join(fds) + payload
    return out + (struct.pack("<I", size) if size is not None else b"")


def raw(data):
    return b"\xff" + bytes([len(data)]) + data


def mem_table(regions, fds):
    """regions: (guest address, size, mmap offset); one fd each."""
    payload = struct.pack("<II", len(regions), 0)
    for i, (gpa, size, offset) in enumerate(regions):
        payload += struct.pack("<QQQQ", gpa, size, UADDR + i * 0x10000000, offset)
    return msg(5, payload, fds, need_reply=True)


def ring_setup(index, kick=None):
    base = UADDR + index * 0x4000
    out = msg(13, struct.pack("<Q", index), [fd(EVENTFD)])  # SET_VRING_CALL
    out += msg(8, struct.pack("<II", index, 256))  # SET_VRING_NUM
    out += msg(10, struct.pack("<II", index, 0))  # SET_VRING_BASE
    out += msg(9, struct.pack("<IIQQQQ", index, 0, base, base + 0x2000, base + 0x1000, 0))  # SET_VRING_ADDR
    out += msg(12, struct.pack("<Q", index), [kick or fd(EVENTFD)])  # SET_VRING_KICK
    return out


def session_seeds():
    features = 1 << 32 | 1 << 30  # VERSION_1, PROTOCOL_FEATURES
    protocol = 1 << 0 | 1 << 3 | 1 << 9  # MQ, REPLY_ACK, CONFIG
    connect = (msg(15) + msg(16, struct.pack("<Q", protocol)) + msg(17) + msg(3)
               + msg(1) + msg(24, struct.pack("<III", 0, 60, 0) + bytes(60)))
    start = (msg(2, struct.pack("<Q", features)) + mem_table([(0, RAM, 0)], [memfd(RAM, True)])
             + ring_setup(0) + msg(18, struct.pack("<II", 0, 1), need_reply=True))
    write("session_stream", "connect", connect)
    write("session_stream", "start", connect + start)
    stop = msg(18, struct.pack("<II", 0, 0), need_reply=True) + msg(11, struct.pack("<II", 0, 0))
    write("session_stream", "start-stop", connect + start + stop)
    write("session_stream", "owner-features", msg(3) + msg(2, struct.pack("<Q", features)))
    # Hostile: a header cut short, then the connection closes.
    write("session_stream", "truncated-header", msg(3) + raw(struct.pack("<I", 5) + b"\x01\0\0"))
    # A header whose size claims more than the protocol allows.
    write("session_stream", "oversized", msg(3) + msg(5, bytes(40), [memfd(RAM)], size=0x2000))
    # A region past the end of its memfd, and one at an offset past it.
    write("session_stream", "region-past-memfd",
          connect + msg(2, struct.pack("<Q", features)) + mem_table([(0, RAM, 0)], [memfd(0x10000, True)]))
    write("session_stream", "offset-past-memfd",
          connect + msg(2, struct.pack("<Q", features)) + mem_table([(0, 0x10000, RAM)], [memfd(RAM)]))
    # A kick fd that is a memfd, and a call fd that is a pipe's read end.
    write("session_stream", "kick-memfd",
          connect + msg(2, struct.pack("<Q", features)) + mem_table([(0, RAM, 0)], [memfd(RAM, True)])
          + ring_setup(1, kick=memfd(4096)) + msg(13, struct.pack("<Q", 1), [fd(PIPE)])
          + msg(18, struct.pack("<II", 1, 1), need_reply=True))
    # Fds on a request that carries none; a message split in two writes.
    write("session_stream", "stray-fds", msg(3, fds=[fd(DEVNULL), fd(EVENTFD)]) + msg(1))
    split = struct.pack("<III", 8, 1, 8) + struct.pack("<II", 0, 256)
    write("session_stream", "split", msg(3) + raw(split[:7]) + raw(split[7:]) + msg(1))


blk_seeds()
net_seeds()
inflight_seeds()
presetup_seeds(control_seeds())
session_seeds()
