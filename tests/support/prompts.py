"""Helpers the prompt tests share: seeds like content hashes, and option errors checked whole."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import pytest

from joycap_queue.errors import OptionError


def seeds(count: int) -> list[str]:
    """``count`` distinct seeds shaped like the content hashes prompt draws are seeded with."""
    return [hashlib.sha256(str(i).encode()).hexdigest() for i in range(count)]


def option_error(field: str, call: Callable[[], Any], *must_mention: str) -> str:
    """``call()`` raises an OptionError naming ``field`` whose message mentions each text."""
    with pytest.raises(OptionError) as info:
        call()
    assert info.value.field == field
    message = str(info.value)
    for text in must_mention:
        assert text in message, (text, message)
    return message
