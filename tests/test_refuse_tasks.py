"""Bad task files through the command line: each is refused with exit code 2 and one line on stderr
naming the file (and line) and the problem, before anything is written next to ``--out``.

Lengths beyond the model's maximum positions are checked at the library level
(``tests/test_data.py``) until the command line passes them to ``load_task``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from refusals import assert_refused

CASES = {
    # name: (file name, content, what the line must say after the file name)
    "json_suffix": ("words.json", b'[{"text": "ab"}]\n', r": unsupported task file format '\.json'; use \.jsonl .* or \.txt"),
    "csv_suffix": ("words.csv", b"text,label\nab,1\n", r": unsupported task file format '\.csv'; use \.jsonl"),
    "no_suffix": ("words", b"ab\n", r": unsupported task file format \(no suffix\)"),
    "gz_suffix": ("words.jsonl.gz", b'{"text": "ab"}\n', r": unsupported task file format '\.gz'"),
    "text_null": ("t.jsonl", b'{"text": "ab"}\n{"text": null}\n', r":2: field 'text' must be a string, got null"),
    "text_number": ("t.jsonl", b'{"text": 12345}\n', r":1: field 'text' must be a string, got a number"),
    "text_list": ("t.jsonl", b'{"text": ["a", "b"]}\n', r":1: field 'text' must be a string, got an array"),
    "text_object": ("t.jsonl", b'{"text": {"a": 1}}\n', r":1: field 'text' must be a string, got an object"),
    "text_bool": ("t.jsonl", b'{"text": true}\n', r":1: field 'text' must be a string, got a boolean"),
    "prompt_number": ("t.jsonl", b'{"prompt": 12, "completion": "3"}\n', r":1: field 'prompt' must be a string, got a number"),
    "completion_null": ("t.jsonl", b'\n{"prompt": "1+2=", "completion": null}\n', r":2: field 'completion' must be a string, got null"),
    "nul_in_txt": ("t.txt", b"abc\nab\x00c\n", r":2: the line contains a NUL byte"),
    "bell_in_txt": ("t.txt", b"ab\x07c\n", r":1: the line contains control character U\+0007"),
    "vertical_tab_in_txt": ("t.txt", b"ab\x0bcd\n", r":1: the line contains control character U\+000B"),
    "bare_cr_in_txt": ("t.txt", b"ab\rcd\n", r":1: the line contains control character U\+000D"),
    "escaped_nul_in_jsonl": ("t.jsonl", b'{"text": "a\\u0000b"}\n', r":1: field 'text' contains a NUL byte"),
    "escaped_escape_in_completion": ("t.jsonl", b'{"prompt": "1", "completion": "\\u001b[0m"}\n', r":1: field 'completion' contains control character U\+001B"),
    "raw_nul_in_jsonl": ("t.jsonl", b'{"text": "ab"}\x00\n', r":1: the line contains a NUL byte"),
    "malformed_json": ("t.jsonl", b'{"text": "ab"}\n{"text": "ab"\n', r":2: malformed JSON \(Expecting ',' delimiter"),
    "upper_case_jsonl_is_json": ("T.JSONL", b'["ab"]\n', r":1: expected a JSON object, got an array"),
    "missing_fields": ("t.jsonl", b'{"prompt": "1+2="}\n', r":1: needs a 'text' field or 'prompt' and 'completion' fields"),
    "blank_only": ("t.txt", b"\n  \n\t\n", r": task file is empty"),
    "not_utf8": ("t.txt", b"ab\ncd\xff\n", r":2: not UTF-8 text \(byte 5\)"),
    "missing_file": ("absent.jsonl", None, r": task file does not exist"),
    "directory": ("folder.jsonl", "dir", r": task file is a directory"),
    "directory_without_suffix": ("folder", "dir", r": task file is a directory"),
    "missing_without_suffix": ("absent", None, r": task file does not exist"),
    "safetensors_as_task": ("model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ", r": unsupported task file format '\.safetensors'"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_task_file_is_refused(cli_checkpoint, tmp_path, case):
    file_name, content, message = CASES[case]
    data = tmp_path / "data"
    data.mkdir()
    file = data / file_name
    if content == "dir":
        file.mkdir()
    elif content is not None:
        file.write_bytes(content)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "keep.txt").write_text("the user's own file\n")
    argv = ["analyze", "--model", cli_checkpoint / "model", "--task", f"bad={file}", "--out", str(tmp_path / "sub" / "out"),
            "--phases", "fisher", "--no-progress"]
    assert_refused(argv, parent=tmp_path / "sub", names=re.escape(str(file)) + message)


def test_unreadable_task_file_is_refused(cli_checkpoint, tmp_path, monkeypatch):
    file = tmp_path / "secret.txt"
    file.write_text("ab\n")
    if os.geteuid() == 0:  # root reads any file: fail the read the way a permission problem does
        read_bytes = Path.read_bytes

        def denied(self):
            if self == file:
                raise PermissionError(13, "Permission denied", str(self))
            return read_bytes(self)

        monkeypatch.setattr(Path, "read_bytes", denied)
    else:
        file.chmod(0)
    (tmp_path / "sub").mkdir()
    argv = ["analyze", "--model", cli_checkpoint / "model", "--task", f"bad={file}", "--out", str(tmp_path / "sub" / "out"),
            "--phases", "fisher", "--no-progress"]
    assert_refused(argv, parent=tmp_path / "sub", names=re.escape(str(file)) + r": cannot read the task file \(Permission denied\)")
