"""Host-side decompression of a bzImage payload (arch/x86/boot/compressed).

Linux compresses ``vmlinux.bin`` (the stripped ELF kernel, plus relocation data) with
one of six codecs, chosen by CONFIG_KERNEL_{GZIP,BZIP2,LZMA,XZ,LZO,LZ4,ZSTD}, and
(except for some gzip builds) appends the decompressed size as a little-endian u32
(scripts/Makefile.lib ``size_append``). Every decoder here therefore stops at the
end of its stream and ignores what follows.

On hosts that interpret guest ring-0 code (see docs/emulation-only-hosts.md) the in-guest
decompressor would take minutes; doing it here takes a fraction of a second.
"""

from __future__ import annotations

import struct
import zlib

from vmm.loader.errors import LoaderError

#: Magic bytes at the start of each payload format, in the order they are tried.
MAGICS: tuple[tuple[str, bytes], ...] = (
    ("gzip", b"\x1f\x8b"),                    # RFC 1952 ID1 ID2
    ("xz", b"\xfd7zXZ\x00"),                  # .xz stream header
    ("bzip2", b"BZh"),                        # bzip2 stream header
    ("lz4", b"\x02\x21\x4c\x18"),             # lz4 legacy frame, magic 0x184C2102 (LE)
    ("zstd", b"\x28\xb5\x2f\xfd"),            # zstd frame, magic 0xFD2FB528 (LE)
    ("lzma", b"\x5d\x00\x00"),                # .lzma "alone": props 0x5d + dict size
    ("lzo", b"\x89LZO\x00\r\n\x1a\n"),         # lzop file header (no host decoder)
    ("none", b"\x7fELF"),                     # an uncompressed vmlinux.bin
)

#: lz4 legacy format: every chunk decompresses to at most 8 MiB
#: (lib/decompress_unlz4.c, LZ4_DEFAULT_UNCOMPRESSED_CHUNK_SIZE).
LZ4_LEGACY_MAGIC = 0x184C2102
LZ4_LEGACY_CHUNK_SIZE = 8 << 20

#: Input is fed to the zstd decoder in slices this small, so one call cannot
#: produce more than a few hundred MiB before the output limit is checked.
_ZSTD_FEED = 4096


def detect_codec(payload: bytes | memoryview) -> str | None:
    """Name the payload codec from its magic bytes ("gzip", "xz", ..., "none"), or None."""
    head = bytes(payload[:16])
    for name, magic in MAGICS:
        if head.startswith(magic):
            return name
    return None


def decompress(payload: bytes | memoryview, codec: str, limit: int) -> bytes:
    """Decompress one kernel payload.

    Args:
        payload: the compressed bytes, possibly followed by trailing bytes (the size).
        codec: a name returned by :func:`detect_codec`.
        limit: the most bytes the result may have (guest RAM: more could not be loaded).
    Returns:
        The decompressed bytes (for Linux, an ELF vmlinux followed by relocations).
    Raises:
        LoaderError: unknown codec, corrupt or truncated stream, or output over ``limit``.
    """
    try:
        fn = _DECODERS[codec]
    except KeyError:
        raise LoaderError(f"no host-side decompressor for {codec!r} payloads") from None
    try:
        out = fn(bytes(payload) if not isinstance(payload, bytes) else payload, limit)
    except LoaderError:
        raise
    except Exception as e:  # zlib.error, LZMAError, OSError, EOFError, ZstdError, LZ4BlockError...
        raise LoaderError(f"{codec} payload is corrupt ({e})") from None
    if len(out) > limit:
        raise LoaderError(f"{codec} payload decompresses to more than {limit >> 20} MiB")
    return out


def _truncated(codec: str) -> LoaderError:
    return LoaderError(f"{codec} payload is truncated (stream ends early)")


def _too_big(codec: str, limit: int) -> LoaderError:
    return LoaderError(f"{codec} payload decompresses to more than {limit >> 20} MiB")


def _gzip(data: bytes, limit: int) -> bytes:
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)   # gzip wrapper, stop at stream end
    out = d.decompress(data, limit + 1)
    if len(out) > limit:
        raise _too_big("gzip", limit)
    if not d.eof:
        raise _truncated("gzip")
    return out


def _stdlib(codec: str, make):
    def run(data: bytes, limit: int) -> bytes:
        d = make()
        out = d.decompress(data, max_length=limit + 1)
        if len(out) > limit:
            raise _too_big(codec, limit)
        if not d.eof:
            raise _truncated(codec)
        return out
    return run


def _lz4_legacy(data: bytes, limit: int) -> bytes:
    """The lz4 *legacy* format made by ``lz4 -l`` (what Linux uses).

    It is not an LZ4 frame (magic 0x184D2204), so ``lz4.frame`` cannot read it: it is
    the magic 0x184C2102 followed by chunks, each a u32 compressed size and one raw
    LZ4 block of at most 8 MiB decompressed. A repeated magic starts a new stream
    (concatenated files). Four bytes left at the end are the size Linux appends.
    """
    import lz4.block

    out = bytearray()
    pos, n = 4, len(data)
    while n - pos >= 4:
        size = struct.unpack_from("<I", data, pos)[0]
        if size == LZ4_LEGACY_MAGIC:
            pos += 4
            continue
        if n - pos == 4:            # only the appended decompressed size is left
            break
        pos += 4
        if size == 0 or size > n - pos:
            raise _truncated("lz4")
        out += lz4.block.decompress(data[pos:pos + size],
                                    uncompressed_size=LZ4_LEGACY_CHUNK_SIZE)
        pos += size
        if len(out) > limit:
            raise _too_big("lz4", limit)
    if not out:
        raise _truncated("lz4")
    return bytes(out)


def _zstd(data: bytes, limit: int) -> bytes:
    """One zstd frame; streamed, because Linux's frame may omit the content size."""
    import zstandard

    # zstd -22 --ultra (what Linux uses) may need a window up to 2 GiB.
    d = zstandard.ZstdDecompressor(max_window_size=1 << 31).decompressobj()
    out = bytearray()
    for pos in range(0, len(data), _ZSTD_FEED):
        out += d.decompress(data[pos:pos + _ZSTD_FEED])
        if len(out) > limit:
            raise _too_big("zstd", limit)
        if d.eof:
            break
    if not d.eof:
        raise _truncated("zstd")
    return bytes(out)


def _none(data: bytes, limit: int) -> bytes:
    return data


def _lzma_decompressor(fmt: str):
    import lzma   # imported on use: most boots never decompress (start-up time)
    return lzma.LZMADecompressor(getattr(lzma, fmt))


def _bz2_decompressor():
    import bz2
    return bz2.BZ2Decompressor()


_DECODERS = {
    "gzip": _gzip,
    "xz": _stdlib("xz", lambda: _lzma_decompressor("FORMAT_XZ")),
    "lzma": _stdlib("lzma", lambda: _lzma_decompressor("FORMAT_ALONE")),
    "bzip2": _stdlib("bzip2", _bz2_decompressor),
    "lz4": _lz4_legacy,
    "zstd": _zstd,
    "none": _none,
}
