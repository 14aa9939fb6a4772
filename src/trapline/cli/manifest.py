"""Image manifests for ``trapline job create --manifest``.

A manifest is JSON (a list of ``{id, url}`` objects or of URLs, bare or under
``"images"``), CSV with a ``url`` column and optionally an ``id`` column, or
one URL per line. In CSV and URL lists, blank lines and ``#`` lines are skipped.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from trapline.cli.client import CliError


def read_manifest(path: Path) -> list[dict[str, Any]]:
    """Images from a manifest: JSON list of {id,url} (or of URLs), CSV with id,url, or URL lines."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise CliError(f"cannot read manifest {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise CliError(f"manifest {path} is not UTF-8 text") from None
    stripped = text.lstrip()
    if path.suffix.lower() == ".json" or stripped.startswith(("[", "{")):
        return _json_manifest(path, text)
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise CliError(f"manifest {path} lists no images")
    header = [h.strip().lower() for h in next(csv.reader([lines[0]]))]
    if path.suffix.lower() == ".csv" or "url" in header:
        return _csv_manifest(path, lines, header)
    return [{"url": ln.strip()} for ln in lines]


def _json_manifest(path: Path, text: str) -> list[dict[str, Any]]:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise CliError(f"manifest {path} is not valid JSON: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        data = data["images"]
    if not isinstance(data, list):
        raise CliError(f"manifest {path}: expected a JSON list of {{id, url}} objects")
    images: list[dict[str, Any]] = []
    for n, item in enumerate(data, start=1):
        if isinstance(item, str):
            images.append({"url": item})
        elif isinstance(item, dict) and "url" in item:
            image: dict[str, Any] = {"url": item["url"]}
            if item.get("id") is not None:
                image["id"] = str(item["id"])
            images.append(image)
        else:
            raise CliError(f"manifest {path}: item {n} is not a URL or an object with 'url'")
    return images


def _csv_manifest(path: Path, lines: list[str], header: list[str]) -> list[dict[str, Any]]:
    if "url" not in header:
        raise CliError(f"manifest {path}: CSV needs a 'url' column (and optionally 'id')")
    url_at = header.index("url")
    id_at = header.index("id") if "id" in header else None
    images: list[dict[str, Any]] = []
    for n, row in enumerate(csv.reader(lines[1:]), start=2):
        if len(row) <= url_at:
            raise CliError(f"manifest {path}: row {n} has no url")
        image: dict[str, Any] = {"url": row[url_at].strip()}
        if id_at is not None and len(row) > id_at and row[id_at].strip():
            image["id"] = row[id_at].strip()
        images.append(image)
    return images
