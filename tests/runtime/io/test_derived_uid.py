"""Derived SOP Instance UIDs: the same source and key give the same UID, anything else another."""

from __future__ import annotations

import pytest
from pydicom.uid import UID

from medsec_edge.runtime.io.derived_uid import derived_instance_uid

KEY = bytes(range(32))


def test_the_same_source_and_key_give_the_same_valid_uid():
    a = derived_instance_uid("1.2.826.0.1.3680043.8.498.1", KEY)
    assert a == derived_instance_uid("1.2.826.0.1.3680043.8.498.1", KEY)
    assert a == derived_instance_uid("1.2.826.0.1.3680043.8.498.1\x00", KEY)  # DICOM's padding is not the UID
    assert a.startswith("2.25.") and UID(a).is_valid and len(a) <= 64
    assert int(a[5:]) < 2**128


def test_another_source_or_key_gives_another_uid():
    a = derived_instance_uid("1.2.3.4", KEY)
    assert a != derived_instance_uid("1.2.3.5", KEY)
    assert a != derived_instance_uid("1.2.3.4", bytes(32))


@pytest.mark.parametrize("uid,key", [("", KEY), ("  ", KEY), ("1.2.3", b"short")])
def test_refuses_an_empty_source_or_a_short_key(uid, key):
    with pytest.raises(ValueError):
        derived_instance_uid(uid, key)
