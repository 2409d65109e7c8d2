from __future__ import annotations

import math

import numpy as np
import pytest

from caloforge.errors import GeometryError
from caloforge.geometry import (
    CartesianLayer,
    CylindricalLayer,
    Geometry,
    available_geometries,
    calochallenge_dataset,
    get_geometry,
    parse_binning_xml,
)

EXPECTED_VOXELS = {
    "calochallenge-1-photons": 368,
    "calochallenge-1-pions": 533,
    "calochallenge-2": 6480,
    "calochallenge-3": 40500,
    "calogan": 504,
    "ild-ecal": 27000,
    "lhcb-ecal": 900,
    "hepemshow-pbwo4-lar": 8000,
}

OFFICIAL_FILES = {
    "binning_dataset_1_photons.xml": "calochallenge-1-photons",
    "binning_dataset_1_pions.xml": "calochallenge-1-pions",
    "binning_dataset_2.xml": "calochallenge-2",
    "binning_dataset_3.xml": "calochallenge-3",
}


def test_builtin_voxel_counts():
    assert available_geometries() == list(EXPECTED_VOXELS)
    for name, count in EXPECTED_VOXELS.items():
        assert get_geometry(name).n_voxels == count


def test_dataset_2_and_3_shapes():
    ds2, ds3 = get_geometry("calochallenge-2"), get_geometry("calochallenge-3")
    assert ds2.n_layers == 45 and ds2.layers[0].shape == (16, 9)
    assert ds3.n_layers == 45 and ds3.layers[0].shape == (50, 18)


def test_hepemshow_binning_equals_the_shared_xml(shared_dir):
    """The G4HepEm showers' binning (../shared/hepemshow) is the built-in geometry, voxel for
    voxel: (layer, alpha, r) order, alpha from -pi, the radial edges in mm."""
    parsed = parse_binning_xml(shared_dir / "hepemshow" / "binning_hepemshow.xml")
    builtin = get_geometry("hepemshow-pbwo4-lar")
    assert parsed == builtin and builtin.n_voxels == 8000
    assert [layer.layer_id for layer in parsed.layers] == list(range(50))
    np.testing.assert_array_equal(parsed.voxel_centres, builtin.voxel_centres)
    assert builtin.particle == "electron" and builtin.threshold_mev == pytest.approx(0.01)
    # not an official CaloChallenge binning, but the built-in's 10 keV cut comes with it
    assert calochallenge_dataset(parsed) is None
    assert parsed.threshold_mev == builtin.threshold_mev


@pytest.mark.parametrize("filename", sorted(OFFICIAL_FILES))
def test_parser_reproduces_builtin(shared_dir, filename):
    parsed = parse_binning_xml(shared_dir / "calochallenge" / filename)
    builtin = get_geometry(OFFICIAL_FILES[filename])
    assert parsed == builtin  # layer ids, radial edges (exact floats), angular bins, order
    assert [layer.layer_id for layer in parsed.layers] == [
        layer.layer_id for layer in builtin.layers]
    for a, b in zip(parsed.layers, builtin.layers):
        assert a.r_edges == b.r_edges and a.n_alpha == b.n_alpha
    np.testing.assert_array_equal(parsed.voxel_centres, builtin.voxel_centres)
    # the XML has no threshold: the official one (1 MeV / 15.15 keV) comes with the binning
    assert parsed.threshold_mev == builtin.threshold_mev > 0
    assert calochallenge_dataset(parsed) == calochallenge_dataset(builtin) is not None


def test_official_thresholds_and_dataset_tags():
    expected = {"calochallenge-1-photons": ("1-photons", 1.0),
                "calochallenge-1-pions": ("1-pions", 1.0),
                "calochallenge-2": ("2", 0.5e-3 / 0.033), "calochallenge-3": ("3", 0.5e-3 / 0.033)}
    for name, (tag, threshold) in expected.items():
        geometry = get_geometry(name)
        assert calochallenge_dataset(geometry) == tag
        assert geometry.threshold_mev == pytest.approx(threshold, rel=1e-3)
    assert calochallenge_dataset(get_geometry("ild-ecal")) is None


def test_non_official_xml_keeps_no_threshold(tmp_path):
    layers = (CylindricalLayer(0, (0.0, 1.0, 2.0), 4), CylindricalLayer(1, (0.0, 3.0), 1))
    path = tmp_path / "own.xml"
    path.write_text(Geometry("own", layers, particle="electron").to_xml(pid=11))
    parsed = parse_binning_xml(path)
    assert parsed.threshold_mev == 0.0 and calochallenge_dataset(parsed) is None


def test_xml_round_trip(tmp_path):
    geometry = get_geometry("calochallenge-1-pions")
    path = tmp_path / "binning.xml"
    path.write_text(geometry.to_xml(pid=211))
    assert parse_binning_xml(path) == geometry


def test_flattening_order_radial_fastest():
    layer = CylindricalLayer(0, (0.0, 1.0, 2.0, 3.0), 4)
    centres = layer.voxel_centres()
    radii = np.hypot(centres[:, 0], centres[:, 1])
    np.testing.assert_allclose(radii[:3], [0.5, 1.5, 2.5])  # first angular bin, radial fastest
    # angular centres are the midpoints of linspace(-pi, pi, n + 1)
    angles = np.arctan2(centres[::3, 1], centres[::3, 0])
    np.testing.assert_allclose(angles, [-3 * math.pi / 4, -math.pi / 4, math.pi / 4,
                                        3 * math.pi / 4])


def test_bin_points_inverts_centres():
    for name in ("calochallenge-1-photons", "calogan", "lhcb-ecal"):
        geometry = get_geometry(name)
        for layer in geometry.layers:
            centres = layer.voxel_centres()
            index = layer.bin_points(centres[:, 0], centres[:, 1])
            np.testing.assert_array_equal(index, np.arange(layer.n_voxels))
            assert layer.bin_points(np.array([1e6]), np.array([0.0]))[0] == -1


def test_layer_energies_and_split():
    geometry = get_geometry("calogan")
    showers = np.arange(2 * geometry.n_voxels, dtype=np.float64).reshape(2, -1)
    per_layer = geometry.layer_energies(showers)
    images = geometry.split_layers(showers)
    assert [im.shape for im in images] == [(2, 3, 96), (2, 12, 12), (2, 12, 6)]
    np.testing.assert_allclose(per_layer, np.stack([im.sum(axis=(1, 2)) for im in images], 1))
    with pytest.raises(GeometryError, match="voxels"):
        geometry.layer_energies(showers[:, :-1])


def test_dict_round_trip():
    for name in available_geometries():
        geometry = get_geometry(name)
        assert Geometry.from_dict(geometry.to_dict()) == geometry


def test_invalid_layers_rejected():
    with pytest.raises(GeometryError):
        CylindricalLayer(0, (0.0, 2.0, 1.0), 1)
    with pytest.raises(GeometryError):
        CartesianLayer(0, 0, 3, 1.0, 1.0)
    with pytest.raises(GeometryError, match="unknown geometry"):
        get_geometry("nope")


def test_parser_bad_files(tmp_path):
    with pytest.raises(GeometryError, match="no such file"):
        parse_binning_xml(tmp_path / "missing.xml")
    bad = tmp_path / "bad.xml"
    bad.write_text("<Bins><Bin name='x'><Layer id='0' r_edges='0,a' /></Bin></Bins>")
    with pytest.raises(GeometryError, match="malformed"):
        parse_binning_xml(bad)
    bad.write_text("not xml at all <")
    with pytest.raises(GeometryError, match="XML"):
        parse_binning_xml(bad)
