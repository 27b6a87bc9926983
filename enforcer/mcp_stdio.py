"""The gateway on stdio: what an MCP client launches instead of the server.

``wrap`` spawns ``SERVER ARGS...`` with pipes, relays newline-delimited JSON-RPC in both
directions through a :class:`enforcer.mcp_gateway.Gateway`, and passes the server's stderr and
exit status through. The gateway's own stdin and stdout are the client's pipes. One gateway run
is one session. When the client closes stdin, the server's stdin is closed and the server is
given ``grace`` seconds to exit before it is terminated (then killed), as the MCP stdio transport
prescribes for clients; SIGTERM and SIGINT end the server the same way.
"""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Sequence

import structlog

from . import mcp_protocol as proto
from .mcp_gateway import Gateway, new_session_id

log = structlog.get_logger("envelope.mcp.stdio")

CHUNK = 256 * 1024


class StdioRelay:
    def __init__(self, gateway: Gateway, argv: Sequence[str], session: str, grace: float = 2.0,
                 stdin_fd: int = 0, stdout_fd: int = 1, flush_every: float = 30.0):
        if not argv:
            raise ValueError("no server command given")
        self.gateway = gateway
        self.argv = list(argv)
        self.session = session
        self.grace = grace
        self.stdin_fd = stdin_fd
        self.stdout_fd = stdout_fd
        self.limit = gateway.core.limits.max_message_bytes
        self.flush_every = flush_every

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        proc = await asyncio.create_subprocess_exec(*self.argv, stdin=asyncio.subprocess.PIPE,
                                                    stdout=asyncio.subprocess.PIPE, limit=CHUNK)
        client_in = asyncio.StreamReader(limit=CHUNK)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(client_in),
                                     os.fdopen(os.dup(self.stdin_fd), "rb", buffering=0))
        out_transport, out_protocol = await loop.connect_write_pipe(
            asyncio.streams.FlowControlMixin, os.fdopen(os.dup(self.stdout_fd), "wb", buffering=0))
        client_out = asyncio.StreamWriter(out_transport, out_protocol, None, loop)
        self.gateway.open(self.session, {"transport": "stdio", "command": os.path.basename(self.argv[0])})
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):
                pass
        to_server = asyncio.create_task(self._client_to_server(client_in, proc, client_out))
        to_client = asyncio.create_task(self._server_to_client(proc, client_out))
        stopped = asyncio.create_task(stop.wait())
        flusher = asyncio.create_task(self.gateway.flush_periodically(self.flush_every))
        try:
            await asyncio.wait({to_client, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            to_server.cancel()
            await self._end(proc)
            to_client.cancel()
            stopped.cancel()
            flusher.cancel()
            await asyncio.gather(to_server, to_client, stopped, flusher, return_exceptions=True)
            try:
                client_out.close()
            except (BrokenPipeError, ConnectionResetError, RuntimeError):
                pass
            self.gateway.close(self.session)
            self.gateway.flush()
            for sig in (signal.SIGTERM, signal.SIGINT):
                try:
                    loop.remove_signal_handler(sig)
                except (NotImplementedError, RuntimeError):
                    pass
        return proc.returncode if proc.returncode is not None else 1

    async def _write(self, writer: asyncio.StreamWriter, data: bytes) -> bool:
        try:
            writer.write(data + b"\n")
            await writer.drain()
            return True
        except (BrokenPipeError, ConnectionResetError, RuntimeError):
            return False

    async def _client_to_server(self, reader: asyncio.StreamReader, proc, client_out) -> None:
        framer = proto.LineFramer(self.limit)
        while True:
            chunk = await reader.read(CHUNK)
            items = framer.feed(chunk) if chunk else framer.close()
            for item in items:
                if isinstance(item, proto.Oversized):
                    d = self.gateway.client_oversized(self.session, item.size, item.prefix)
                    if d.reply is not None:
                        await self._write(client_out, d.reply)
                    continue
                d = self.gateway.client(self.session, item)
                if d.reply is not None:
                    await self._write(client_out, d.reply)
                if d.forward is not None and not await self._write(proc.stdin, d.forward):
                    return
            if not chunk:
                break
        try:
            proc.stdin.close()
        except (BrokenPipeError, ConnectionResetError, RuntimeError):
            pass

    async def _server_to_client(self, proc, client_out) -> None:
        framer = proto.LineFramer(self.limit)
        while True:
            chunk = await proc.stdout.read(CHUNK)
            items = framer.feed(chunk) if chunk else framer.close()
            for item in items:
                if isinstance(item, proto.Oversized):
                    d = self.gateway.server_oversized(self.session, item.size, item.prefix)
                else:
                    d = self.gateway.server(self.session, item)
                if d.forward is not None:
                    await self._write(client_out, d.forward)
            if not chunk:
                break
        await proc.wait()

    async def _end(self, proc) -> None:
        if proc.returncode is not None:
            return
        try:
            proc.stdin.close()
        except (BrokenPipeError, ConnectionResetError, RuntimeError):
            pass
        for sig, wait in ((None, self.grace), (signal.SIGTERM, self.grace), (signal.SIGKILL, 5.0)):
            if sig is not None:
                try:
                    proc.send_signal(sig)
                except ProcessLookupError:
                    return
            try:
                await asyncio.wait_for(proc.wait(), wait)
                return
            except asyncio.TimeoutError:
                continue


def wrap(gateway: Gateway, workload, argv: Sequence[str], *, session: str | None = None, grace: float = 2.0,
         flush_every: float = 30.0) -> int:
    """Run ``argv`` as an MCP stdio server behind ``gateway``; return the server's exit status."""
    sid = session or new_session_id()
    log.info("mcp gateway (stdio)", workload=str(workload), mode=gateway.core.mode, session=sid,
             command=argv[0] if argv else None)
    return asyncio.run(StdioRelay(gateway, argv, sid, grace, flush_every=flush_every).run())

