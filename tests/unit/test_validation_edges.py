"""The exact words of the body errors a client can fix by itself: an empty body, a byte order mark."""

from __future__ import annotations

import falcon
import pytest

from falcon_svc.errors import APIError
from falcon_svc.validation import parse_json


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "The request body is empty; send a JSON object."),
        (b'\xef\xbb\xbf{"text": "hi"}', "The body starts with a byte order mark; send UTF-8 without one."),
    ],
    ids=["empty", "bom"],
)
def test_the_error_says_what_to_send_instead(raw: bytes, message: str) -> None:
    with pytest.raises(APIError) as caught:
        parse_json(raw)
    assert caught.value.status == falcon.HTTP_400, caught.value.status
    assert caught.value.to_dict()["error"] == {"code": "invalid_json", "message": message, "field": None}
