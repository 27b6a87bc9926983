"""Aborting a TCP socket by its cookie, through the kernel's sock_diag netlink (``ss -K``).

When the request capture refuses a plaintext request, the process is killed and the socket's
packets are dropped by the capture's egress program; but the bytes the killed ``write`` queued stay
in the orphaned socket, which TCP retransmits after the programs are gone. :func:`abort` destroys
that socket (``SOCK_DESTROY``, CONFIG_INET_DIAG_DESTROY): it is found by its cookie in a dump of the
TCP sockets going to its destination port, then destroyed by its full identity, so nothing queued
in it is ever sent.
"""

from __future__ import annotations

import os
import socket
import struct

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
SOCK_DESTROY = 21
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
ALL_STATES = 0xFFF
_NLMSG = struct.Struct("=IHHII")
# inet_diag_req_v2: family, protocol, ext, pad, states, then inet_diag_sockid:
# sport, dport (be16), src[4], dst[4] (be32 words), if, cookie[2]
_REQ = struct.Struct("=BBBBI")
_SOCKID = struct.Struct(">HH16s16s")
_SOCKID_TAIL = struct.Struct("=III")
# inet_diag_msg: family, state, timer, retrans, then the sockid, expires, rqueue, wqueue, uid, inode
_MSG_HEAD = struct.Struct("=BBBB")


def _request(kind: int, flags: int, family: int, sockid: bytes, seq: int) -> bytes:
    body = _REQ.pack(family, socket.IPPROTO_TCP, 0, 0, ALL_STATES) + sockid
    return _NLMSG.pack(_NLMSG.size + len(body), kind, flags, seq, 0) + body


def _messages(sock: socket.socket):
    while True:
        data = sock.recv(65536)
        off = 0
        while off + _NLMSG.size <= len(data):
            length, kind, _flags, _seq, _pid = _NLMSG.unpack_from(data, off)
            if length < _NLMSG.size:
                return
            yield kind, data[off + _NLMSG.size:off + length]
            if kind in (NLMSG_DONE, NLMSG_ERROR):
                return
            off += (length + 3) & ~3


def abort(cookie: int, dport: int = 0) -> bool:
    """Destroy the TCP socket with this cookie (going to ``dport``, 0: any); True if it was."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as nl:
        for family in (socket.AF_INET, socket.AF_INET6):
            any_id = _SOCKID.pack(0, dport, b"\0" * 16, b"\0" * 16) + _SOCKID_TAIL.pack(0, 0xFFFFFFFF, 0xFFFFFFFF)
            nl.send(_request(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, family, any_id, 1))
            found = None
            for kind, body in _messages(nl):
                if kind != SOCK_DIAG_BY_FAMILY or len(body) < 4 + _SOCKID.size + _SOCKID_TAIL.size:
                    continue
                sid = body[4:4 + _SOCKID.size + _SOCKID_TAIL.size]
                _ifx, c0, c1 = _SOCKID_TAIL.unpack_from(sid, _SOCKID.size)
                sport, dp, _src, _dst = _SOCKID.unpack_from(sid)
                if (c1 << 32 | c0) == cookie and (not dport or dp == dport):
                    found = sid
            if found is None:
                continue
            nl.send(_request(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, family, found, 2))
            for kind, body in _messages(nl):
                if kind == NLMSG_ERROR:
                    err = struct.unpack_from("=i", body)[0]
                    if err:
                        raise OSError(-err, f"SOCK_DESTROY of socket {cookie}: {os.strerror(-err)}")
                    return True
    return False


__all__ = ["abort"]
