"""The wire contract: extensible by design (every enum starts at UNSPECIFIED = 0)."""

from __future__ import annotations

import importlib
import pkgutil

import pytest
from google.protobuf.descriptor import EnumDescriptor, FileDescriptor

import coalition.v1


def _files() -> list[FileDescriptor]:
    out = []
    for mod in pkgutil.iter_modules(coalition.v1.__path__):
        if mod.name.endswith("_pb2"):
            out.append(importlib.import_module(f"coalition.v1.{mod.name}").DESCRIPTOR)
    return out


def _enums(fd: FileDescriptor) -> list[EnumDescriptor]:
    found = list(fd.enum_types_by_name.values())
    stack = list(fd.message_types_by_name.values())
    while stack:
        m = stack.pop()
        found.extend(m.enum_types)
        stack.extend(m.nested_types)
    return found


def test_all_proto_files_are_generated() -> None:
    names = {fd.name for fd in _files()}
    assert {"coalition/v1/exchange.proto", "coalition/v1/admin.proto"} <= names


@pytest.mark.parametrize("fd", _files(), ids=lambda fd: fd.name)
def test_every_enum_starts_with_unspecified_zero(fd: FileDescriptor) -> None:
    for enum in _enums(fd):
        first = enum.values_by_number.get(0)
        assert first is not None, f"{enum.full_name} has no zero value"
        assert first.name.endswith("UNSPECIFIED"), f"{enum.full_name}: zero is {first.name}"


def test_services_are_declared() -> None:
    from coalition.v1 import admin_pb2, exchange_pb2

    ex = exchange_pb2.DESCRIPTOR.services_by_name["Exchange"]
    ad = admin_pb2.DESCRIPTOR.services_by_name["Admin"]
    assert {"Publish", "Subscribe", "Directory", "RegisterKeys", "Recipients"} <= set(
        ex.methods_by_name
    )
    assert {"AdmitPartner", "SetPolicy", "ApproveProposal", "VerifyAudit", "WhoReceives"} <= set(
        ad.methods_by_name
    )
