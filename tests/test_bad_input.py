"""Every bad-input case: one clear line naming the file, non-zero exit, no output left."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from caloforge.cli import main
from caloforge.data import write_showers
from caloforge.geometry import get_geometry

from conftest import random_showers

GEOMETRY = get_geometry("calochallenge-1-photons")


def _valid(path, n=50):
    write_showers(path, random_showers(GEOMETRY, n), GEOMETRY)
    return path


def _raw(path, energies, showers, **extra):
    with h5py.File(path, "w") as h5:
        if energies is not None:
            h5["incident_energies"] = energies
        if showers is not None:
            h5["showers"] = showers
        for key, value in extra.items():
            h5[key] = value
    return path


def _missing(tmp):
    return tmp / "does-not-exist.h5"


def _not_hdf5(tmp):
    path = tmp / "text.h5"
    path.write_text("this is not HDF5\n" * 20)
    return path


def _truncated(tmp):
    path = _valid(tmp / "trunc.h5", n=400)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _missing_key(tmp):
    return _raw(tmp / "nokey.h5", np.ones((5, 1)) * 1e3, None, other=np.zeros(3))


def _wrong_voxels(tmp):
    return _raw(tmp / "vox.h5", np.ones((5, 1)) * 1e3, np.ones((5, 367), np.float32))


def _n_mismatch(tmp):
    return _raw(tmp / "n.h5", np.ones((6, 1)) * 1e3, np.ones((5, 368), np.float32))


def _nan(tmp):
    showers = np.ones((5, 368), np.float32)
    showers[2, 4] = np.nan
    return _raw(tmp / "nan.h5", np.ones((5, 1)) * 1e3, showers)


def _inf(tmp):
    showers = np.ones((5, 368), np.float32)
    showers[4, 0] = np.inf
    return _raw(tmp / "inf.h5", np.ones((5, 1)) * 1e3, showers)


def _negative_voxel(tmp):
    showers = np.ones((5, 368), np.float32)
    showers[1, 1] = -0.5
    return _raw(tmp / "neg.h5", np.ones((5, 1)) * 1e3, showers)


def _zero_energy(tmp):
    energies = np.ones((5, 1)) * 1e3
    energies[3] = 0.0
    return _raw(tmp / "e0.h5", energies, np.ones((5, 368), np.float32))


def _wrong_dtype(tmp):
    return _raw(tmp / "dtype.h5", np.ones((5, 1)) * 1e3, np.ones((5, 368), np.int32))


CASES = {
    "missing file": (_missing, "no such file"),
    "not hdf5": (_not_hdf5, "not a readable HDF5"),
    "truncated": (_truncated, "truncated"),
    "missing keys": (_missing_key, "missing dataset"),
    "voxel count": (_wrong_voxels, "367 voxels"),
    "N mismatch": (_n_mismatch, "has 5 showers"),
    "NaN": (_nan, "NaN or infinite.*shower 2"),
    "inf": (_inf, "NaN or infinite.*shower 4"),
    "negative voxel": (_negative_voxel, "negative voxel energy"),
    "non-positive E_inc": (_zero_energy, "must be positive"),
    "wrong dtype": (_wrong_dtype, "dtype int32"),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_bad_input(tmp_path, capsys, case, command):
    make, pattern = CASES[case]
    bad = make(tmp_path)
    out = tmp_path / "out" / "converted.h5"
    argv = [command, str(bad), "--geometry", GEOMETRY.name]
    if command == "convert":
        argv += ["-o", str(out)]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    status = main(argv)
    err = capsys.readouterr().err.strip()
    assert status != 0
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    assert str(bad) in err
    import re

    assert re.search(pattern, err), err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_convert_round_trip_and_inspect(tmp_path, capsys):
    geometry = get_geometry("calogan")
    source = tmp_path / "calogan.h5"
    write_showers(source, random_showers(geometry, 30), geometry, file_format="calogan")
    target = tmp_path / "cc.h5"
    assert main(["convert", str(source), "-o", str(target), "--to", "calochallenge"]) == 0
    assert main(["inspect", str(target), "--geometry", "calogan"]) == 0
    out = capsys.readouterr().out
    assert "showers       30" in out and "voxels: 504" in out


def test_invalid_option_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["inspect"])
    assert info.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert main(["geometries", "--threads", "0"]) == 1
