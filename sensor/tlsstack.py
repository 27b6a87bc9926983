"""Which TLS stack a process uses, and whether the request capture can see its requests.

A process's requests over TLS are observable when its TLS library is one the capture puts
uprobes on: OpenSSL (or a library exporting OpenSSL's API) mapped as a shared ``libssl``, or
linked into the executable with its symbols (``SSL_write_ex``/``SSL_write`` and the read side
in its symbol tables). Other stacks are blind spots of the workload, named in its review report:
Go's ``crypto/tls``, rustls, GnuTLS, NSS, and OpenSSL or BoringSSL linked in without symbols.

:func:`classify` is pure (a process's mapped files and facts about its executable in, a
:class:`TlsStack` out); :func:`elf_facts` and :func:`mapped_files` are the edges that read
``/proc/PID/maps`` and ELF files (through ``/proc/PID/root`` for processes in containers).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

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
    except (OSError, ELFError, ValueError):
        return ElfFacts()
    return ElfFacts(symbols, go, rustls, boringssl)


__all__ = ["ElfFacts", "OBSERVABLE", "SSL_FUNCTIONS", "TlsStack", "classify", "elf_facts", "host_path",
           "is_libssl", "mapped_files"]
