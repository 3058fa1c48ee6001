"""Case discovery: both layouts, both naming schemes, malformed cases, stray files."""

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from brats_cls.cases import MODALITIES, SCHEME_SUFFIXES, SEG_SUFFIXES, CaseError, find_cases, parse_name
from brats_cls.regions import et_label_of as et_label


def touch_case(folder: Path, case_id: str, scheme: str, seg: bool = True, ext: str = ".nii.gz", skip=()):
    folder.mkdir(parents=True, exist_ok=True)
    for name in MODALITIES:
        if name not in skip:
            (folder / f"{case_id}{SCHEME_SUFFIXES[scheme][name]}{ext}").write_bytes(b"x")
    if seg:
        (folder / f"{case_id}{SEG_SUFFIXES[scheme]}{ext}").write_bytes(b"x")


def test_parse_names_of_both_schemes():
    assert parse_name("BraTS2021_00001_t1ce.nii.gz") == ("BraTS2021_00001", "2021", "t1ce")
    assert parse_name("BraTS2021_00001_t1.nii.gz") == ("BraTS2021_00001", "2021", "t1")
    assert parse_name("BraTS2021_00001_seg.nii") == ("BraTS2021_00001", "2021", "seg")
    assert parse_name("BraTS-GLI-00002-000-t2f.nii.gz") == ("BraTS-GLI-00002-000", "2023", "flair")
    assert parse_name("BraTS-GLI-00002-000-t1n.nii.gz") == ("BraTS-GLI-00002-000", "2023", "t1")
    assert parse_name("BraTS-GLI-00002-000-seg.nii.gz") == ("BraTS-GLI-00002-000", "2023", "seg")
    assert parse_name("notes.txt") is None
    assert parse_name("_t1.nii.gz") is None
    assert parse_name("scan.nii.gz") is None


def test_folder_of_case_folders_in_both_schemes(tmp_path):
    touch_case(tmp_path / "BraTS-GLI-00002-000", "BraTS-GLI-00002-000", "2023")
    touch_case(tmp_path / "BraTS2021_00001", "BraTS2021_00001", "2021", seg=False, ext=".nii")
    (tmp_path / "README.txt").write_text("not a case")
    (tmp_path / "empty_folder").mkdir()
    found = find_cases(tmp_path)
    assert not found.errors
    assert [c.case_id for c in found.cases] == ["BraTS-GLI-00002-000", "BraTS2021_00001"]
    new, old = found.cases
    assert new.scheme == "2023" and new.seg is not None and new.seg.name == "BraTS-GLI-00002-000-seg.nii.gz"
    assert old.scheme == "2021" and old.seg is None
    assert [p.name for p in old.paths] == [f"BraTS2021_00001_{m}.nii" for m in MODALITIES]
    assert new.modalities["flair"].name.endswith("-t2f.nii.gz")
    assert et_label(new.scheme) == 3 and et_label(old.scheme) == 4


def test_one_case_lying_flat(tmp_path):
    touch_case(tmp_path, "BraTS2021_00007", "2021")
    found = find_cases(tmp_path)
    assert [c.case_id for c in found.cases] == ["BraTS2021_00007"]
    assert found.cases[0].output_name == "BraTS2021_00007.nii.gz"


def test_missing_modality_names_case_and_file(tmp_path):
    touch_case(tmp_path / "a", "BraTS-GLI-00003-000", "2023", skip=("t1ce",))
    touch_case(tmp_path / "b", "BraTS-GLI-00004-000", "2023")
    found = find_cases(tmp_path)
    assert [c.case_id for c in found.cases] == ["BraTS-GLI-00004-000"]
    (error,) = found.errors
    assert isinstance(error, CaseError)
    assert "BraTS-GLI-00003-000" in str(error) and "BraTS-GLI-00003-000-t1c.nii.gz" in str(error)


def test_duplicated_modality_is_an_error(tmp_path):
    touch_case(tmp_path, "BraTS2021_00009", "2021")
    (tmp_path / "BraTS2021_00009_t2.nii").write_bytes(b"x")
    found = find_cases(tmp_path)
    assert not found.cases
    assert "duplicated t2" in str(found.errors[0])


def test_same_id_in_two_folders_is_reported(tmp_path):
    touch_case(tmp_path / "one", "BraTS2021_00010", "2021")
    touch_case(tmp_path / "two", "BraTS2021_00010", "2021")
    found = find_cases(tmp_path)
    assert len(found.cases) == 1 and "same case ID" in str(found.errors[0])


def test_unusable_root(tmp_path):
    with pytest.raises(FileNotFoundError):
        find_cases(tmp_path / "missing")
    assert find_cases(tmp_path).cases == []


def test_unicode_and_spaces_in_folder_names(tmp_path):
    touch_case(tmp_path / "patient ä 1", "BraTS2021_00011", "2021")
    assert [c.case_id for c in find_cases(tmp_path).cases] == ["BraTS2021_00011"]


_id_chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="/\\\x00")


@given(case_id=st.text(_id_chars, min_size=1, max_size=30), scheme=st.sampled_from(["2021", "2023"]),
       role=st.sampled_from([*MODALITIES, "seg"]), ext=st.sampled_from([".nii.gz", ".nii"]))
def test_parser_round_trips_generated_names(case_id, scheme, role, ext):
    suffix = SEG_SUFFIXES[scheme] if role == "seg" else SCHEME_SUFFIXES[scheme][role]
    parsed = parse_name(f"{case_id}{suffix}{ext}")
    if parsed is None:
        # Refused only for IDs that are unsafe as output names: hidden, padded, or with a control character.
        assert case_id.startswith(".") or case_id.strip() != case_id or any(ord(c) < 32 or ord(c) == 127 for c in case_id)
        return
    parsed_id, parsed_scheme, parsed_role = parsed
    # A name is ambiguous when the ID itself ends like a longer suffix; the parse must still rebuild it.
    rebuilt_suffix = SEG_SUFFIXES[parsed_scheme] if parsed_role == "seg" else SCHEME_SUFFIXES[parsed_scheme][parsed_role]
    assert parsed_id + rebuilt_suffix == case_id + suffix
    assert "/" not in parsed_id and parsed_id not in (".", "..")


@given(st.text(min_size=0, max_size=40))
def test_parser_never_crashes_and_never_yields_a_path(name):
    parsed = parse_name(name)
    if parsed is not None:
        assert "/" not in parsed[0] and "\\" not in parsed[0]
