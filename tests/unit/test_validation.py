"""Body reading and input checks, called directly: limits to the byte, chunked bodies, and what each error says."""

from __future__ import annotations

from typing import Any

import falcon
import falcon.testing
import pytest

from falcon_svc.errors import APIError
from falcon_svc.validation import (
    RAW_LENGTH_FACTOR,
    parse_json,
    read_body,
    request_body,
    require_json_content_type,
    require_object,
    require_text,
    require_texts,
)

LIMIT = 10


class PieceStream:
    """A wsgi.input that hands out at most ``piece`` bytes a read and counts what it gave."""

    def __init__(self, data: bytes, piece: int = 1 << 20) -> None:
        self._data = data
        self._piece = piece
        self.given = 0

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = len(self._data)
        chunk = self._data[self.given : self.given + min(size, self._piece)]
        self.given += len(chunk)
        return chunk


class BrokenStream:
    """A wsgi.input whose client went away mid-body."""

    def read(self, size: int = -1) -> bytes:
        raise OSError("client disconnected")


def make_request(
    stream: Any = None,
    *,
    content_length: int | None = None,
    chunked: bool = False,
    content_type: str | None = "application/json",
) -> falcon.Request:
    """A POST as the server hands it over: a declared length, or chunked (no length), or neither."""
    headers = {"Transfer-Encoding": "chunked"} if chunked else {}
    if content_type is not None:
        headers["Content-Type"] = content_type
    env = falcon.testing.create_environ(method="POST", headers=headers)
    env.pop("CONTENT_LENGTH", None)
    if content_length is not None:
        env["CONTENT_LENGTH"] = str(content_length)
    env["wsgi.input"] = stream if stream is not None else PieceStream(b"")
    return falcon.Request(env)


def raised(call, *args, **kwargs) -> APIError:
    with pytest.raises(APIError) as info:
        call(*args, **kwargs)
    return info.value


class TestBodyLimit:
    def test_a_declared_length_at_the_limit_is_read(self):
        body = b"x" * LIMIT
        assert request_body(make_request(PieceStream(body), content_length=LIMIT), LIMIT) == body

    def test_a_declared_length_over_the_limit_is_refused_before_reading(self):
        stream = PieceStream(b"x" * (LIMIT + 1))
        error = raised(request_body, make_request(stream, content_length=LIMIT + 1), LIMIT)
        assert (error.status, error.code) == (falcon.HTTP_413, "payload_too_large")
        assert f"limit of {LIMIT} bytes" in error.description
        assert stream.given == 0, "a body declared too long must not be read at all"

    @pytest.mark.parametrize("piece", [1, 4, 100])
    @pytest.mark.parametrize("size", [0, 1, 8, LIMIT])
    def test_a_chunked_body_within_the_limit_is_read_whole(self, size: int, piece: int):
        body = bytes(range(97, 97 + size))
        assert read_body(make_request(PieceStream(body, piece), chunked=True), LIMIT) == body

    @pytest.mark.parametrize("piece", [1, 4, 100])
    def test_a_chunked_body_over_the_limit_is_refused_after_one_byte_too_many(self, piece: int):
        stream = PieceStream(b"x" * 1000, piece)
        error = raised(request_body, make_request(stream, chunked=True), LIMIT)
        assert (error.status, error.code) == (falcon.HTTP_413, "payload_too_large")
        assert stream.given == LIMIT + 1, "read one byte past the limit, never the rest of a large upload"

    def test_the_chunked_header_is_matched_without_regard_to_case(self):
        env = falcon.testing.create_environ(method="POST", headers={"Transfer-Encoding": "Chunked"})
        env.pop("CONTENT_LENGTH", None)
        env["wsgi.input"] = PieceStream(b"{}")
        assert read_body(falcon.Request(env), LIMIT) == b"{}"

    def test_no_length_and_no_chunking_means_no_body(self):
        assert read_body(make_request(PieceStream(b"ignored")), LIMIT) == b""

    def test_a_broken_upload_is_a_400_naming_the_cause(self):
        error = raised(read_body, make_request(BrokenStream(), chunked=True), LIMIT)
        assert (error.status, error.code) == (falcon.HTTP_400, "invalid_body")
        assert "client disconnected" in error.description

    def test_a_body_already_read_by_the_middleware_is_not_read_again(self):
        req = make_request(BrokenStream(), content_length=7)
        req.context.raw_body = b'{"a":1}'
        assert request_body(req, LIMIT) == b'{"a":1}'

    def test_a_body_already_read_is_held_to_the_limit_too(self):
        req = make_request(BrokenStream(), content_length=LIMIT)
        req.context.raw_body = b"x" * LIMIT
        assert request_body(req, LIMIT) == b"x" * LIMIT
        req.context.raw_body = b"x" * (LIMIT + 1)
        error = raised(request_body, req, LIMIT)
        assert error.code == "payload_too_large" and f"limit of {LIMIT} bytes" in error.description


class TestContentType:
    @pytest.mark.parametrize(
        "content_type", ["application/json", "Application/JSON", "application/json; charset=utf-8; x=y"]
    )
    def test_json_with_any_parameters_is_accepted(self, content_type: str):
        require_json_content_type(make_request(content_type=content_type))

    @pytest.mark.parametrize(("content_type", "named"), [(None, "no Content-Type"), ("text/plain", "text/plain")])
    def test_anything_else_is_a_415_naming_what_was_sent(self, content_type: str | None, named: str):
        error = raised(require_json_content_type, make_request(content_type=content_type))
        assert (error.status, error.code) == (falcon.HTTP_415, "unsupported_media_type")
        assert f"(got {named})" in error.description


class TestStrictJSON:
    def test_a_byte_order_mark_is_named(self):
        error = raised(parse_json, b'\xef\xbb\xbf{"text": "hi"}')
        assert error.code == "invalid_json" and "byte order mark" in error.description

    def test_an_empty_body_is_named(self):
        error = raised(parse_json, b"")
        assert error.code == "invalid_json" and "empty" in error.description

    def test_the_duplicated_key_is_named(self):
        error = raised(parse_json, b'{"a": 1, "b": 2, "b": 3}')
        assert error.code == "invalid_json"
        assert "the key 'b' appears more than once" in error.description

    def test_a_long_duplicated_key_is_named_cut_short(self):
        """The error must not echo megabytes: the body would be an amplifier."""
        key = "k" * 100_000
        error = raised(parse_json, f'{{"{key}": 1, "{key}": 2}}'.encode())
        assert "'kkkk" in error.description and len(error.description) < 200, error.description[:300]


# How each JSON type is named in a 422, and a check that meets it.
JSON_TYPES = [
    (None, "null"),
    (True, "a boolean"),
    (3, "a number"),
    (2.5, "a number"),
    ("text", "a string"),
    ([1], "an array"),
    ({"a": 1}, "an object"),
]


NOT_OBJECTS = [(value, named) for value, named in JSON_TYPES if not isinstance(value, dict)]
# None is not here: a missing text is "required", not "null".
NOT_STRINGS = [(value, named) for value, named in JSON_TYPES if value is not None and not isinstance(value, str)]


@pytest.mark.parametrize(("value", "named"), NOT_OBJECTS)
def test_a_body_that_is_not_an_object_is_named_by_its_json_type(value: Any, named: str):
    error = raised(require_object, value)
    assert error.status == falcon.HTTP_422
    assert error.description == f"The body must be a JSON object, not {named}."


@pytest.mark.parametrize(("value", "named"), NOT_STRINGS)
def test_a_text_that_is_not_a_string_is_named_by_its_json_type(value: Any, named: str):
    error = raised(require_text, value, "text", 100)
    assert (error.description, error.field) == (f"'text' must be a string, not {named}.", "text")


def test_texts_that_are_not_an_array_are_named_by_their_json_type():
    error = raised(require_texts, "one text", "texts", 4, 100)
    assert (error.description, error.field) == ("'texts' must be an array of strings, not a string.", "texts")


def test_missing_texts_name_the_field():
    error = raised(require_texts, None, "texts", 4, 100)
    assert (error.code, error.field) == ("invalid_input", "texts")


class TestTextLength:
    MAX_CHARS = 5

    def test_a_raw_text_at_the_raw_bound_is_normalised_then_accepted(self):
        raw = "ab" + " " * (RAW_LENGTH_FACTOR * self.MAX_CHARS - 2)
        assert require_text(raw, "text", self.MAX_CHARS) == "ab"

    def test_a_raw_text_over_the_raw_bound_is_refused_before_normalising(self):
        raw = "ab" + " " * (RAW_LENGTH_FACTOR * self.MAX_CHARS - 1)
        error = raised(require_text, raw, "text", self.MAX_CHARS)
        assert error.field == "text"
        assert error.description.endswith(
            f"the limit is {self.MAX_CHARS} after normalisation and {RAW_LENGTH_FACTOR * self.MAX_CHARS} before."
        )

    def test_a_character_nfkc_expands_counts_at_its_expanded_length_before_normalising(self, monkeypatch):
        # U+FDFA is 18 characters under NFKC: one is over a raw bound of 10, and
        # refusing it must not cost a normalisation.
        monkeypatch.setattr("falcon_svc.validation.normalize", lambda text: pytest.fail("normalised first"))
        error = raised(require_text, "\ufdfa", "text", self.MAX_CHARS)
        assert error.field == "text"
        assert error.description.startswith("'text' is 18 characters (counting any that NFKC expands"), (
            error.description
        )
        assert error.description.endswith(f"and {RAW_LENGTH_FACTOR * self.MAX_CHARS} before."), error.description

    def test_a_long_run_of_combining_marks_is_accepted_stream_safe(self):
        text = require_text("a" + "\u0301" * 40, "text", 100)
        assert text == "\u00e1" + "\u0301" * 29 + "\u034f" + "\u0301" * 10

    def test_a_normalised_text_at_the_limit_is_accepted_and_one_more_is_not(self):
        assert require_text("abcde", "text", self.MAX_CHARS) == "abcde"
        error = raised(require_text, "abcdef", "text", self.MAX_CHARS)
        assert error.description == "'text' is 6 characters after normalisation; the limit is 5."
