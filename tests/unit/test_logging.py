"""Log lines: untrusted text is made safe, and the JSON format is one parseable object a line."""

from __future__ import annotations

import json
import logging

from node.logging import JsonFormatter, clean


def test_clean_removes_control_characters_and_cr_lf() -> None:
    assert clean("EVIL\r\nINFO fake line\x00\x1b[31m") == "EVIL??INFO fake line??[31m"
    assert len(clean("x" * 500, limit=50)) == 50


def test_json_formatter_writes_one_object_per_record() -> None:
    record = logging.LogRecord("node.scp", logging.WARNING, __file__, 1,
                               "C-STORE from %s refused", (clean("A\nB"),), None)
    line = JsonFormatter().format(record)
    assert "\n" not in line
    data = json.loads(line)
    assert data["level"] == "WARNING" and data["logger"] == "node.scp"
    assert data["msg"] == "C-STORE from A?B refused"


def test_the_service_handler_cleans_messages_and_exception_messages() -> None:
    import io

    from node.logging import setup

    out = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup("INFO", "text", stream=out)
        try:
            try:
                raise KeyError("first")
            except KeyError as exc:
                raise ValueError("value 'EV\r\nINFO forged\x1b[2J'") from exc
        except ValueError:
            logging.getLogger("pynetdicom.dul").error("peer said %s", "A\nB")
            logging.getLogger("pynetdicom.dul").exception("decoding failed")
    finally:
        root.handlers[:], root.level = saved
    text = out.getvalue()
    assert "peer said A?B" in text
    assert "ValueError: value 'EV??INFO forged?[2J'" in text
    assert "\r" not in text and "\x1b" not in text and "\nINFO forged" not in text
    assert "KeyError: 'first'" in text and "direct cause" in text and 'File "' in text
