from __future__ import annotations

import h5py
import numpy as np
import pytest

from caloforge.data import (
    ShowerData,
    ShowerFile,
    ShowerStream,
    ShowerWriter,
    first_showers,
    iter_first_showers,
    read_showers,
    write_showers,
)
from caloforge.errors import OptionError, ShowerFileError
from caloforge.geometry import get_geometry

from conftest import random_showers


def test_calochallenge_round_trip_and_layout(tmp_path):
    geometry = get_geometry("calochallenge-1-photons")
    data = random_showers(geometry, 250, conditions=True)
    path = tmp_path / "s.h5"
    write_showers(path, data, geometry, batch_size=64)
    with h5py.File(path, "r") as h5:  # what the official evaluate.py reads
        assert h5["incident_energies"].shape == (250, 1)
        assert h5["incident_energies"].dtype == np.float64
        assert h5["showers"].shape == (250, 368) and h5["showers"].dtype == np.float32
        assert h5["showers"].compression == "gzip"
        assert h5["conditions/entry_point"].attrs["units"] == "mm"
    back = read_showers(path, geometry)
    np.testing.assert_array_equal(back.showers, data.showers)
    np.testing.assert_array_equal(back.incident_energies, data.incident_energies)
    np.testing.assert_allclose(back.conditions["direction"], data.conditions["direction"])
    assert back.condition_units == {"entry_point": "mm", "direction": "rad"}


def test_calogan_round_trip(tmp_path):
    geometry = get_geometry("calogan")
    data = random_showers(geometry, 40)
    path = tmp_path / "g.h5"
    write_showers(path, data, geometry, file_format="calogan")
    with h5py.File(path, "r") as h5:
        assert h5["layer_0"].shape == (40, 3, 96)
        assert h5["layer_1"].shape == (40, 12, 12)
        assert h5["layer_2"].shape == (40, 12, 6)
        assert h5["overflow"].shape == (40, 3)
        np.testing.assert_allclose(h5["energy"][:, 0], data.incident_energies / 1000, rtol=1e-6)
    back = read_showers(path)  # format and geometry inferred
    np.testing.assert_array_equal(back.showers, data.showers)
    np.testing.assert_allclose(back.incident_energies, data.incident_energies, rtol=1e-6)


def test_streaming_batches_cover_file(tmp_path):
    geometry = get_geometry("lhcb-ecal")
    data = random_showers(geometry, 103)
    path = tmp_path / "s.h5"
    write_showers(path, data, geometry)
    with ShowerFile(path, geometry) as reader:
        sizes = [len(b) for b in reader.iter_batches(25)]
        joined = ShowerData.concatenate(list(reader.iter_batches(25)))
    assert sizes == [25, 25, 25, 25, 3]
    np.testing.assert_array_equal(joined.showers, data.showers)


@pytest.mark.parametrize("n, chunk", [(30, 30), (1, 50), (99, 40), (250, 64), (500, 100),
                                      (900, 1000)])
def test_first_showers_in_pieces_are_the_first_showers(tmp_path, n, chunk):
    """``iter_first_showers``: the pieces of showers in memory or of a stream (whole blocks
    of 30) join to what ``first_showers`` reads at once, none larger than needed."""
    geometry = get_geometry("lhcb-ecal")
    data = random_showers(geometry, 500)
    path = tmp_path / "s.h5"
    write_showers(path, data, geometry)
    with ShowerStream(path, geometry, block_size=30) as stream:
        for source in (data, stream):
            pieces = list(iter_first_showers(source, n, chunk))
            expected = first_showers(source, n)
            assert sum(len(p) for p in pieces) == len(expected) == min(n, 500)
            assert max(len(p) for p in pieces) <= max(chunk, 30)
            np.testing.assert_array_equal(ShowerData.concatenate(pieces).showers,
                                          expected.showers)


def test_stream_blocks_bounded_by_voxel_values(tmp_path, monkeypatch):
    geometry = get_geometry("lhcb-ecal")  # 900 voxels
    data = random_showers(geometry, 2000)
    path = tmp_path / "s.h5"
    write_showers(path, data, geometry)
    with ShowerStream(path, geometry) as stream:
        assert stream.block_size == 63  # 32 blocks for a small file
    monkeypatch.setattr(ShowerStream, "block_values", 40 * 900 + 5)
    with ShowerStream(path, geometry) as stream:
        assert stream.block_size == 40  # large showers: fewer per block
        assert stream.n_blocks == 50
        np.testing.assert_array_equal(stream.read_block(49).showers, data.showers[1960:])


def test_writer_failure_leaves_nothing(tmp_path):
    geometry = get_geometry("lhcb-ecal")
    path = tmp_path / "out.h5"
    path.write_bytes(b"previous content")
    data = random_showers(geometry, 10)
    with pytest.raises(RuntimeError):
        with ShowerWriter(path, geometry) as writer:
            writer.write(data)
            raise RuntimeError("simulated crash")
    assert path.read_bytes() == b"previous content"
    assert [p.name for p in tmp_path.iterdir()] == ["out.h5"]


def test_writer_refuses_invalid_values(tmp_path):
    geometry = get_geometry("lhcb-ecal")
    data = random_showers(geometry, 10)
    data.showers[3, 7] = np.nan
    with pytest.raises(ShowerFileError, match="NaN"):
        write_showers(tmp_path / "out.h5", data, geometry)
    assert list(tmp_path.iterdir()) == []


def test_calogan_format_needs_calogan_geometry(tmp_path):
    with pytest.raises(OptionError):
        ShowerWriter(tmp_path / "x.h5", get_geometry("lhcb-ecal"), "calogan")


def test_atomic_output_is_flushed_to_disk_before_and_after_the_rename(tmp_path, monkeypatch):
    import os

    from caloforge.atomic import atomic_output

    flushed = []
    real_fsync = os.fsync

    def recording_fsync(descriptor):
        flushed.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    target = tmp_path / "out.txt"
    with atomic_output(target) as tmp:
        with open(tmp, "w") as stream:
            stream.write("data")
    assert len(flushed) == 2
    assert os.path.basename(flushed[0]).startswith(".out.txt.")  # the file, before the rename
    assert flushed[1] == str(tmp_path)  # then the directory holding the new name
    assert target.read_text() == "data"


def test_atomic_output_uses_normal_permissions(tmp_path):
    import os

    geometry = get_geometry("lhcb-ecal")
    path = tmp_path / "perm.h5"
    write_showers(path, random_showers(geometry, 5), geometry)
    mask = os.umask(0)
    os.umask(mask)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~mask)


def test_read_conditions_skips_voxels(tmp_path):
    geometry = get_geometry("lhcb-ecal")
    data = random_showers(geometry, 30, conditions=True)
    path = tmp_path / "c.h5"
    write_showers(path, data, geometry)
    with ShowerFile(path, geometry) as reader:
        energies, conditions = reader.read_conditions(5, 15)
    np.testing.assert_array_equal(energies, data.incident_energies[5:15])
    np.testing.assert_allclose(conditions["entry_point"], data.conditions["entry_point"][5:15])
