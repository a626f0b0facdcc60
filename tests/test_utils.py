"""kit.utils helpers shared by several stages: CSV columns, connected components."""
from __future__ import annotations

import pytest

from kit.utils import KitError, connected_components, read_csv_columns


def test_connected_components_are_transitive_and_named_by_their_smallest_item():
    groups = connected_components(["d", "c", "b", "a", "e"], [("d", "b"), ("b", "c"), ("x", "e")])
    assert groups == {"d": "b", "c": "b", "b": "b", "a": "a", "e": "e"}  # x is no item: ignored
    assert list(groups) == ["d", "c", "b", "a", "e"]  # in the order given
    chain = connected_components(range(6), [(5, 4), (3, 2), (4, 3), (0, 1)])
    assert chain == {0: 0, 1: 0, 2: 2, 3: 2, 4: 2, 5: 2}


def test_read_csv_columns_keeps_strings_and_the_asked_columns(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text(" name ,extra,value\nNA,1,007\n,2,\n")
    df = read_csv_columns(path, ("value", "name"), "name,value")
    assert list(df.columns) == ["value", "name"]
    assert df.to_dict("list") == {"value": ["007", ""], "name": ["NA", ""]}


def test_read_csv_columns_names_the_file_the_header_and_the_fix(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("name,other\na,b\n")
    with pytest.raises(KitError, match="missing column\\(s\\) value; expected header") as err:
        read_csv_columns(path, ("name", "value"), "name,value", "rerun ./run.sh clean")
    assert str(err.value) == (f"{path}: missing column(s) value; expected header name,value "
                              "(found: name,other); rerun ./run.sh clean")
    path.write_bytes(b"\xff\xfe\x00broken\"\n\"")
    with pytest.raises(KitError, match=r"cannot be read as CSV .*expected header name,value$"):
        read_csv_columns(path, ("name",), "name,value")
