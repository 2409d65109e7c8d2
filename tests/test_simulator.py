"""Physics checks of the reference simulator on small samples (fixed seeds)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from scipy.optimize import curve_fit
from scipy.special import gammainc

from caloforge.cli import main
from caloforge.errors import OptionError
from caloforge.simulator import (
    ReferenceSimulator,
    SimulationPlan,
    mean_longitudinal_parameters,
    parse_energy,
    sample_energies,
    simulate_to_file,
)

ENERGIES = np.array([2e3, 8e3, 32e3, 128e3])  # MeV


@pytest.fixture(scope="module")
def ds2():
    return ReferenceSimulator("calochallenge-2")


@pytest.fixture(scope="module")
def ds2_scan(ds2):
    rng = np.random.default_rng(11)
    return {e: ds2.simulate(np.full(300, e), "electron", rng=rng) for e in ENERGIES}


def _layer_depths(sim):
    return sim.detector.layer_depths_x0(sim.geometry.n_layers)  # (layers, 2) in X0


def test_shower_maximum_grows_like_log_energy(ds2, ds2_scan):
    depth = _layer_depths(ds2)

    def fit_maximum(layer_energy):
        def model(_, a, b, norm):
            return norm * (gammainc(a, b * depth[:, 1]) - gammainc(a, b * depth[:, 0]))

        (a, b, _), _ = curve_fit(model, None, layer_energy / layer_energy.sum(), p0=[4, 0.5, 1],
                                 bounds=([1.01, 0.01, 0.1], [50, 5, 2]))
        return (a - 1) / b

    fitted = np.array([fit_maximum(ds2.geometry.layer_energies(
        ds2_scan[e].showers.astype(float)).mean(0)) for e in ENERGIES])
    expected = mean_longitudinal_parameters(ENERGIES, ds2.detector.em_structure)["T_average"]
    # GFLASH: T = ln(E/E_c) - const for the average profile (layers are 0.8 X0 thick)
    np.testing.assert_allclose(fitted, expected, atol=0.4)
    slope = np.polyfit(np.log(ENERGIES), fitted, 1)[0]
    assert slope == pytest.approx(1.0, abs=0.1)


def test_resolution_falls_like_stochastic_term(ds2, ds2_scan):
    totals = [ds2_scan[e].showers.sum(axis=1) for e in ENERGIES]
    resolution = np.array([t.std() / t.mean() for t in totals])
    (a, b), _ = curve_fit(lambda e, a, b: np.sqrt(a ** 2 / e + b ** 2), ENERGIES / 1e3,
                          resolution, p0=[0.17, 0.01], bounds=([0.0, 0.0], [1.0, 0.2]))
    assert abs(a) == pytest.approx(ds2.detector.stochastic_term, rel=0.15)
    assert abs(b) < 0.01
    assert np.all(np.diff(resolution) < 0)


def test_ninety_percent_within_one_moliere_radius(ds2, ds2_scan):
    showers = ds2_scan[32e3].showers.astype(float)
    layer = ds2.geometry.layers[0]
    radial = showers.reshape(len(showers), 45, *layer.shape).sum(axis=(0, 1, 2))
    cumulative = np.concatenate([[0.0], np.cumsum(radial)]) / radial.sum()
    within = np.interp(ds2.detector.em_structure.moliere_radius_mm, layer.r_edges, cumulative)
    assert within == pytest.approx(0.90, abs=0.04)


def test_photons_start_later_than_electrons(ds2):
    rng = np.random.default_rng(5)
    centres = _layer_depths(ds2).mean(axis=1)

    def mean_depth(particle):
        data = ds2.simulate(np.full(400, 20e3), particle, rng=rng)
        layer_energy = ds2.geometry.layer_energies(data.showers.astype(float))
        return ((layer_energy * centres).sum(1) / layer_energy.sum(1)).mean()

    shift = mean_depth("photon") - mean_depth("electron")
    assert shift == pytest.approx(9 / 7, abs=0.35)  # mean conversion depth 9/7 X0


def test_pions_deeper_wider_and_fluctuating_more():
    sim = ReferenceSimulator("calochallenge-1-pions")
    rng = np.random.default_rng(3)
    centres = sim.detector.layer_depths_x0(sim.geometry.n_layers).mean(axis=1)
    stats = {}
    for particle in ("electron", "pion"):
        data = sim.simulate(np.full(400, 65536.0), particle, rng=rng)
        showers = data.showers.astype(float)
        total = showers.sum(1)
        hit = total > 0
        layer_energy = sim.geometry.layer_energies(showers)
        stats[particle] = {
            "depth": ((layer_energy * centres).sum(1)[hit] / total[hit]).mean(),
            "radius": ((showers * sim.geometry.voxel_radii).sum(1)[hit] / total[hit]).mean(),
            "resolution": total.std() / total.mean()}
    pion, electron = stats["pion"], stats["electron"]
    assert pion["depth"] > electron["depth"] + 5.0  # X0
    assert pion["radius"] > 1.5 * electron["radius"]
    assert pion["resolution"] > 2.0 * electron["resolution"]


def test_early_and_late_layers_anticorrelated(ds2, ds2_scan):
    layer_energy = ds2.geometry.layer_energies(ds2_scan[32e3].showers.astype(float))
    fraction = layer_energy / layer_energy.sum(1, keepdims=True)
    early, late = fraction[:, :6].sum(1), fraction[:, 20:].sum(1)
    assert np.corrcoef(early, late)[0, 1] < -0.4


def test_inclined_tracks_and_entry_point_move_the_shower():
    sim = ReferenceSimulator("lhcb-ecal")
    rng = np.random.default_rng(2)
    n = 200
    x = sim.geometry.voxel_centres[:, 0]

    def centre_x(entry_x, angle):
        conditions = {"entry_point": np.tile([entry_x, 0.0], (n, 1)),
                      "direction": np.tile([angle, 0.0], (n, 1))}
        showers = sim.simulate(np.full(n, 20e3), "electron", conditions, rng=rng).showers
        return float(((showers * x).sum(1) / showers.sum(1)).mean())

    assert abs(centre_x(0.0, 0.0)) < 3.0
    assert centre_x(40.0, 0.0) == pytest.approx(40.0, abs=4.0)
    # 0.3 rad over the first ~10 X0 (about 16 cm) moves the centre by several cm
    assert centre_x(0.0, 0.3) > 30.0


def _simulate(path, seed, workers=1, n=300):
    plan = SimulationPlan.from_options("calochallenge-1-photons", n, seed=seed, chunk_size=64)
    simulate_to_file(path, plan, workers=workers)
    with h5py.File(path, "r") as h5:
        return h5["incident_energies"][:], h5["showers"][:]


def test_same_seed_same_file_any_workers(tmp_path):
    e1, s1 = _simulate(tmp_path / "a.h5", seed=7)
    e2, s2 = _simulate(tmp_path / "b.h5", seed=7, workers=2)
    e3, s3 = _simulate(tmp_path / "c.h5", seed=8)
    np.testing.assert_array_equal(e1, e2)
    np.testing.assert_array_equal(s1, s2)
    assert not np.array_equal(s1, s3)


def test_default_energy_mix_of_dataset_1():
    plan = SimulationPlan.from_options("calochallenge-1-photons", 121_000, seed=0)
    energies, _, _ = plan.draw_inputs()
    values, counts = np.unique(energies, return_counts=True)
    np.testing.assert_array_equal(values, 2.0 ** np.arange(8, 23))
    assert counts.tolist() == [10000] * 11 + [5000, 3000, 2000, 1000]


def test_spectra_and_energy_parsing():
    rng = np.random.default_rng(0)
    e = sample_energies(20000, "log-uniform", (1e3, 1e6), rng=rng)
    assert 1e3 <= e.min() and e.max() <= 1e6
    assert np.median(e) == pytest.approx(np.sqrt(1e3 * 1e6), rel=0.1)
    u = sample_energies(20000, "uniform", (1e3, 1e5), rng=rng)
    assert u.mean() == pytest.approx(5.05e4, rel=0.03)
    assert parse_energy("10GeV") == 1e4 and parse_energy("1 TeV") == 1e6
    assert parse_energy("256") == 256.0
    for bad in ("ten", "5 furlongs", "-1GeV", "0"):
        with pytest.raises(OptionError):
            parse_energy(bad)


def test_cli_simulate_with_conditions_and_plot(tmp_path, capsys):
    out = tmp_path / "lhcb.h5"
    assert main(["simulate", "--geometry", "lhcb-ecal", "-n", "50", "--seed", "1",
                 "-o", str(out), "--workers", "1"]) == 0
    with h5py.File(out, "r") as h5:
        assert h5["conditions/entry_point"].shape == (50, 2)
        assert h5["conditions/direction"].attrs["units"] == "rad"
        assert "simulation" in h5.attrs
        assert np.all(np.abs(h5["conditions/entry_point"][:]) <= 5.0)
    png = tmp_path / "lhcb.png"
    assert main(["plot", str(out), "--geometry", "lhcb-ecal", "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_simulate_calogan_format(tmp_path):
    out = tmp_path / "calogan.h5"
    assert main(["simulate", "--geometry", "calogan", "-n", "20", "--seed", "1",
                 "--particle", "pion", "--format", "calogan", "-o", str(out)]) == 0
    with h5py.File(out, "r") as h5:
        assert h5["layer_1"].shape == (20, 12, 12)


@pytest.mark.parametrize("argv, message", [
    (["--geometry", "nope"], "unknown geometry"),
    (["--geometry", "calogan", "--energy-range", "10GeV", "1GeV"], "LO < HI"),
    (["--geometry", "calogan", "--workers", "0", "--seed", "1"], "--workers"),
    (["--geometry", "calogan", "--energies", "1GeV,x"], "cannot read energy"),
    (["--geometry", "lhcb-ecal", "--format", "calogan", "--seed", "1"], "calogan geometry"),
    (["--geometry", "calogan", "-n", "0"], ">= 1"),
])
def test_cli_simulate_bad_options(tmp_path, capsys, argv, message):
    out = tmp_path / "x.h5"
    args = ["simulate", "-n", "10", "-o", str(out)] + argv
    assert main(args) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


# --- the readout response: properties of real silicon calorimeters -------------------------
def _hit_spectrum(sim, particle, energies, seed):
    data = sim.simulate(energies, particle, rng=np.random.default_rng(seed))
    return data.showers


@pytest.fixture(scope="module")
def ds2_spread(ds2):
    """200 electrons log-uniform over 1 GeV - 1 TeV, the dataset's spectrum."""
    rng = np.random.default_rng(21)
    return _hit_spectrum(ds2, "electron", np.exp(rng.uniform(np.log(1e3), np.log(1e6), 200)), 22)


def _peak_position(hits, mip):
    """Centre of the most populated of 30 log bins between 0.3 and 10 MIP (dN/dlog E)."""
    edges = mip * np.logspace(np.log10(0.3), 1.0, 31)
    counts, _ = np.histogram(hits, bins=edges)
    best = counts.argmax()
    return np.sqrt(edges[best] * edges[best + 1]), counts


@pytest.mark.parametrize("name,particle,expected_mip_mev",
                         [("calochallenge-2", "electron", 0.084 / 0.033),  # scaled by 1/0.033
                          ("ild-ecal", "photon", 0.15)])                   # visible MeV
def test_mip_peak_in_the_hit_spectrum(name, particle, expected_mip_mev, ds2, ds2_spread):
    if name == "calochallenge-2":
        sim, showers = ds2, ds2_spread
    else:
        sim = ReferenceSimulator(name)
        showers = _hit_spectrum(sim, particle, np.full(150, 5e4), 23)
    hits = showers[showers > 0]
    assert sim.detector.readout.mip_stored_mev == pytest.approx(expected_mip_mev, rel=0.01)
    peak, counts = _peak_position(hits, expected_mip_mev)
    assert peak == pytest.approx(expected_mip_mev, rel=0.2)
    # a real peak: clearly above the spectrum half a decade below it
    assert counts.max() > 1.5 * counts[np.searchsorted(np.logspace(np.log10(0.3), 1, 31),
                                                       0.35)]


def test_spectrum_continuous_from_threshold_to_the_mip_peak(ds2, ds2_spread):
    hits = ds2_spread[ds2_spread > 0]
    threshold, mip = ds2.detector.threshold_mev, ds2.detector.readout.mip_stored_mev
    edges = threshold * 10 ** (0.25 * np.arange(0, int(np.ceil(4 * np.log10(mip / threshold)))
                                                + 1))
    counts, _ = np.histogram(hits, bins=edges)
    shares = counts / len(hits)
    assert len(shares) >= 8 and shares.min() >= 0.005, shares


def test_soft_hits_grow_towards_periphery_and_tail(ds2, ds2_spread):
    """Hits under 10x the threshold (soft electrons, no MIP crossing) are a larger share of
    the hits far from the axis and deep in the shower than in the core before the maximum."""
    geometry = ds2.geometry
    threshold = ds2.detector.threshold_mev
    showers = ds2_spread.reshape(len(ds2_spread), geometry.n_layers, *geometry.layers[0].shape)

    def soft_share(block):
        hits = block[block > 0]
        return (hits < 10 * threshold).mean()

    for layers in (slice(2, 8), slice(8, 15), slice(25, 45)):  # at every depth
        inner, outer = showers[:, layers, :, :2], showers[:, layers, :, 6:]  # < 9.3, > 27.9 mm
        assert soft_share(outer) > soft_share(inner) + 0.1
    # at the same radius (the core, < 14 mm): before / well past the maximum
    early, late = showers[:, 2:8, :, :3], showers[:, 25:, :, :3]
    assert soft_share(late) > soft_share(early) + 0.05


def test_closed_form_cell_integral_matches_numerics():
    from scipy import integrate

    from caloforge.simulator import quadrant_integral, rectangle_shares

    scale = 1.3
    density = lambda y, x: scale ** 2 / (np.pi * (x * x + y * y + scale ** 2) ** 2)  # noqa: E731
    numeric, _ = integrate.dblquad(density, 0.4, 2.5, lambda _: -1.0, lambda _: 3.0)
    cells = rectangle_shares(np.array([[0.4, 2.5]]), np.array([[-1.0, 3.0]]), np.array([scale]))
    assert cells[0, 0, 0] == pytest.approx(numeric, rel=1e-9)
    assert quadrant_integral(1e9, 1e9, scale) == pytest.approx(0.25)
    # a fine grid around the axis holds what the radial CDF says is inside it
    edges = np.linspace(-50, 50, 101)[None, :]
    assert rectangle_shares(edges, edges, np.array([2.0])).sum() == pytest.approx(
        1 - 0.0, abs=2e-3)


def test_moyal_crossings_have_the_landau_shape():
    from caloforge.detectors import get_detector

    readout = get_detector("calochallenge-2").readout
    deposits = readout._moyal(200_000, np.random.default_rng(0))
    counts, edges = np.histogram(deposits, bins=np.linspace(0.05, 0.2, 151))
    mode = edges[counts.argmax()]
    assert mode == pytest.approx(0.084, abs=0.003)  # MeV, 0.3 mm silicon
    assert deposits.mean() == pytest.approx(readout.crossing_mean_mev, rel=0.01)
    # the Landau tail: a Gaussian of the same width would put ~1e-9 beyond 6 sigma
    assert np.mean(deposits > 0.084 + 6 * readout.mip_width_mev) > 0.005


@pytest.mark.parametrize("name,particle,low,high", [
    ("calochallenge-1-photons", "photon", 0.97, 1.02),   # calibrated, Tile layer included
    ("calochallenge-1-pions", "pion", 0.75, 0.92),       # h/e = 0.65 on the hadronic part
    ("calochallenge-2", "electron", 0.96, 1.01),         # calibrated (x 1/0.033)
    ("ild-ecal", "photon", 0.015, 0.04),                 # visible silicon energy
])
def test_energy_scale_of_the_stored_values(name, particle, low, high):
    """Calibrated detectors store deposited energy, in every layer whatever its sampling
    fraction; the ILD stores visible silicon energy (~1 GeV for a 50 GeV photon)."""
    sim = ReferenceSimulator(name)
    showers = sim.simulate(np.full(200, 5e4), particle, rng=np.random.default_rng(9)).showers
    assert low < showers.sum(axis=1).mean() / 5e4 < high


@pytest.mark.parametrize("name,particle,low,high", [
    ("calochallenge-1-pions", "pion", 0.7, 0.95), ("calochallenge-2", "electron", 0.95, 1.02)])
def test_off_axis_showers_in_cylindrical_binnings_keep_the_energy_scale(name, particle, low,
                                                                         high):
    """An entry point off the binning's axis takes the spot path (documented limit)."""
    sim = ReferenceSimulator(name)
    n = 60
    conditions = {"entry_point": np.tile([4.0, 0.0], (n, 1)), "direction": np.zeros((n, 2))}
    assert not sim._uses_expected_field(sim._axis(conditions, n))
    showers = sim.simulate(np.full(n, 6.5e4), particle, conditions,
                           rng=np.random.default_rng(4)).showers
    assert low < showers.sum(axis=1).mean() / 6.5e4 < high


@pytest.fixture(scope="module")
def hepemshow_sample():
    """Reference-simulator electrons in the G4HepEm detector, log-uniform 1-100 GeV."""
    rng = np.random.default_rng(21)
    energies = np.exp(rng.uniform(np.log(1e3), np.log(1e5), 1200))
    sim = ReferenceSimulator("hepemshow-pbwo4-lar")
    return energies, sim.simulate(energies, "electron", rng=rng).showers


def test_hepemshow_detector_reproduces_the_g4hepem_facts(hepemshow_sample):
    """The facts of G4HepEm's showers in this detector (../shared/hepemshow/README.md, 12,000
    electrons): argon holds 0.266 of 1-1.8 GeV and 0.239 of 56-100 GeV (a little of it
    outside the binning); centre of gravity at layer 17.4 + 2.69 ln(E/GeV); hit median 1.15
    MeV; a MIP peak at 1.0-1.1 MeV in the first layers near the axis."""
    from caloforge.evaluation.shower_facts import shower_facts
    from caloforge.geometry import get_geometry

    energies, showers = hepemshow_sample
    facts = shower_facts(showers, energies, get_geometry("hepemshow-pbwo4-lar"))
    bins = facts["energy_bins"]
    assert 0.255 < bins[0]["visible_fraction"] < 0.27
    assert 0.230 < bins[-1]["visible_fraction"] < 0.245
    for row in bins:
        expected = 17.4 + 2.69 * np.log(row["mean_energy_mev"] / 1e3)
        assert abs(row["cog_layer"] - expected) < 1.0, row  # the formula fits to ~0.3
    assert 0.92 < facts["hit_percentiles_mev"]["50"] / 1.15 < 1.3
    assert 0.9 <= facts["mip_peak_mev"] <= 1.15
    assert facts["hits_below_0.1_mev"] < 0.15  # G4HepEm: 9.3 % below 100 keV (no cut)


def test_plateau_mpv_gives_the_measured_mip_peaks():
    """The Landau-Vavilov-Bichsel most probable loss on the Fermi plateau reproduces the MIP
    peaks the detectors were given by hand (0.3 mm Si: 84 keV; ILD's 0.5 mm: 0.15 MeV) and
    G4HepEm's 1.0-1.1 MeV in 5.7 mm of liquid argon, which the hepemshow readout uses."""
    from caloforge.detectors import LIQUID_ARGON, SILICON, TUNGSTEN, get_detector, plateau_mpv_mev

    assert plateau_mpv_mev(SILICON, 0.3) == pytest.approx(0.084, rel=0.01)
    assert plateau_mpv_mev(SILICON, 0.5) == pytest.approx(0.15, rel=0.05)
    assert 1.0 < plateau_mpv_mev(LIQUID_ARGON, 5.7) < 1.1
    readout = get_detector("hepemshow-pbwo4-lar").readout
    assert readout.mip_mpv_mev == pytest.approx(plateau_mpv_mev(LIQUID_ARGON, 5.7))
    with pytest.raises(ValueError, match="I and hbar omega_p"):
        plateau_mpv_mev(TUNGSTEN, 1.0)


def test_incident_electron_crosses_the_layers_in_front_of_the_maximum():
    """G4HepEm: an electron leaves a MIP in the first layer of every shower (0.1 % empty);
    GFLASH's profile, near zero at the front, leaves 79 % of them empty. With the incident
    track each layer before the maximum holds at least one crossing on the axis; photons
    (no track before they convert) keep their empty first layers."""
    from dataclasses import replace

    from caloforge.detectors import get_detector

    detector = get_detector("hepemshow-pbwo4-lar")
    assert detector.incident_track
    energies = np.full(300, 5e3)
    first_layer = {}
    for track in (True, False):
        sim = ReferenceSimulator("hepemshow-pbwo4-lar",
                                 detector=replace(detector, incident_track=track))
        for particle in ("electron", "photon"):
            showers = sim.simulate(energies, particle, rng=np.random.default_rng(4)).showers
            first_layer[track, particle] = showers[:, :160]
    with_track = first_layer[True, "electron"]
    assert (with_track.sum(1) == 0).mean() == 0.0
    # the crossing sits on the axis: in the innermost ring (radial bin 0 of each angle)
    assert (with_track.reshape(-1, 16, 10)[:, :, 0].max(1) > 0.5).all()
    assert (first_layer[False, "electron"].sum(1) == 0).mean() > 0.3
    assert (first_layer[True, "photon"].sum(1) == 0).mean() > 0.3
