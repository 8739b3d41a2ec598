"""Every bad input gives one `error:` line naming the file (and line/field), exit code 2, and an empty workspace."""

from __future__ import annotations

import json
import os

import pytest

from tests.helpers import files_under, qa_rows, write_csv, write_jsonl
from training.data import curate
from training.errors import InputError


def assert_bad_input(result, ws, *fragments: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("error: ")
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in line, line
    assert files_under(ws) == []
    return line


def good_lines(n: int = 5) -> list[str]:
    return [json.dumps(r) for r in qa_rows(n)]


def test_malformed_json_line_names_the_line(cli, ws, tmp_path):
    lines = good_lines()
    lines.insert(3, '{"question": "Broken?", "answer": "missing quote}')
    path = tmp_path / "faq.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert_bad_input(cli("data", "inspect", path, "--workspace", ws), ws, f"{path}:4:", "invalid JSON")


def test_jsonl_line_that_is_not_an_object(cli, ws, tmp_path):
    path = tmp_path / "faq.jsonl"
    path.write_text("\n".join(good_lines(2) + ["[1, 2]"]) + "\n", encoding="utf-8")
    assert_bad_input(cli("data", "inspect", path, "--workspace", ws), ws, f"{path}:3:", "found a list")


@pytest.mark.parametrize("content", [b"", b"  \n\n  \n"])
def test_empty_file(cli, ws, tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    assert_bad_input(cli("data", "inspect", path, "--workspace", ws), ws, str(path), "file is empty")


def test_no_usable_records_after_cleaning(cli, ws, tmp_path):
    path = write_jsonl(tmp_path / "blank.jsonl", [{"question": " ", "answer": "a"}, {"question": "\u200b", "answer": "b"}])
    assert_bad_input(cli("data", "inspect", path, "--workspace", ws), ws, str(path), "no usable records after cleaning", "2 empty")


def test_non_utf8_names_the_line_and_encoding_flag_reads_it(cli, ws, tmp_path):
    path = tmp_path / "latin.jsonl"
    lines = good_lines(4)
    lines[2] = json.dumps({"question": "Où est la café?", "answer": "Ici, à côté."}, ensure_ascii=False)
    path.write_bytes("\n".join(lines).encode("latin-1"))
    assert_bad_input(cli("data", "inspect", path, "--workspace", ws), ws, f"{path}:3:", "not valid utf-8", "--encoding")
    ok = cli("data", "inspect", path, "--encoding", "latin-1", "--workspace", ws, "--json")
    assert ok.exit_code == 0, ok.stderr
    assert ok.json()["records_after"] == 4


def test_binary_file(cli, ws, tmp_path):
    path = tmp_path / "model.jsonl"
    path.write_bytes(b"PK\x03\x04\x00\x00\x08\x00" + os.urandom(256))
    assert_bad_input(cli("data", "inspect", path, "--workspace", ws), ws, str(path), "binary file")


def test_unknown_columns_list_what_was_found_and_accepted(cli, ws, tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"title": "t", "body": "b"}])
    line = assert_bad_input(cli("data", "inspect", path, "--workspace", ws), ws, f"{path}:1:", "body, title")
    assert "question,answer" in line and "messages" in line and "prompt,completion" in line


def test_csv_with_unknown_columns_and_ragged_rows(cli, ws, tmp_path):
    path = write_csv(tmp_path / "odd.csv", [{"col_a": "x", "col_b": "y"}])
    assert_bad_input(cli("data", "inspect", path, "--workspace", ws), ws, f"{path}:2:", "col_a, col_b")
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("question,answer\nHi?,Hello\nToo,many,fields\n", encoding="utf-8")
    assert_bad_input(cli("data", "inspect", ragged, "--workspace", ws), ws, f"{ragged}:3:", "3 fields", "header has 2")


def test_wrong_field_type_and_bad_chat_role(cli, ws, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": ["not", "a", "string"]}])
    assert_bad_input(cli("data", "inspect", path, "--workspace", ws), ws, f"{path}:1:", "field 'text'", "list")
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}])
    assert_bad_input(cli("data", "inspect", chat, "--workspace", ws), ws, f"{chat}:1:", "messages[1].role", "'bot'")


def test_path_that_does_not_exist(cli, ws, tmp_path):
    missing = tmp_path / "nope.jsonl"
    assert_bad_input(cli("data", "inspect", missing, "--workspace", ws), ws, str(missing), "no such file or directory")


def test_unsupported_file_type(cli, ws, tmp_path):
    path = tmp_path / "table.xlsx"
    path.write_text("a,b\n", encoding="utf-8")
    assert_bad_input(cli("data", "inspect", path, "--workspace", ws), ws, str(path), "unsupported file type '.xlsx'")


def test_mixed_formats_ask_for_format(cli, ws, tmp_path):
    path = write_jsonl(tmp_path / "mix.jsonl", [{"text": "plain text here"}, qa_rows(1)[0]])
    assert_bad_input(cli("data", "inspect", path, "--workspace", ws), ws, str(path), "several formats", "--format")


def test_text_cannot_become_classification(cli, ws, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "no label here"}])
    assert_bad_input(cli("data", "inspect", path, "--format", "classification", "--workspace", ws), ws,
                     f"{path}:1:", "no 'label' field")


@pytest.mark.parametrize("args,fragment", [
    (["--split", "0.8,0.3,0.1"], "--split"),
    (["--split", "a,b,c"], "--split"),
    (["--columns", "question"], "--columns"),
    (["--format", "images"], "--format"),
    (["--encoding", "klingon-8"], "--encoding"),
])
def test_bad_options(cli, ws, tmp_path, args, fragment):
    path = write_jsonl(tmp_path / "d.jsonl", qa_rows(5))
    assert_bad_input(cli("data", "inspect", path, *args, "--workspace", ws), ws, fragment)


def test_columns_naming_a_missing_column(cli, ws, tmp_path):
    path = write_csv(tmp_path / "d.csv", [{"q": "Hi?", "a": "Hello."}])
    assert_bad_input(cli("data", "inspect", path, "--columns", "question=Q,answer=a", "--workspace", ws), ws,
                     f"{path}:2:", "--columns names Q")


def test_paths_outside_the_allowed_roots_are_refused(tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    outside = write_jsonl(tmp_path / "secret.jsonl", qa_rows(5))
    with pytest.raises(InputError, match="outside the directories this caller may read"):
        curate(str(outside), allowed_roots=[allowed])
    with pytest.raises(InputError, match="outside the directories"):
        curate(str(allowed / ".." / "secret.jsonl"), allowed_roots=[allowed])
    # a symlink inside an allowed directory that points outside it is refused too
    (allowed / "data").mkdir()
    (allowed / "data" / "link.jsonl").symlink_to(outside)
    with pytest.raises(InputError, match="link.jsonl: outside"):
        curate(str(allowed / "data"), allowed_roots=[allowed])
    write_jsonl(allowed / "mine.jsonl", qa_rows(5))
    assert curate(str(allowed / "mine.jsonl"), allowed_roots=[allowed]).summary.records_after == 5


def test_refused_paths_outside_roots_do_not_reveal_existence(tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    for target in (tmp_path / "exists.jsonl", tmp_path / "missing.jsonl"):
        if target.name == "exists.jsonl":
            write_jsonl(target, qa_rows(2))
        with pytest.raises(InputError, match="outside the directories"):
            curate(str(target), allowed_roots=[allowed])
