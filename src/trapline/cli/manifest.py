"""Image manifests for ``trapline job create --manifest``, read as a stream.

A manifest is JSON (a list of ``{id, url}`` objects or of URLs, bare or under
``"images"``), CSV with a ``url`` column and optionally an ``id`` column, or
one URL per line. In CSV and URL lists, blank lines and ``#`` lines are skipped.

Lines, CSV rows and the items of a top-level JSON list are read one at a time,
so a manifest of millions of images is never in memory at once (an object with
``"images"`` is the exception: it is parsed whole).
"""

from __future__ import annotations

import codecs
import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from trapline.cli.client import CliError

_CHUNK_BYTES = 1 << 20
_BOM = codecs.BOM_UTF8


class Manifest:
    """The images of a manifest file, one at a time; ``bytes_read`` says how far it got."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.size = path.stat().st_size
            self._file: IO[bytes] = path.open("rb")
        except OSError as exc:
            raise CliError(f"cannot read manifest {path}: {exc.strerror or exc}") from None
        self.bytes_read = 0

    def __enter__(self) -> Manifest:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()

    def images(self) -> Iterator[dict[str, Any]]:
        """``{"url", "id"?}`` per image, in manifest order; CliError on the first bad item."""
        head = self._file.read(_CHUNK_BYTES)
        self._file.seek(0)
        text_head = head.removeprefix(_BOM).decode("utf-8", errors="replace").lstrip()
        if self.path.suffix.lower() == ".json" or text_head.startswith(("[", "{")):
            found = self._json_items(text_head.startswith("{"))
        else:
            found = self._line_items()
        empty = True
        for image in found:
            empty = False
            yield image
        if empty:
            raise CliError(f"manifest {self.path} lists no images")

    # -- URL lists and CSV ---------------------------------------------------------

    def _lines(self) -> Iterator[str]:
        """Non-blank, non-comment lines, decoded; counts the bytes consumed."""
        for number, raw in enumerate(self._file, start=1):
            self.bytes_read += len(raw)
            if number == 1:
                raw = raw.removeprefix(_BOM)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise CliError(f"manifest {self.path} is not UTF-8 text") from None
            if line.strip() and not line.lstrip().startswith("#"):
                yield line.rstrip("\r\n")

    def _line_items(self) -> Iterator[dict[str, Any]]:
        lines = self._lines()
        first = next(lines, None)
        if first is None:
            return
        header = [h.strip().lower() for h in next(csv.reader([first]))]
        if self.path.suffix.lower() == ".csv" or "url" in header:
            yield from self._csv_items(lines, header)
            return
        yield {"url": first.strip()}
        for line in lines:
            yield {"url": line.strip()}

    def _csv_items(self, lines: Iterator[str], header: list[str]) -> Iterator[dict[str, Any]]:
        if "url" not in header:
            raise CliError(f"manifest {self.path}: CSV needs a 'url' column (and optionally 'id')")
        url_at = header.index("url")
        id_at = header.index("id") if "id" in header else None
        for n, row in enumerate(csv.reader(lines), start=2):
            if len(row) <= url_at:
                raise CliError(f"manifest {self.path}: row {n} has no url")
            image: dict[str, Any] = {"url": row[url_at].strip()}
            if id_at is not None and len(row) > id_at and row[id_at].strip():
                image["id"] = row[id_at].strip()
            yield image

    # -- JSON ------------------------------------------------------------------------

    def _json_items(self, is_object: bool) -> Iterator[dict[str, Any]]:
        values = self._json_whole() if is_object else self._json_list()
        for n, item in enumerate(values, start=1):
            if isinstance(item, str):
                yield {"url": item}
            elif isinstance(item, dict) and "url" in item:
                image: dict[str, Any] = {"url": item["url"]}
                if item.get("id") is not None:
                    image["id"] = str(item["id"])
                yield image
            else:
                raise CliError(
                    f"manifest {self.path}: item {n} is not a URL or an object with 'url'"
                )

    def _json_whole(self) -> Iterator[Any]:
        raw = self._file.read()
        self.bytes_read = len(raw)
        try:
            data = json.loads(raw.removeprefix(_BOM).decode("utf-8"))
        except UnicodeDecodeError:
            raise CliError(f"manifest {self.path} is not UTF-8 text") from None
        except ValueError as exc:
            raise self._invalid(exc) from None
        if isinstance(data, dict) and isinstance(data.get("images"), list):
            data = data["images"]
        if not isinstance(data, list):
            raise CliError(f"manifest {self.path}: expected a JSON list of {{id, url}} objects")
        yield from data

    def _json_list(self) -> Iterator[Any]:
        """The items of a top-level JSON list, decoded one at a time from 1 MB chunks."""
        decoder = json.JSONDecoder()
        utf8 = codecs.getincrementaldecoder("utf-8-sig")()
        buf, pos, eof = "", 0, False

        def more() -> bool:
            """Append the next chunk to the unread text; False at the end of the file."""
            nonlocal buf, pos, eof
            if eof:
                return False
            chunk = self._file.read(_CHUNK_BYTES)
            self.bytes_read += len(chunk)
            eof = not chunk
            try:
                buf = buf[pos:] + utf8.decode(chunk, final=eof)
            except UnicodeDecodeError:
                raise CliError(f"manifest {self.path} is not UTF-8 text") from None
            pos = 0
            return not eof

        def skip_space() -> str:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos].isspace():
                    pos += 1
                if pos < len(buf):
                    return buf[pos]
                if not more():
                    return ""

        if skip_space() != "[":
            raise self._invalid("expected a list")
        pos += 1
        expect_item = False
        while True:
            char = skip_space()
            if char == "]" and not expect_item:
                return
            if not char:
                raise self._invalid("the list is not closed")
            while True:
                try:
                    item, end = decoder.raw_decode(buf, pos)
                except ValueError as exc:
                    if more():
                        continue
                    raise self._invalid(exc) from None
                if end < len(buf) or eof:
                    break
                more()  # a value that ends the buffer may be cut short: decode it again
            pos = end
            yield item
            char = skip_space()
            if char == ",":
                pos += 1
                expect_item = True
            elif char == "]":
                return
            else:
                raise self._invalid(f"expected ',' or ']' at character {pos}")

    def _invalid(self, why: object) -> CliError:
        return CliError(f"manifest {self.path} is not valid JSON: {why}")


def read_manifest(path: Path) -> list[dict[str, Any]]:
    """Every image of a manifest, in one list (small manifests; see :class:`Manifest`)."""
    with Manifest(path) as manifest:
        return list(manifest.images())
