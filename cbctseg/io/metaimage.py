"""MetaImage (.mha) headers read by us before SimpleITK reads the file: where its voxel data lives, and how much.

ITK's MetaIO follows `ElementDataFile` wherever it points (an absolute path, `../`, a `LIST` of files, a `%d`
pattern) and opens FIFOs and devices like files. Here the header is parsed as MetaIO parses it (`Key = Value`
or `Key : Value` lines, keys case-sensitive, reading stops at `ElementDataFile`), but strictly: any line MetaIO
could read differently is refused. Voxel data may only be in the file itself (LOCAL) or in a regular file of the
same folder, and sizes are computed with Python integers, so no product overflows.
"""
from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

# element types and their sizes in bytes (MetaIO's MET_ValueTypeSize; MET_LONG is 32-bit there)
ELEMENT_BYTES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4, "MET_LONG": 4,
    "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8,
}
MAX_HEADER_BYTES = 1 << 20
MAX_LINE = 499  # MetaIO reads a value with getline(500): a longer line would be cut where we do not cut it
# deflate cannot expand data by more than about 1032:1, so fewer compressed bytes cannot hold the voxels
MAX_DEFLATE_RATIO = 1032
LOCAL = ("LOCAL", "Local", "local")  # the spellings MetaIO takes for "data follows the header"
_LINE = re.compile(r"[ \t]*([A-Za-z][A-Za-z0-9_]*)[ \t]*[=:](.*)")
_FILE_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFDIR: "a folder", stat.S_IFCHR: "a character device",
               stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}


class MetaImageError(ValueError):
    """The file is not a MetaImage we read; the message says why (without the file name)."""


@dataclass(frozen=True)
class MetaHeader:
    """What the header says about the voxel data; sizes are Python integers."""

    ndims: int
    dim_size: tuple[int, ...]
    element_type: str
    channels: int
    data_file: Path | None  # None: LOCAL, the data follows the header
    data_offset: int  # where the data starts in its file (-1: it ends the file, MetaIO's HeaderSize = -1)
    compressed: bool
    compressed_size: int  # 0: not given
    binary: bool

    @property
    def voxels(self) -> int:
        n = 1
        for s in self.dim_size:
            n *= s
        return n

    @property
    def data_bytes(self) -> int | None:
        """Uncompressed bytes of voxel data the header describes (None: an element type we do not know)."""
        size = ELEMENT_BYTES.get(self.element_type)
        return None if size is None else self.voxels * self.channels * size


def open_regular(path: Path) -> int:
    """A read-only descriptor of `path` when it is a regular file (symbolic links followed); else MetaImageError.

    Opened non-blocking, so a FIFO is refused at once instead of waiting forever for a writer.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise MetaImageError(f"cannot be opened ({e.strerror})") from e
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise MetaImageError(f"not a regular file ({_FILE_KINDS.get(stat.S_IFMT(mode), 'a special file')})")
    return fd


def read_header(path: Path) -> tuple[MetaHeader, int]:
    """Parse the header of the MetaImage `path`; returns it and the size of the file `path`."""
    fd = open_regular(path)
    try:
        file_size = os.fstat(fd).st_size
        with os.fdopen(fd, "rb", closefd=False) as f:
            head = f.read(MAX_HEADER_BYTES)
    finally:
        os.close(fd)
    fields, header_end = _parse_fields(head)
    return _header(fields, header_end, Path(path)), file_size


def _parse_fields(head: bytes) -> tuple[dict[str, str], int]:
    """`Key = Value` lines up to and including ElementDataFile; returns them and the offset after that line."""
    fields: dict[str, str] = {}
    pos, line_no = 0, 0
    while True:
        end = head.find(b"\n", pos)
        if end < 0:
            raise MetaImageError("not a readable image (no MetaImage header ending in ElementDataFile)")
        raw = head[pos:end].rstrip(b"\r")
        pos, line_no = end + 1, line_no + 1
        if not raw.strip():
            continue
        if len(raw) > MAX_LINE or any(b < 0x20 and b != 0x09 for b in raw) or b"\x7f" in raw:
            raise MetaImageError(f"not a readable image (header line {line_no} is not a MetaImage field)")
        m = _LINE.fullmatch(raw.decode("latin-1"))
        if not m:
            raise MetaImageError(f"not a readable image (header line {line_no} is not a MetaImage field)")
        # MetaIO skips any run of separators and blanks before a value, and trailing blanks after it
        key, value = m.group(1), m.group(2).lstrip(" \t=:").rstrip(" \t")
        fields[key] = value
        if key == "ElementDataFile":
            return fields, pos


def _int(fields: dict[str, str], key: str, default: int | None = None) -> int:
    value = fields.get(key)
    if value is None:
        if default is None:
            raise MetaImageError(f"not a readable image (the MetaImage header has no {key})")
        return default
    if not re.fullmatch(r"[+-]?[0-9]+", value):
        raise MetaImageError(f"not a readable image ({key} = {value!r} is not an integer)")
    return int(value)


def _bool(fields: dict[str, str], key: str, default: bool) -> bool:
    value = fields.get(key)
    if value is None:
        return default
    if value.lower() in ("true", "1"):
        return True
    if value.lower() in ("false", "0"):
        return False
    raise MetaImageError(f"not a readable image ({key} = {value!r} is not True or False)")


def _data_file(value: str, folder: Path) -> Path | None:
    """The file ElementDataFile names, only a plain file name in the header's own folder (None: LOCAL)."""
    if value in LOCAL:
        return None
    if value.startswith("LIST"):
        raise MetaImageError("its voxel data is a LIST of other files; only data in the file itself "
                             "(ElementDataFile = LOCAL) or in one file beside it is read")
    if "%" in value:
        raise MetaImageError(f"its voxel data is a file pattern ({value!r}); only data in the file itself "
                             "(ElementDataFile = LOCAL) or in one file beside it is read")
    if not value or "/" in value or "\\" in value or value in (".", ".."):
        raise MetaImageError(f"its voxel data file {value!r} is outside the image's own folder; only data in "
                             "the file itself (ElementDataFile = LOCAL) or in one file beside it is read")
    return folder / value


def _header(fields: dict[str, str], header_end: int, path: Path) -> MetaHeader:
    ndims = _int(fields, "NDims")
    if not 1 <= ndims <= 16:
        raise MetaImageError(f"not a readable image (NDims = {ndims})")
    dims = fields.get("DimSize", "").split()
    if len(dims) != ndims or not all(re.fullmatch(r"[0-9]+", d) for d in dims) or any(int(d) < 1 for d in dims):
        raise MetaImageError(f"not a readable image (DimSize = {fields.get('DimSize')!r} is not {ndims} "
                             "positive integers)")
    element_type = fields.get("ElementType")
    if not element_type:
        raise MetaImageError("not a readable image (the MetaImage header has no ElementType)")
    channels = _int(fields, "ElementNumberOfChannels", 1)
    if channels < 1:
        raise MetaImageError(f"not a readable image (ElementNumberOfChannels = {channels})")
    data_file = _data_file(fields["ElementDataFile"], path.parent)
    header_size = _int(fields, "HeaderSize", 0)
    if header_size < -1:
        raise MetaImageError(f"not a readable image (HeaderSize = {header_size})")
    offset = header_size if header_size != 0 else (header_end if data_file is None else 0)
    compressed = _bool(fields, "CompressedData", False)
    compressed_size = _int(fields, "CompressedDataSize", 0) if compressed else 0
    if compressed_size < 0:
        raise MetaImageError(f"not a readable image (CompressedDataSize = {compressed_size})")
    return MetaHeader(ndims, tuple(int(d) for d in dims), element_type, channels, data_file, offset, compressed,
                      compressed_size, _bool(fields, "BinaryData", True))


def check_data(header: MetaHeader, file_size: int) -> None:
    """The voxel data is readable and at least as large as the header says (`file_size`: the header file's size).

    The data file must be a regular file; a truncated file is refused before anything is allocated for it.
    """
    if header.data_file is not None:
        fd = open_regular(header.data_file)
        try:
            file_size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        where = f"its data file {header.data_file.name}"
    else:
        where = "the file"
    available = file_size if header.data_offset == -1 else file_size - header.data_offset
    needed = header.data_bytes
    if needed is None:
        return
    if header.compressed:
        if header.compressed_size:
            needed, what = header.compressed_size, f"{header.compressed_size} bytes of compressed voxel data"
        else:
            needed, what = -(-needed // MAX_DEFLATE_RATIO), f"compressed voxel data for {needed} bytes"
    elif not header.binary:
        needed, what = header.voxels * header.channels, f"{header.voxels} voxels as text"
    else:
        what = f"{needed} bytes of voxel data"
    if available < needed:
        raise MetaImageError(f"the voxel data is truncated: the header describes {what}, {where} holds {max(available, 0)} bytes")
