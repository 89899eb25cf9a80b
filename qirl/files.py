"""Reading the text files a user hands qirl (recipes, prompt files, JSON metadata), with one-line errors.

Every text file qirl reads is UTF-8 (JSON's and YAML's default). A file that is not, a binary file or a
UTF-16 export from a spreadsheet say, is a `UserError` naming the file and the first bad byte, never a
`UnicodeDecodeError` traceback from deep inside a command. Binary formats (images, safetensors) have
their own checks where they are read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qirl.errors import UserError


def read_text(path: str | Path, what: str = "file") -> str:
    """The file's text; a missing file or one that is not UTF-8 is a `UserError` naming it."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read {what} ({err.strerror or err})") from None
    return decode_utf8(data, path, what)


def decode_utf8(data: bytes, path: str | Path, what: str = "file") -> str:
    """``data`` as UTF-8 text; otherwise a `UserError` naming ``path`` and the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        bad = data[err.start : err.start + 1].hex()
        hint = " (UTF-16?)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise UserError(f"{path}: {what} is not UTF-8 text{hint}: byte 0x{bad} at offset {err.start}") from None


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    """The decoded JSON document of a file; missing, non-UTF-8 or malformed is a `UserError` naming it."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: malformed JSON in {what} ({err.msg})") from None
