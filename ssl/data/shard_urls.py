"""Where tar shards live and how to open one: brace patterns, local paths, URLs, `pipe:` commands.

The spelling is webdataset's, so a shard list written for it works here unchanged:
`/data/train-{000000..001023}.tar` (numeric ranges keep their zero padding), `{a,b}` lists,
several patterns joined by `::`, `file://`, `http(s)://` (read with the standard library) and
`pipe:<command>` (the command's stdout is the shard, e.g. `pipe:aws s3 cp s3://b/x.tar -`).
Any other scheme (`s3://`, `gs://`, ...) goes through `webdataset.gopen` when webdataset is
installed, else it fails with the `pipe:` spelling that does the same. Opening is sequential
only, which is all a stream needs, so no object-store client is a dependency.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import IO

_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


class ShardNotFoundError(FileNotFoundError):
    """A shard named by `dataset.urls` does not exist or cannot be opened; the message names it."""


def _split_braces(pattern: str) -> tuple[str, str, str] | None:
    """(prefix, inside, suffix) of the first top-level `{...}`, or None without braces."""
    depth, start = 0, -1
    for i, char in enumerate(pattern):
        if char == "{":
            if depth == 0:
                start = i
            depth += 1
        elif char == "}" and depth:
            depth -= 1
            if depth == 0:
                return pattern[:start], pattern[start + 1 : i], pattern[i + 1 :]
    if depth:
        raise ValueError(f"unbalanced '{{' in shard pattern {pattern!r}")
    return None


def _alternatives(inside: str) -> list[str]:
    """`000..003` -> 000 001 002 003; `a,b{c,d}` -> a, b{c,d} (split at top-level commas)."""
    match = _RANGE.match(inside)
    if match:
        lo_text, hi_text = match.groups()
        lo, hi = int(lo_text), int(hi_text)
        width = max(len(lo_text), len(hi_text)) if lo_text.startswith("0") or hi_text.startswith("0") else 0
        step = 1 if hi >= lo else -1
        return [str(n).zfill(width) for n in range(lo, hi + step, step)]
    parts, depth, current = [], 0, ""
    for char in inside:
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        depth += (char == "{") - (char == "}")
        current += char
    return [*parts, current]


def expand_braces(pattern: str) -> list[str]:
    """Every name a brace pattern spells, in order (bash's rules for `{a..b}` and `{x,y}`)."""
    split = _split_braces(pattern)
    if split is None:
        return [pattern]
    prefix, inside, suffix = split
    heads = [alt for part in _alternatives(inside) for alt in expand_braces(part)]
    tails = expand_braces(suffix)
    return [prefix + head + tail for head, tail in itertools.product(heads, tails)]


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """The shard list of `dataset.urls`: a pattern, `::`-joined patterns, or a list of them."""
    patterns = [urls] if isinstance(urls, str) else [str(u) for u in urls]
    expanded = [
        os.path.expanduser(name)
        for pattern in patterns
        for part in pattern.split("::")
        if part.strip()
        for name in expand_braces(part.strip())
    ]
    if not expanded:
        raise ValueError("dataset.urls names no shard; e.g. dataset.urls=/data/train-{000000..000099}.tar")
    return expanded


def local_path(url: str) -> str | None:
    """The file a URL names on this machine (a plain path or file://), None for remote ones."""
    if url.startswith("file://"):
        return url[len("file://") :]
    if url.startswith("pipe:") or re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", url):
        return None
    return url


def shard_name(url: str) -> str:
    """The shard's file name, also inside a `pipe:` command (its last word naming a .tar)."""
    words = url[len("pipe:") :].split() if url.startswith("pipe:") else [url]
    named = [w for w in words if ".tar" in w] or words
    return os.path.basename(named[-1].rstrip("/"))


def check_local_shards(urls: Sequence[str]) -> None:
    """Fail before training when a local shard is missing, naming the first few that are."""
    missing = [u for u in urls if (p := local_path(u)) is not None and not os.path.isfile(p)]
    if missing:
        shown = "\n".join(f"  {os.path.abspath(local_path(u) or u)}" for u in missing[:5])
        more = f"\n  ... and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ShardNotFoundError(
            f"{len(missing)} of the {len(urls)} shards of dataset.urls do not exist:\n{shown}{more}\n"
            "Check the pattern (brace ranges are inclusive: {000000..000099} is 100 shards) or "
            "pack the images first: python scripts/pack_shards.py <folder> <output dir>."
        )


@contextmanager
def open_shard(url: str) -> Iterator[IO[bytes]]:
    """A binary stream of the shard's bytes; a shard that cannot be opened raises ShardNotFoundError."""
    if url.startswith("pipe:"):
        with _open_pipe(url) as stream:
            yield stream
        return
    path = local_path(url)
    if path is not None:
        try:
            stream = open(path, "rb")
        except OSError as error:
            raise ShardNotFoundError(f"shard {url} cannot be opened: {error}") from error
        with stream:
            yield stream
        return
    if url.startswith(("http://", "https://")):
        try:
            stream = urllib.request.urlopen(url)  # noqa: S310 - the user's own shard URL
        except (urllib.error.URLError, OSError) as error:
            raise ShardNotFoundError(f"shard {url} cannot be opened: {error}") from error
        with stream:
            yield stream
        return
    try:
        from webdataset.gopen import gopen
    except ImportError as error:
        scheme = url.split("://", 1)[0]
        raise ShardNotFoundError(
            f"shard {url}: the {scheme}:// scheme needs `pip install webdataset` (its gopen), or spell it "
            f"as a pipe, e.g. dataset.urls='pipe:aws s3 cp {url} -' (gs: 'pipe:gsutil cat {url}')."
        ) from error
    try:
        stream = gopen(url, "rb")
    except Exception as error:  # noqa: BLE001 - whatever the scheme's opener raises
        raise ShardNotFoundError(f"shard {url} cannot be opened: {error}") from error
    with stream:
        yield stream


@contextmanager
def _open_pipe(url: str) -> Iterator[IO[bytes]]:
    """`pipe:cmd`: cmd's stdout. A command that fails is a ShardNotFoundError with its stderr."""
    command = url[len("pipe:") :]
    process = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # noqa: S602
    assert process.stdout is not None and process.stderr is not None
    finished = False
    try:
        yield process.stdout
        finished = True
    finally:
        if not finished:  # the reader stopped early (its quota was reached): the rest is not wanted
            process.kill()
        process.stdout.close()
        stderr = process.stderr.read().decode(errors="replace").strip()
        process.stderr.close()
        status = process.wait()
    if finished and status != 0:
        raise ShardNotFoundError(f"shard {url}: the command exited with status {status}: {stderr[-500:]}")


def quote_url_overrides(argv: Sequence[str], keys: Sequence[str] = ("dataset.urls",)) -> list[str]:
    """Command-line overrides of `keys` with a bare brace pattern, quoted for Hydra.

    Hydra's override grammar reads `{` as the start of a dict, so the webdataset spelling
    `dataset.urls=/data/train-{000000..001023}.tar` would fail to parse; quoted, it is a string.
    Values already quoted (or without braces) are left as they are.
    """
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        bare = key.lstrip("+~") in keys and sep and "{" in value and value[:1] not in ("'", '"', "[")
        out.append(f"{key}={chr(34)}{value}{chr(34)}" if bare and '"' not in value else arg)
    return out
