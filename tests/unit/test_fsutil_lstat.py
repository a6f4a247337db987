"""Looking at a path before writing: missing is None, any other failure is one line naming the path."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from lowvram.core.errors import ApplyError
from lowvram.world import fsutil
from lowvram.world.apply import hook


def _denied(monkeypatch: pytest.MonkeyPatch, denied: Path) -> None:
    real = os.lstat

    def lstat(path: object, *args: object, **kwargs: object) -> os.stat_result:
        if Path(str(path)) == denied:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "lstat", lstat)


def test_missing_is_none_and_a_file_is_its_stat(tmp_path: Path) -> None:
    assert fsutil.lstat_or_none(tmp_path / "absent", "x") is None
    (tmp_path / "f").write_text("x")
    st = fsutil.lstat_or_none(tmp_path / "f", "x")
    assert st is not None and st.st_size == 1


def test_writable_file_names_what_it_could_not_look_at(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "webui-user.sh"
    _denied(monkeypatch, target)
    with pytest.raises(ApplyError) as err:
        fsutil.write_target(target, tmp_path, "webui-user file")
    assert err.value.message == f"cannot look at the webui-user file {target}: Permission denied"
    assert err.value.hint == "check its permissions"


def test_hook_folder_check_names_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "lowvram-layout"
    _denied(monkeypatch, target)
    with pytest.raises(ApplyError) as err:
        hook._kind_of(target)
    assert err.value.message == f"cannot look at {target}: Permission denied"


def test_writable_folder_names_what_it_could_not_look_at(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "extensions"
    _denied(monkeypatch, target)
    with pytest.raises(ApplyError) as err:
        fsutil.writable_folder(target, tmp_path, "extensions folder")
    assert err.value.message == f"cannot look at the extensions folder {target}: Permission denied"
