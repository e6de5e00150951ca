"""The client's RunConfig TypedDict is the service's RunConfig: the same fields, types and choices."""

from __future__ import annotations

import dataclasses
from typing import Literal, get_args, get_origin, get_type_hints

from meds_client._types import RunConfig as ClientConfig
from meds_service.core.config import CHOICES, RunConfig


def test_the_same_fields() -> None:
    service = {f.name for f in dataclasses.fields(RunConfig)}
    assert set(get_type_hints(ClientConfig)) == service


def test_the_same_choices() -> None:
    client = {
        name: get_args(hint) for name, hint in get_type_hints(ClientConfig).items() if get_origin(hint) is Literal
    }
    assert client == CHOICES
    assert set(CHOICES["penalty_target"]) == {"wrong", "correct", "both", "none"}  # read from the field types


def test_the_same_types() -> None:
    service = get_type_hints(RunConfig)
    for name, hint in get_type_hints(ClientConfig).items():
        assert hint == service[name], name
