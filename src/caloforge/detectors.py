"""Detector descriptions for the reference simulator, one per built-in geometry.

A detector is a stack of slabs along the nominal particle direction (perpendicular depth
``z`` in mm from the calorimeter front). Each slab is homogenised sampling material with its
own radiation length X0 and interaction length lambda_I, and is read out by one readout
layer of the geometry (or by none: dead material, e.g. the ATLAS inner detector and cryostat
in front of the presampler). Electromagnetic showers are parameterised in units of the main
electromagnetic sampling structure (GFLASH's Z_eff, E_c,eff, R_M,eff, F_S, e-hat);
hadronic components in units of each slab's lambda_I.

Energies written to files are **calibrated deposited energies** in MeV: visible energy
divided by the sampling fraction, as in CaloChallenge datasets 2 and 3 (stored /0.033), so
that the sum of a contained electron shower is close to its incident energy; except the
ILD ECAL, whose published showers are visible silicon energies (a 50 GeV photon leaves
about 1.4 GeV), threshold half a MIP (0.075 MeV).

Readouts (:class:`caloforge.response.Readout`): one crossing of 0.3 mm Si has its MIP peak
at 84 keV (2.55 MeV after the 1/0.033 of datasets 2/3), of ILD's 0.5 mm sensors at 0.15 MeV
(PDG thin-silicon most probable losses); thick LAr and scintillator gaps at 0.8 x the mean
loss; Moyal width 1.7 xi (Landau xi = 0.1535 (Z/A) rho x MeV); visible fraction of showers
0.033 for datasets 2/3 (the datasets' own), else GFLASH's e-hat x the MIP sampling fraction;
soft deposits from a tenth of the (visible) threshold to twice the MIP peak.

Sources of the values (see ``docs/simulator.md``):

* material constants (Z, A, density, X0, critical energy): PDG tables as quoted in the notes;
  dE/dx_min of each material: PDG "Atomic and nuclear properties";
* CaloChallenge 2 and 3: 90 physical layers of 1.4 mm W + 0.3 mm Si read out in pairs
  (45 readout layers of 3.4 mm, about 0.8 X0), threshold 15.15 keV after the 1/0.033 rescale;
  stochastic term 17 %/sqrt(E) (CALICE Si-W prototype: 16.5 %);
* CaloChallenge 1 (ATLAS barrel, |eta| ~ 0.2): about 2 X0 of material in front, presampler,
  strips 4.3 X0, middle 16 X0, back 2 X0 of Pb/LAr accordion (1.5 mm Pb, 4.2 mm LAr gap),
  then Tile A/BC/D of 1.5/4.1/1.8 lambda_I (iron/scintillator); stochastic term 10 %/sqrt(E);
* CaloGAN: 80 layers of 2 mm Pb + 4 mm LAr read out as 90 / 347 / 43 mm;
* ILD ECAL: 20 layers of 2.1 mm W and 10 of 4.2 mm W, 0.5 mm Si sensors (ILD TDR);
* LHCb ECAL (shashlik): 66 layers of 2 mm Pb + 4 mm scintillator, 10 %/sqrt(E);
* HepEmShow (G4HepEm's shower application): 50 layers of 2.3 mm PbWO4 + 5.7 mm LAr, each read
  out in 16 x 10 (alpha, r) bins; visible argon energy, 4.5 %/sqrt(E) (the G4HepEm showers').
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np

from .geometry import Geometry, get_geometry
from .response import MOYAL_WIDTH_PER_XI, Readout, landau_xi_mev

MOLIERE_ENERGY_MEV = 21.2  # E_s


@dataclass(frozen=True)
class Material:
    """A pure material. Lengths in g/cm^2 unless the name says mm."""

    name: str
    Z: float
    A: float
    density: float  # g/cm^3
    x0: float  # radiation length, g/cm^2
    lambda_i: float  # nuclear interaction length, g/cm^2
    dedx_min: float  # minimum ionisation, MeV cm^2/g
    mean_excitation_ev: float | None = None  # I (PDG)
    plasma_energy_ev: float | None = None  # hbar omega_p (PDG)

    @property
    def critical_energy_mev(self) -> float:
        """E_c = 2.66 (X0 Z / A)^1.1 MeV (the notes' formula)."""
        return 2.66 * (self.x0 * self.Z / self.A) ** 1.1


LEAD = Material("Pb", 82, 207.2, 11.35, 6.37, 199.6, 1.122)
TUNGSTEN = Material("W", 74, 183.84, 19.30, 6.76, 191.9, 1.145)
LIQUID_ARGON = Material("LAr", 18, 39.95, 1.396, 19.55, 119.7, 1.519, 188.0, 22.42)
SILICON = Material("Si", 14, 28.09, 2.33, 21.82, 108.4, 1.664, 173.0, 31.05)
SCINTILLATOR = Material("polystyrene", 3.5, 6.5, 1.032, 43.79, 81.7, 1.936)
IRON = Material("Fe", 26, 55.85, 7.874, 13.84, 132.1, 1.451)
# A compound as one effective element: Z the mass-weighted mean (Pb 45.5 %, W 40.4 %, O 14.1 %),
# A from the compound's <Z/A> = 0.41315 (PDG), so Z/A-based quantities stay exact.
LEAD_TUNGSTATE = Material("PbWO4", 68.36, 68.36 / 0.41315, 8.28, 7.39, 168.3, 1.255)


@dataclass(frozen=True)
class SamplingStructure:
    """One repeating cell of absorber (1) and active (2) material, thicknesses in mm.

    Effective quantities follow the GFLASH sampling-calorimeter formulas of the notes.
    """

    absorber: Material
    absorber_mm: float
    active: Material
    active_mm: float
    measured_e_over_mip: float | None = None  # from Geant4 showers; else GFLASH's formula

    @cached_property
    def mass_fractions(self) -> tuple[float, float]:
        m1 = self.absorber_mm * self.absorber.density
        m2 = self.active_mm * self.active.density
        return m1 / (m1 + m2), m2 / (m1 + m2)

    @property
    def density(self) -> float:
        """Mean density in g/cm^3."""
        m1 = self.absorber_mm * self.absorber.density
        m2 = self.active_mm * self.active.density
        return (m1 + m2) / (self.absorber_mm + self.active_mm)

    @property
    def z_eff(self) -> float:
        w1, w2 = self.mass_fractions
        return w1 * self.absorber.Z + w2 * self.active.Z

    @property
    def x0_g(self) -> float:
        """Effective radiation length, g/cm^2."""
        w1, w2 = self.mass_fractions
        return 1.0 / (w1 / self.absorber.x0 + w2 / self.active.x0)

    @property
    def x0_mm(self) -> float:
        return 10.0 * self.x0_g / self.density

    @property
    def lambda_mm(self) -> float:
        w1, w2 = self.mass_fractions
        return 10.0 / (w1 / self.absorber.lambda_i + w2 / self.active.lambda_i) / self.density

    @property
    def critical_energy_mev(self) -> float:
        """E_c,eff = X0_eff * sum_i W_i E_c,i / X0_i."""
        w1, w2 = self.mass_fractions
        return self.x0_g * (w1 * self.absorber.critical_energy_mev / self.absorber.x0
                            + w2 * self.active.critical_energy_mev / self.active.x0)

    @property
    def moliere_radius_mm(self) -> float:
        """R_M,eff = E_s / sum_i (W_i E_c,i / X0_i), converted to mm."""
        w1, w2 = self.mass_fractions
        inverse = (w1 * self.absorber.critical_energy_mev / self.absorber.x0
                   + w2 * self.active.critical_energy_mev / self.active.x0)
        return 10.0 * MOLIERE_ENERGY_MEV / inverse / self.density

    @property
    def sampling_frequency(self) -> float:
        """F_S = X0_eff / (d1 + d2) (lengths)."""
        return self.x0_mm / (self.absorber_mm + self.active_mm)

    @property
    def e_hat(self) -> float:
        """e/mip: the measured value where there is one, else GFLASH's
        e-hat = 1 / (1 + 0.007 (Z1 - Z2)); it sets the visible fraction of showers and
        GFLASH's sampling corrections of the profiles."""
        if self.measured_e_over_mip is not None:
            return self.measured_e_over_mip
        return 1.0 / (1.0 + 0.007 * (self.absorber.Z - self.active.Z))

    @property
    def mip_sampling_fraction(self) -> float:
        """Fraction of a minimum-ionising particle's energy loss seen by the active layer."""
        loss1 = self.absorber.dedx_min * self.absorber.density * self.absorber_mm
        loss2 = self.active.dedx_min * self.active.density * self.active_mm
        return loss2 / (loss1 + loss2)

    @property
    def mip_mev_per_mm(self) -> float:
        """Calibrated energy loss of a minimum-ionising particle, MeV/mm."""
        loss1 = self.absorber.dedx_min * self.absorber.density * self.absorber_mm
        loss2 = self.active.dedx_min * self.active.density * self.active_mm
        return 0.1 * (loss1 + loss2) / (self.absorber_mm + self.active_mm)


@dataclass(frozen=True)
class Slab:
    """A depth interval of one material, read out by geometry layer ``layer`` (-1: dead)."""

    thickness_mm: float
    layer: int
    structure: SamplingStructure


@dataclass(frozen=True)
class SimulationDefaults:
    """What ``caloforge simulate`` produces for a geometry when no option overrides it.

    ``energies_mev`` with ``energy_weights`` gives a discrete energy mix (the weights are the
    relative numbers of showers per energy); otherwise energies follow ``spectrum`` over
    ``energy_range_mev``. ``conditions`` names a generator of extra conditions.
    """

    particle: str
    spectrum: str = "log-uniform"
    energy_range_mev: tuple[float, float] = (1e3, 1e6)
    energies_mev: tuple[float, ...] = ()
    energy_weights: tuple[float, ...] = ()
    conditions: str = "none"


@dataclass(frozen=True)
class Detector:
    """Everything the reference simulator needs to know about one calorimeter.

    Attributes:
        geometry_name: the built-in geometry it reads out.
        slabs: the depth structure from the front.
        em_structure: the sampling structure whose GFLASH parameters describe EM showers.
        stochastic_term: c in sigma/E = c / sqrt(E / GeV) for EM showers.
        hadronic_stochastic_term: the same for the hadronic component of pion showers.
        threshold_mev: readout threshold on calibrated voxel energies (MeV).
        max_spots: cap on the number of energy spots per shower component (speed).
        defaults: default particle, energy spectrum and conditions of the published dataset.
        readout: the active layers' response (MIP crossings and soft electrons,
            :mod:`caloforge.response`) for electromagnetic showers; None: the older
            per-voxel Gamma fluctuation of spot deposits.
        longitudinal_spread: factor on GFLASH's shower-to-shower widths of ln T and
            ln alpha; 1 (GFLASH's) unless measured against Geant4 showers of the detector.
        radial_scales: factors on GFLASH's core and tail radii R_C and R_T and on its core
            probability p; (1, 1, 1) unless measured against Geant4 showers of the detector.
        incident_track: an incident electron crosses every layer in front of its shower's
            maximum on the axis (at least one MIP crossing there), which GFLASH's smooth
            profile, near zero at the front, leaves out; measured for hepemshow-pbwo4-lar.
    """

    geometry_name: str
    slabs: tuple[Slab, ...]
    em_structure: SamplingStructure
    stochastic_term: float
    hadronic_stochastic_term: float
    threshold_mev: float
    defaults: SimulationDefaults
    max_spots: int = 4000
    readout: Readout | None = None
    longitudinal_spread: float = 1.0
    radial_scales: tuple[float, float, float] = (1.0, 1.0, 1.0)
    incident_track: bool = False

    @cached_property
    def boundaries_mm(self) -> np.ndarray:
        """Slab boundaries in perpendicular depth, ``(n_slabs + 1,)`` mm."""
        return np.concatenate([[0.0], np.cumsum([s.thickness_mm for s in self.slabs])])

    @cached_property
    def boundaries_x0(self) -> np.ndarray:
        """Slab boundaries in radiation lengths, ``(n_slabs + 1,)``."""
        return np.concatenate(
            [[0.0], np.cumsum([s.thickness_mm / s.structure.x0_mm for s in self.slabs])])

    @cached_property
    def boundaries_lambda(self) -> np.ndarray:
        """Slab boundaries in interaction lengths, ``(n_slabs + 1,)``."""
        return np.concatenate(
            [[0.0], np.cumsum([s.thickness_mm / s.structure.lambda_mm for s in self.slabs])])

    @cached_property
    def slab_layer(self) -> np.ndarray:
        """Readout layer of each slab, with an extra -1 for 'beyond the back' (leakage)."""
        return np.array([s.layer for s in self.slabs] + [-1], dtype=np.int64)

    @cached_property
    def slab_lambda_mm(self) -> np.ndarray:
        values = [s.structure.lambda_mm for s in self.slabs]
        return np.array(values + [values[-1]])

    def layer_depths_x0(self, n_layers: int) -> np.ndarray:
        """Front and back of each readout layer in X0, ``(n_layers, 2)``."""
        depths = np.full((n_layers, 2), np.nan)
        for i, slab in enumerate(self.slabs):
            if slab.layer < 0:
                continue
            front, back = self.boundaries_x0[i], self.boundaries_x0[i + 1]
            current = depths[slab.layer]
            depths[slab.layer] = [np.fmin(current[0], front), np.fmax(current[1], back)]
        return depths

    def describe(self) -> str:
        s = self.em_structure
        return (f"{self.geometry_name}: {len(self.slabs)} slabs, "
                f"{self.boundaries_x0[-1]:.1f} X0 / {self.boundaries_lambda[-1]:.2f} lambda_I "
                f"deep; EM structure {s.absorber.name}/{s.active.name} "
                f"{s.absorber_mm:g}+{s.active_mm:g} mm: X0 {s.x0_mm:.2f} mm, "
                f"R_M {s.moliere_radius_mm:.1f} mm, Z_eff {s.z_eff:.1f}, "
                f"E_c {s.critical_energy_mev:.2f} MeV, F_S {s.sampling_frequency:.2f}; "
                f"c = {self.stochastic_term:.2f}/sqrt(GeV); threshold {self.threshold_mev:g} MeV")


# --- the detectors --------------------------------------------------------------------
SI_W_CALOCHALLENGE = SamplingStructure(TUNGSTEN, 1.4, SILICON, 0.3)
PB_LAR_ATLAS = SamplingStructure(LEAD, 1.5, LIQUID_ARGON, 4.2)
FE_SCINT_TILE = SamplingStructure(IRON, 14.0, SCINTILLATOR, 3.0)
PB_LAR_CALOGAN = SamplingStructure(LEAD, 2.0, LIQUID_ARGON, 4.0)
SI_W_ILD_THIN = SamplingStructure(TUNGSTEN, 2.1, SILICON, 0.5)
SI_W_ILD_THICK = SamplingStructure(TUNGSTEN, 4.2, SILICON, 0.5)
PB_SCINT_SHASHLIK = SamplingStructure(LEAD, 2.0, SCINTILLATOR, 4.0)
# e/mip measured on G4HepEm's showers (bench/hepemshow/fit_simulator.py; GFLASH's formula: 0.74)
PBWO4_LAR_HEPEMSHOW = SamplingStructure(LEAD_TUNGSTATE, 2.3, LIQUID_ARGON, 5.7,
                                        measured_e_over_mip=0.82)

# Highly granular detectors need more spots per shower to fill their small voxels the way
# GFLASH's N = (10.3 / c) E^0.959 asks (about 33,000 at 700 GeV for Si-W); coarser ones
# keep the default cap of 4000 for speed.
FINE_GRAINED_MAX_SPOTS = 20_000

def plateau_mpv_mev(material: Material, thickness_mm: float) -> float:
    """Most probable energy loss of a relativistic charged track crossing ``thickness_mm``
    of ``material`` (MeV): the Landau-Vavilov-Bichsel value (PDG eq. 34.12) on the Fermi
    plateau, where the density effect has grown to 2 ln(hbar omega_p / I) + 2 ln(beta gamma)
    - 1 and the value no longer depends on the momentum (shower electrons of tens of MeV).

    Gives 84 keV for 0.3 mm Si (CaloChallenge 2/3), 0.145 MeV for 0.5 mm Si (ILD) and
    1.03 MeV for 5.7 mm LAr (G4HepEm: 1.0-1.1 MeV).
    """
    if material.mean_excitation_ev is None or material.plasma_energy_ev is None:
        raise ValueError(f"{material.name}: I and hbar omega_p are needed for the MPV")
    xi = landau_xi_mev(material.Z / material.A, material.density, thickness_mm) * 1e6  # eV
    electron_rest_ev = 0.51099895e6
    i, plasma = material.mean_excitation_ev, material.plasma_energy_ev
    bracket = (math.log(2 * electron_rest_ev * i / plasma ** 2) + 1.0 + math.log(xi / i)
               + 0.200 - 1.0)
    return xi * bracket * 1e-6


def active_layer_readout(structure: SamplingStructure, stochastic_term: float,
                         threshold_visible_mev: float, calibrated: bool = True,
                         visible_fraction: float | None = None,
                         mpv_mev: float | None = None) -> Readout:
    """The response of one active layer of ``structure``.

    MIP most probable value ``mpv_mev`` (default 0.8 x the mean loss dE/dx_min x thickness,
    the ratio of thick layers); Moyal width 1.7 xi; visible fraction of showers
    ``visible_fraction`` (default GFLASH's e-hat x the MIP sampling fraction); soft
    deposits from a tenth of the threshold to twice the MIP peak; stored values calibrated
    (visible / visible fraction) unless ``calibrated`` is False (visible energy).
    """
    active = structure.active
    mean_loss = active.dedx_min * active.density * structure.active_mm / 10.0
    mpv = mpv_mev if mpv_mev is not None else 0.8 * mean_loss
    fraction = (visible_fraction if visible_fraction is not None
                else structure.e_hat * structure.mip_sampling_fraction)
    width = MOYAL_WIDTH_PER_XI * landau_xi_mev(active.Z / active.A, active.density,
                                               structure.active_mm)
    return Readout(f"{active.name} {structure.active_mm:g} mm", mip_mpv_mev=mpv,
                   mip_width_mev=width, visible_fraction=fraction, calibrated=calibrated,
                   stochastic_term=stochastic_term, soft_min_mev=threshold_visible_mev / 10,
                   soft_max_mev=2 * mpv)


CALOCHALLENGE_SAMPLING_FRACTION = 0.033
CALOCHALLENGE_1_ENERGIES = tuple(float(2 ** k) for k in range(8, 23))
# Showers per energy in the published dataset 1 files (121,000 photons / 120,800 pions).
CALOCHALLENGE_1_WEIGHTS = (10000.0,) * 11 + (5000.0, 3000.0, 2000.0, 1000.0)


def _calochallenge_2_3(geometry: Geometry) -> Detector:
    cell = SI_W_CALOCHALLENGE
    slabs = tuple(Slab(2 * (cell.absorber_mm + cell.active_mm), layer, cell) for layer in range(45))
    # The datasets store silicon energy / 0.033 (threshold 0.5 keV of silicon = 15.15 keV
    # stored); one crossing of 0.3 mm Si: MPV 84 keV
    threshold = geometry.threshold_mev
    readout = active_layer_readout(
        cell, 0.17, threshold_visible_mev=threshold * CALOCHALLENGE_SAMPLING_FRACTION,
        visible_fraction=CALOCHALLENGE_SAMPLING_FRACTION, mpv_mev=0.084)
    return Detector(geometry.name, slabs, cell, stochastic_term=0.17,
                    hadronic_stochastic_term=0.5, threshold_mev=threshold,
                    max_spots=FINE_GRAINED_MAX_SPOTS, readout=readout,
                    defaults=SimulationDefaults("electron", "log-uniform", (1e3, 1e6)))


def _atlas(geometry: Geometry, hadronic_layers: tuple[int, ...]) -> Detector:
    em = PB_LAR_ATLAS
    x0 = em.x0_mm
    slabs = [Slab(0.5 * x0, -1, em),  # inner detector, solenoid, cryostat: energy lost
             Slab(1.5 * x0, 0, em),   # presampler (calibrated: recovers upstream losses)
             Slab(4.3 * x0, 1, em),   # strips
             Slab(16.0 * x0, 2, em),  # middle
             Slab(2.0 * x0, 3, em)]   # back
    tile = FE_SCINT_TILE
    for layer, n_lambda in zip(hadronic_layers, (1.5, 4.1, 1.8)):
        slabs.append(Slab(n_lambda * tile.lambda_mm, layer, tile))
    # A 1 keV readout threshold: the 1 MeV of the datasets is an evaluation cut (geometry)
    readout = active_layer_readout(em, 0.10, threshold_visible_mev=0.001 * em.e_hat
                                   * em.mip_sampling_fraction)
    assert geometry.particle is not None
    return Detector(geometry.name, tuple(slabs), em, stochastic_term=0.10,
                    hadronic_stochastic_term=0.5, threshold_mev=0.001, readout=readout,
                    defaults=SimulationDefaults(geometry.particle, "discrete",
                                                energies_mev=CALOCHALLENGE_1_ENERGIES,
                                                energy_weights=CALOCHALLENGE_1_WEIGHTS))


def _calogan(geometry: Geometry) -> Detector:
    cell = PB_LAR_CALOGAN
    slabs = (Slab(90.0, 0, cell), Slab(347.0, 1, cell), Slab(43.0, 2, cell))
    readout = active_layer_readout(cell, 0.10, threshold_visible_mev=0.001 * cell.e_hat
                                   * cell.mip_sampling_fraction)
    return Detector(geometry.name, slabs, cell, stochastic_term=0.10, hadronic_stochastic_term=0.5,
                    threshold_mev=0.001, readout=readout,
                    defaults=SimulationDefaults("electron", "uniform", (1e3, 1e5)))


def _ild(geometry: Geometry) -> Detector:
    thin, thick = SI_W_ILD_THIN, SI_W_ILD_THICK
    slabs = tuple(Slab(thin.absorber_mm + thin.active_mm, i, thin) for i in range(20)) + tuple(
        Slab(thick.absorber_mm + thick.active_mm, 20 + i, thick) for i in range(10))
    # The published showers are visible silicon energies (not calibrated); one crossing of
    # the 0.5 mm sensor: MPV 0.15 MeV; threshold (the geometry's) half a MIP.
    readout = active_layer_readout(thin, 0.17, threshold_visible_mev=geometry.threshold_mev,
                                   calibrated=False, mpv_mev=0.15)
    return Detector(geometry.name, slabs, thin, stochastic_term=0.17,
                    hadronic_stochastic_term=0.5, threshold_mev=geometry.threshold_mev,
                    max_spots=FINE_GRAINED_MAX_SPOTS, readout=readout,
                    defaults=SimulationDefaults("photon", "uniform", (1e4, 1e5)))


def _lhcb(geometry: Geometry) -> Detector:
    cell = PB_SCINT_SHASHLIK
    slabs = (Slab(66 * (cell.absorber_mm + cell.active_mm), 0, cell),)
    readout = active_layer_readout(cell, 0.10, threshold_visible_mev=0.1 * cell.e_hat
                                   * cell.mip_sampling_fraction)
    return Detector(geometry.name, slabs, cell, stochastic_term=0.10, hadronic_stochastic_term=0.5,
                    threshold_mev=0.1, readout=readout,
                    defaults=SimulationDefaults("electron", "inverse", (1e3, 1e5),
                                                conditions="lhcb"))


# Measured against G4HepEm's showers of this detector (bench/hepemshow/fit_simulator.py on
# the `tune` split; bench/hepemshow/results/simulator-fit.json, docs/real-physics.md):
# e/mip 0.82 where GFLASH's e-hat says 0.74 (PBWO4_LAR_HEPEMSHOW; research/hepemshow.md),
# and what a 5.7 mm argon gap sees of the soft electrons: dN/dE ~ E^-0.9 between 20 keV and
# two MIPs, half of the energy on the axis and 85 % in the halo and tail (the default: E^-1.5
# from a tenth of the threshold, 10 % / 60 %).
# R_C, R_T and p_core: fitted to the layers' mean EC_r and width_r (simulator-fit-radial.json)
HEPEMSHOW_RADIAL_SCALES = (0.9, 0.9, 0.95)


def _hepemshow(geometry: Geometry) -> Detector:
    cell = PBWO4_LAR_HEPEMSHOW
    slabs = tuple(Slab(cell.absorber_mm + cell.active_mm, i, cell) for i in range(50))
    # Voxels store visible argon energy (not calibrated), as HepEmShow scores it; the
    # geometry's 10 keV is the threshold. Stochastic term: the G4HepEm showers' 4.5 %.
    readout = active_layer_readout(cell, 0.045, threshold_visible_mev=geometry.threshold_mev,
                                   calibrated=False,
                                   mpv_mev=plateau_mpv_mev(cell.active, cell.active_mm))
    readout = replace(readout, soft_slope=0.9, soft_min_mev=0.02,
                      soft_max_mev=2 * readout.mip_mpv_mev, soft_core_share=0.5,
                      soft_halo_share=0.85)
    return Detector(geometry.name, slabs, cell, stochastic_term=0.045,
                    hadronic_stochastic_term=0.5, threshold_mev=geometry.threshold_mev,
                    max_spots=FINE_GRAINED_MAX_SPOTS, readout=readout,
                    radial_scales=HEPEMSHOW_RADIAL_SCALES, incident_track=True,
                    defaults=SimulationDefaults("electron", "log-uniform", (1e3, 1e5)))


# The detector behind each built-in geometry (the names, binnings, particles and evaluation
# thresholds are the geometry registry's, :func:`caloforge.geometry.get_geometry`).
_DETECTORS: dict[str, Callable[[Geometry], Detector]] = {
    "calochallenge-1-photons": lambda geometry: _atlas(geometry, (4,)),
    "calochallenge-1-pions": lambda geometry: _atlas(geometry, (4, 5, 6)),
    "calochallenge-2": _calochallenge_2_3,
    "calochallenge-3": _calochallenge_2_3,
    "calogan": _calogan,
    "ild-ecal": _ild,
    "lhcb-ecal": _lhcb,
    "hepemshow-pbwo4-lar": _hepemshow,
}


def get_detector(geometry_name: str) -> Detector:
    """The reference detector description of the built-in geometry ``geometry_name``."""
    geometry = get_geometry(geometry_name)  # an unknown name: the one list of geometries
    return _DETECTORS[geometry.name](geometry)


def lhcb_conditions(n: int, rng: np.random.Generator) -> tuple[dict[str, np.ndarray],
                                                              dict[str, str]]:
    """Entry point uniform in the central 1 x 1 cm, angles Gaussian (20 deg xz, 10 deg yz).

    Returns ``entry_point`` ``(n, 2)`` in mm and ``direction`` ``(n, 2)``: the track angles
    in the xz and yz planes in rad, cut at 3 sigma.
    """
    entry = rng.uniform(-5.0, 5.0, (n, 2))
    widths = np.radians([20.0, 10.0])
    angles = rng.normal(0.0, 1.0, (n, 2))
    angles = np.clip(angles, -3.0, 3.0) * widths
    return {"entry_point": entry, "direction": angles}, {"entry_point": "mm", "direction": "rad"}


CONDITION_GENERATORS = {"lhcb": lhcb_conditions}

__all__ = ["Detector", "Slab", "SamplingStructure", "Material", "SimulationDefaults",
           "get_detector", "CONDITION_GENERATORS"]
