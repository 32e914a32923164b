"""The API key file, the store and ``falcon-svc keys``: parsing, checking, atomic writes."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import timeit

import pytest

from falcon_svc.auth import keys as keys_module
from falcon_svc.auth.keys import (
    KeyFileError,
    KeyRecord,
    KeyStore,
    generate_key,
    key_id_of,
    key_sha256,
    parse_key_file,
    read_key_file,
    write_key_file,
)
from falcon_svc.cli import main as cli_main

GOOD_HASH = "a" * 64


def test_generated_key_names_its_id_and_hashes_to_what_the_file_stores():
    key = generate_key("client-a")
    assert key.startswith("fsk_client-a_") and len(key) >= len("fsk_client-a_") + 43, key
    assert key_id_of(key) == "client-a"
    assert key_sha256(key) == hashlib.sha256(key.encode()).hexdigest()
    assert generate_key("client-a") != key, "two keys for one id must differ (random secret)"


@pytest.mark.parametrize("key_id", ["", "a_b", "-a", "a b", "é", "x" * 65])
def test_generate_refuses_an_id_that_would_not_split_or_scope(key_id):
    with pytest.raises(ValueError, match="key id"):
        generate_key(key_id)


@pytest.mark.parametrize(
    "presented",
    ["", "fsk_", "fsk_a", "fsk_a_", "Bearer fsk_a_x", "xsk_a_secret", "fsk_a b_secret", "fsk_a_" + "s" * 300],
)
def test_key_id_of_refuses_what_is_not_shaped_like_our_key(presented):
    assert key_id_of(presented) is None


def test_store_accepts_its_keys_and_nothing_else():
    key_a, key_b = generate_key("a"), generate_key("b")
    store = KeyStore([KeyRecord("a", key_sha256(key_a)), KeyRecord("b", key_sha256(key_b))])
    assert store.authenticate(key_a) == "a"
    assert store.authenticate(key_b) == "b"
    # A's id with B's secret, a key of an unknown id, a truncated key: refused.
    assert store.authenticate("fsk_a_" + key_b.split("_", 2)[2]) is None
    assert store.authenticate(generate_key("c")) is None
    assert store.authenticate(key_a[:-1]) is None


def test_store_compares_digests_in_constant_time(monkeypatch):
    key = generate_key("a")
    store = KeyStore([KeyRecord("a", key_sha256(key))])
    compared: list[tuple[bytes, bytes]] = []

    def spy(left: bytes, right: bytes) -> bool:
        compared.append((left, right))
        return left == right

    monkeypatch.setattr(keys_module.hmac, "compare_digest", spy)
    assert store.authenticate(key) == "a"
    assert store.authenticate("fsk_a_wrong") is None
    assert len(compared) == 2, "every check of a known id must go through hmac.compare_digest"


def test_checking_a_key_costs_microseconds():
    """Measured, not asserted against a clock (the machine is noisy): printed with -s."""
    key = generate_key("a")
    store = KeyStore([KeyRecord(f"id{i}", GOOD_HASH) for i in range(1000)] + [KeyRecord("a", key_sha256(key))])
    runs = 20000
    seconds = min(timeit.repeat(lambda: store.authenticate(key), number=runs, repeat=3))
    print(f"KeyStore.authenticate: {seconds / runs * 1e6:.2f} us per key (1001 keys)")
    assert store.authenticate(key) == "a"


def test_parse_reads_ids_hashes_dates_and_comments():
    text = (
        f"# managed by hand\n\nalpha {GOOD_HASH}\nbeta {'b' * 64} 2026-12-01\n"
        f"gamma {'c' * 64} 2026-12-01 ops team  laptop\n"
    )
    records = parse_key_file(text)
    assert records == [
        KeyRecord("alpha", GOOD_HASH),
        KeyRecord("beta", "b" * 64, "2026-12-01"),
        KeyRecord("gamma", "c" * 64, "2026-12-01", "ops team  laptop"),
    ]
    assert parse_key_file("\n".join(record.line() for record in records)) == records


def test_a_comment_without_a_created_date_survives_the_round_trip():
    """``-`` fills the positional created field, so the comment is neither lost nor read as a date."""
    undated = KeyRecord("delta", "d" * 64, "", "billing batch")
    assert undated.line() == f"delta {'d' * 64} - billing batch"
    assert parse_key_file(undated.line()) == [undated]
    assert parse_key_file(f"delta {'d' * 64} -\n") == [KeyRecord("delta", "d" * 64)]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("alpha\n", r"keys:1: expected '<id> <sha256>'"),
        (f"a_b {GOOD_HASH}\n", r"keys:1: key id 'a_b'"),
        ("alpha ABCDEF\n", r"keys:1: the hash of 'alpha' is not 64 lowercase hex digits"),
        (f"alpha {GOOD_HASH.upper()}\n", r"keys:1: the hash of 'alpha'"),
        (f"alpha {GOOD_HASH} yesterday\n", r"keys:1: created date 'yesterday'"),
        (f"alpha {GOOD_HASH}\n\nalpha {'b' * 64}\n", r"keys:3: key id 'alpha' appears twice"),
    ],
)
def test_parse_refuses_a_bad_line_naming_it(text, message):
    with pytest.raises(KeyFileError, match=message):
        parse_key_file(text, "keys")


def test_a_key_pasted_in_place_of_its_hash_is_not_echoed():
    key = generate_key("alpha")
    with pytest.raises(KeyFileError) as raised:
        parse_key_file(f"alpha {key}\n")
    assert key not in str(raised.value) and key.split("_", 2)[2] not in str(raised.value)


def test_unreadable_or_binary_file_is_a_key_file_error(tmp_path):
    with pytest.raises(KeyFileError, match="cannot read"):
        read_key_file(tmp_path / "missing")
    (tmp_path / "binary").write_bytes(b"\xff\xfe alpha")
    with pytest.raises(KeyFileError, match="cannot read"):
        read_key_file(tmp_path / "binary")


def test_write_replaces_the_file_whole_with_mode_0640(tmp_path):
    path = tmp_path / "api_keys"
    path.write_text(f"old {GOOD_HASH}\n")
    path.chmod(0o644)
    old_inode = path.stat().st_ino
    write_key_file(path, [KeyRecord("new", "b" * 64, "2026-12-01")])
    assert path.read_text() == f"new {'b' * 64} 2026-12-01\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert path.stat().st_ino != old_inode, "the file must be replaced by a rename, not rewritten in place"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["api_keys"], "no temp file may be left behind"


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "api_keys"
    path.write_text(f"old {GOOD_HASH}\n")

    def failing_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(keys_module.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space"):
        write_key_file(path, [KeyRecord("new", "b" * 64)])
    assert path.read_text() == f"old {GOOD_HASH}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["api_keys"]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli_main(["keys", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_keys_add_list_revoke(tmp_path, capsys, monkeypatch):
    path = tmp_path / "api_keys"
    monkeypatch.setenv("API_KEYS_FILE", str(path))
    code, out, err = run_cli(capsys, "add", "client-a", "--comment", "billing batch")
    assert code == 0, err
    key = out.strip()
    assert key_id_of(key) == "client-a" and len(out.splitlines()) == 1, out
    assert key not in path.read_text() and key not in err, "only the hash may be stored or logged"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert KeyStore(read_key_file(path)).authenticate(key) == "client-a"

    code, out, err = run_cli(capsys, "add", "client-a")
    assert code == 1 and "already has a key" in err
    code, out, err = run_cli(capsys, "add", "bad_id")
    assert code == 2 and "is not 1 to 64" in err

    assert run_cli(capsys, "add", "client-b", "--file", str(path))[0] == 0
    code, out, err = run_cli(capsys, "list")
    listed = [json.loads(line) for line in out.splitlines()]
    assert [entry["id"] for entry in listed] == ["client-a", "client-b"]
    assert listed[0]["comment"] == "billing batch" and listed[0]["created"], listed
    assert all(len(value or "") < 64 for entry in listed for value in entry.values()), "list must show no hash"

    code, out, err = run_cli(capsys, "revoke", "client-a")
    assert code == 0, err
    assert KeyStore(read_key_file(path)).authenticate(key) is None
    assert [r.key_id for r in read_key_file(path)] == ["client-b"]
    code, out, err = run_cli(capsys, "revoke", "client-a")
    assert code == 1 and "no key with id" in err


def test_keys_without_a_file_says_how_to_name_one(capsys, monkeypatch):
    monkeypatch.delenv("API_KEYS_FILE", raising=False)
    code, _out, err = run_cli(capsys, "list")
    assert code == 2 and "API_KEYS_FILE" in err


def test_keys_on_a_malformed_file_refuses_to_rewrite_it(tmp_path, capsys):
    path = tmp_path / "api_keys"
    path.write_text("broken\n")
    code, _out, err = run_cli(capsys, "add", "client-a", "--file", str(path))
    assert code == 1 and f"{path}:1" in err, err
    assert path.read_text() == "broken\n"


def test_keys_add_into_a_new_file_takes_the_directory_group(tmp_path, capsys):
    path = tmp_path / "api_keys"
    assert run_cli(capsys, "add", "a", "--file", str(path))[0] == 0
    assert path.stat().st_gid == tmp_path.stat().st_gid
    assert os.access(path, os.R_OK)
