"""Which TLS stack a process uses, and whether the request capture can see its requests.

A process's requests over TLS are observable when its TLS library is one the capture puts
uprobes on: OpenSSL (or a library exporting OpenSSL's API) mapped as a shared ``libssl``, or
linked into the executable with its symbols (``SSL_write_ex``/``SSL_write`` and the read side
in its symbol tables). Other stacks are blind spots of the workload, named in its review report:
Go's ``crypto/tls``, rustls, GnuTLS, NSS, and OpenSSL or BoringSSL linked in without symbols.

:func:`classify` is pure (a process's mapped files and facts about its executable in, a
:class:`TlsStack` out); :func:`elf_facts` and :func:`mapped_files` are the edges that read
``/proc/PID/maps`` and ELF files (through ``/proc/PID/root`` for processes in containers).

Where the probes go (:func:`probe_sites`, pure given the code bytes): a uprobe on an
instruction the kernel has to single-step out of line costs a second trap, and in this VM that
trap costs about 15 µs against about 0.4 µs for an instruction the kernel emulates (a register
push, a call or jump, a nop; BENCHMARKS.md, section 8). OpenSSL 3's ``SSL_read_ex`` and
``SSL_write_ex`` begin with ``sub $8,%rsp``, then call the function that does the work (with
the same arguments); ``SSL_read``/``SSL_write`` call that same function. So when a function's
first instruction (after an ``endbr64``) is not emulated but the function is such a stub, its
probes go on the called function's first instruction, where the arguments, the stack (a return
probe needs the return address on top) and the meaning of the result (> 0: done, the byte
count in the fourth argument) are those of the ``_ex`` form; ``SSL_read``/``SSL_write`` that
call it need no probes of their own. Anything else keeps its probes on the function's first
instruction: correct, and as slow as the kernel makes it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Callable

SSL_FUNCTIONS = ("SSL_write", "SSL_write_ex", "SSL_read", "SSL_read_ex", "SSL_do_handshake")
OBSERVABLE = ("openssl-dynamic", "openssl-static")
_LIBSSL = re.compile(r"/libssl\.so(\.[0-9.]+)?$")          # OpenSSL's; NSS's is libssl3.so
_GNUTLS = re.compile(r"/libgnutls\.so")
_NSS = re.compile(r"/libnss3\.so")
_SCAN = 64 << 20  # bytes of an executable searched for a TLS library's name


@dataclass(frozen=True)
class ElfFacts:
    """What an executable or library says about TLS."""

    symbols: dict = field(default_factory=dict)  # SSL_* function -> file offset of its code
    sites: tuple = ()  # ProbeSite: where the capture's probes go (probe_sites)
    go: bool = False
    rustls: bool = False
    boringssl: bool = False

    @property
    def hookable(self) -> bool:
        """The write and read sides the capture needs are all there."""
        return ("SSL_write_ex" in self.symbols or "SSL_write" in self.symbols) and (
            "SSL_read_ex" in self.symbols or "SSL_read" in self.symbols)


@dataclass(frozen=True)
class TlsStack:
    kind: str           # openssl-dynamic | openssl-static | boringssl-static | go | rustls | gnutls | nss | none
    library: str = ""   # the file whose functions are hooked, or that names the stack
    observable: bool = True

    @property
    def text(self) -> str:
        return f"{self.kind}:{self.library}" if self.library else self.kind


def is_libssl(path: str) -> bool:
    """OpenSSL's libssl (not NSS's libssl3)."""
    return bool(_LIBSSL.search(path))


def classify(mapped: list[str], exe: str, exe_facts: ElfFacts, hooked: set[str]) -> TlsStack:
    """The TLS stack of a process from its mapped files (``mapped``, paths as the process sees
    them), its executable (path and ELF facts) and which mapped libssl files carry probes."""
    for path in mapped:
        if is_libssl(path):
            return TlsStack("openssl-dynamic", path, path in hooked)
    if exe_facts.hookable:
        kind = "boringssl-static" if exe_facts.boringssl else "openssl-static"
        return TlsStack(kind, exe, True)
    if exe_facts.go:
        return TlsStack("go", exe, False)
    if exe_facts.rustls:
        return TlsStack("rustls", exe, False)
    for path in mapped:
        if _GNUTLS.search(path):
            return TlsStack("gnutls", path, False)
        if _NSS.search(path):
            return TlsStack("nss", path, False)
    if exe_facts.boringssl:
        return TlsStack("boringssl-static", exe, False)
    return TlsStack("none", "", True)


@dataclass(frozen=True)
class ProbeSite:
    """Where the entry and return probes for calls of ``function`` go: the instruction at file
    offset ``offset``, the function's own (``body`` False) or the one its stub calls."""

    function: str
    offset: int
    body: bool = False          # the function the stub calls, with the ``_ex`` form's arguments
    single_step: bool = False   # the kernel single-steps the instruction: a hit costs a second trap


_ENDBR64 = b"\xf3\x0f\x1e\xfa"
_NOP5 = b"\x0f\x1f\x44\x00\x00"
_STUB_OF = {"SSL_read": "SSL_read_ex", "SSL_write": "SSL_write_ex"}
_CODE = 192  # bytes of a function read to find its call of the body


def emulated(code: bytes) -> bool:
    """Whether x86-64 Linux emulates the instruction ``code`` begins with when a uprobe hits it
    (no single step): a register push, a relative call or jump, a conditional jump, a nop."""
    if not code:
        return False
    b0 = code[0]
    if 0x50 <= b0 <= 0x57 or 0x70 <= b0 <= 0x7f or b0 in (0x90, 0xe8, 0xe9, 0xeb):
        return True
    if len(code) < 2:
        return False
    return (b0 == 0x41 and 0x50 <= code[1] <= 0x57) or (b0 == 0x0f and 0x80 <= code[1] <= 0x8f) or code.startswith(_NOP5)


def entry_site(code: bytes) -> int | None:
    """Where in a function (``code`` from its first byte) entry and return probes can sit without
    a single step, with the arguments and the return address on top of the stack as at the call:
    0, or 4 after an ``endbr64``; None when that instruction is not emulated."""
    skip = len(_ENDBR64) if code.startswith(_ENDBR64) else 0
    return skip if emulated(code[skip:]) else None


def stub_target(code: bytes) -> int | None:
    """A function that is ``[endbr64] sub $imm8,%rsp; call rel32`` first: where the call goes,
    relative to the function's first byte (the arguments registers are untouched)."""
    skip = len(_ENDBR64) if code.startswith(_ENDBR64) else 0
    c = code[skip:skip + 9]
    if len(c) == 9 and c[:3] == b"\x48\x83\xec" and c[4] == 0xe8:
        return skip + 9 + int.from_bytes(c[5:9], "little", signed=True)
    return None


def calls(code: bytes, at: int, target: int) -> bool:
    """Whether the code at file offset ``at`` has a relative call to file offset ``target``."""
    return any(code[i] == 0xe8 and at + i + 5 + int.from_bytes(code[i + 1:i + 5], "little", signed=True) == target
               for i in range(len(code) - 4))


def probe_sites(symbols: dict[str, int], read: Callable[[int, int], bytes]) -> tuple[ProbeSite, ...]:
    """Where the probes on each SSL_* function in ``symbols`` go (see the module docstring);
    ``read(offset, n)`` gives the file's bytes (fewer at its end)."""
    sites: dict[str, ProbeSite] = {}
    for fn in SSL_FUNCTIONS:
        off = symbols.get(fn)
        if off is None:
            continue
        code = read(off, 16)
        at = entry_site(code)
        if at is not None:
            sites[fn] = ProbeSite(fn, off + at)
            continue
        t = stub_target(code) if fn.endswith("_ex") else None
        if t is not None:
            at = entry_site(read(off + t, 16))
            if at is not None:
                sites[fn] = ProbeSite(fn, off + t + at, body=True)
                continue
        sites[fn] = ProbeSite(fn, off, single_step=True)
    for plain, ex in _STUB_OF.items():
        p, e = sites.get(plain), sites.get(ex)
        if p is None or e is None or not e.body:
            continue
        body = e.offset - (len(_ENDBR64) if read(e.offset - 4, 4) == _ENDBR64 else 0)
        if calls(read(p.offset, _CODE), p.offset, body):
            del sites[plain]  # seen through the body its _ex form's probes are on
        else:  # it may reach the body some other way: one call must never be probed twice
            sites[ex] = ProbeSite(ex, symbols[ex], single_step=True)
    return tuple(sites.values())


# ---- the edges: /proc and ELF files ---------------------------------------------------------


def mapped_files(pid: int, proc: str = "/proc") -> list[str]:
    """Paths of the files a process maps, in first-mapped order (empty when it is gone)."""
    out: list[str] = []
    seen = set()
    try:
        with open(f"{proc}/{pid}/maps", "rb") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6:
                    path = parts[5].rstrip(b"\n").decode("utf-8", "surrogateescape")
                    if path.startswith("/") and path not in seen:
                        seen.add(path)
                        out.append(path)
    except OSError:
        return []
    return out


def host_path(pid: int, path: str, proc: str = "/proc") -> str:
    """A path a process sees, reachable from here (through its root, for containers)."""
    return f"{proc}/{pid}/root{path}"


def elf_facts(path: str) -> ElfFacts:
    """Symbols of the SSL_* functions (file offsets), and the marks of other TLS stacks."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    symbols: dict[str, int] = {}
    go = rustls = boringssl = False
    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            names = {s.name for s in elf.iter_sections()}
            go = ".go.buildinfo" in names or ".gopclntab" in names or ".note.go.buildid" in names
            for secname in (".dynsym", ".symtab"):
                sec = elf.get_section_by_name(secname)
                if sec is None or not hasattr(sec, "get_symbol_by_name"):
                    continue
                for fn in SSL_FUNCTIONS:
                    if fn in symbols:
                        continue
                    for sym in sec.get_symbol_by_name(fn) or ():
                        if sym["st_info"]["type"] == "STT_FUNC" and sym["st_shndx"] != "SHN_UNDEF" and sym["st_value"]:
                            offs = list(elf.address_offsets(sym["st_value"]))
                            if offs:
                                symbols[fn] = offs[0]
                                break
            if not symbols or "SSL_write_ex" not in symbols:
                size = os.fstat(f.fileno()).st_size
                f.seek(0)
                blob = f.read(min(size, _SCAN))
                rustls = b"rustls" in blob
                boringssl = b"BoringSSL" in blob

            def read(off: int, n: int) -> bytes:
                f.seek(max(off, 0))
                return f.read(n) if off >= 0 else b""

            sites = probe_sites(symbols, read)
    except (OSError, ELFError, ValueError):
        return ElfFacts()
    return ElfFacts(symbols, sites, go, rustls, boringssl)


__all__ = ["ElfFacts", "OBSERVABLE", "ProbeSite", "SSL_FUNCTIONS", "TlsStack", "calls", "classify", "elf_facts",
           "emulated", "entry_site", "host_path", "is_libssl", "mapped_files", "probe_sites", "stub_target"]
