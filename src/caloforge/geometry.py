"""Calorimeter readout geometries.

A :class:`Geometry` says how a shower's energy deposits are binned into voxels: an ordered
list of readout layers, each either

* **cylindrical** (:class:`CylindricalLayer`): radial bin edges in mm around the shower axis
  times ``n_alpha`` equal angular bins covering (-pi, pi], flattened (angular bin, radial
  bin) with the radial index fastest, as in the CaloChallenge 2022 datasets; or
* **Cartesian** (:class:`CartesianLayer`): an ``ny x nx`` grid of cells of ``dy x dx`` mm
  centred on the nominal shower axis, flattened (row y, column x) with x fastest.

A shower is a flat ``(n_voxels,)`` vector: layer after layer, each flattened as above. The
geometry provides the per-layer slices of that vector, voxel centre coordinates, and the
inverse map from positions to voxel indices used by the reference simulator.

Built-in geometries are listed by :func:`available_geometries` and returned by
:func:`get_geometry`; CaloChallenge binning XML files are read by :func:`parse_binning_xml`.
"""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import numpy as np

from .errors import GeometryError


@dataclass(frozen=True)
class CylindricalLayer:
    """A layer binned in radius and angle around the shower axis.

    Attributes:
        layer_id: the layer's identifier in the source description (CaloChallenge XML
            ``Layer id``; for dataset 1 these are ATLAS sampling numbers, not contiguous).
        r_edges: radial bin edges in mm, strictly increasing, starting at 0.
        n_alpha: number of equal angular bins over (-pi, pi].
    """

    layer_id: int
    r_edges: tuple[float, ...]
    n_alpha: int

    kind = "cylindrical"

    def __post_init__(self) -> None:
        edges = np.asarray(self.r_edges, dtype=float)
        if edges.ndim != 1 or len(edges) < 2 or np.any(np.diff(edges) <= 0) or edges[0] < 0:
            raise GeometryError(
                f"layer {self.layer_id}: radial edges must be >= 2 increasing values >= 0, "
                f"got {self.r_edges}"
            )
        if self.n_alpha < 1:
            raise GeometryError(f"layer {self.layer_id}: n_alpha must be >= 1, got {self.n_alpha}")

    @property
    def n_radial(self) -> int:
        return len(self.r_edges) - 1

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of the layer image: ``(n_alpha, n_radial)``."""
        return (self.n_alpha, self.n_radial)

    @property
    def n_voxels(self) -> int:
        return self.n_alpha * self.n_radial

    def alpha_edges(self) -> np.ndarray:
        """Angular bin edges in rad, ``(n_alpha + 1,)`` from -pi to pi."""
        return np.linspace(-math.pi, math.pi, self.n_alpha + 1)

    def voxel_centres(self) -> np.ndarray:
        """Voxel centres ``(n_voxels, 2)`` as (x, y) in mm, CaloChallenge convention.

        The radial centre is the midpoint of the bin edges and the angular centre the
        midpoint of the angular bin, x = r cos(alpha), y = r sin(alpha).
        """
        edges = np.asarray(self.r_edges)
        r_mid = 0.5 * (edges[1:] + edges[:-1])
        a_edges = self.alpha_edges()
        a_mid = 0.5 * (a_edges[1:] + a_edges[:-1])
        alpha, r = np.meshgrid(a_mid, r_mid, indexing="ij")  # (n_alpha, n_radial)
        return np.stack([(r * np.cos(alpha)).ravel(), (r * np.sin(alpha)).ravel()], axis=1)

    def voxel_radii(self) -> np.ndarray:
        """Radial bin centre of each voxel in mm, ``(n_voxels,)``."""
        edges = np.asarray(self.r_edges)
        r_mid = 0.5 * (edges[1:] + edges[:-1])
        return np.tile(r_mid, self.n_alpha)

    def bin_points(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Voxel index within the layer of points (x, y) in mm, or -1 outside the binning.

        ``x`` and ``y`` are broadcast arrays in the layer plane relative to the shower axis.
        """
        r = np.hypot(x, y)
        radial = np.searchsorted(np.asarray(self.r_edges), r, side="right") - 1
        alpha = np.arctan2(y, x)
        angular = np.floor((alpha + math.pi) * (self.n_alpha / (2 * math.pi))).astype(np.int64)
        angular = np.clip(angular, 0, self.n_alpha - 1)
        inside = (radial >= 0) & (radial < self.n_radial)
        return np.where(inside, angular * self.n_radial + radial, -1)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "layer_id": self.layer_id,
                "r_edges": list(self.r_edges), "n_alpha": self.n_alpha}


@dataclass(frozen=True)
class CartesianLayer:
    """A layer binned in a regular ``ny x nx`` grid centred on the nominal shower axis.

    Attributes:
        layer_id: the layer's identifier.
        nx, ny: number of cells along x (columns) and y (rows).
        dx, dy: cell sizes in mm.
    """

    layer_id: int
    nx: int
    ny: int
    dx: float
    dy: float

    kind = "cartesian"

    def __post_init__(self) -> None:
        if self.nx < 1 or self.ny < 1 or self.dx <= 0 or self.dy <= 0:
            raise GeometryError(
                f"layer {self.layer_id}: need nx, ny >= 1 and dx, dy > 0, got "
                f"nx={self.nx} ny={self.ny} dx={self.dx} dy={self.dy}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of the layer image: ``(ny, nx)``."""
        return (self.ny, self.nx)

    @property
    def n_voxels(self) -> int:
        return self.nx * self.ny

    def x_edges(self) -> np.ndarray:
        return (np.arange(self.nx + 1) - self.nx / 2) * self.dx

    def y_edges(self) -> np.ndarray:
        return (np.arange(self.ny + 1) - self.ny / 2) * self.dy

    def voxel_centres(self) -> np.ndarray:
        """Cell centres ``(n_voxels, 2)`` as (x, y) in mm, rows (y) slow, columns (x) fast."""
        xe, ye = self.x_edges(), self.y_edges()
        yy, xx = np.meshgrid(0.5 * (ye[1:] + ye[:-1]), 0.5 * (xe[1:] + xe[:-1]), indexing="ij")
        return np.stack([xx.ravel(), yy.ravel()], axis=1)

    def voxel_radii(self) -> np.ndarray:
        """Distance of each cell centre from the axis in mm, ``(n_voxels,)``."""
        centres = self.voxel_centres()
        return np.hypot(centres[:, 0], centres[:, 1])

    def bin_points(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Cell index within the layer of points (x, y) in mm, or -1 outside the grid."""
        column = np.floor(x / self.dx + self.nx / 2).astype(np.int64)
        row = np.floor(y / self.dy + self.ny / 2).astype(np.int64)
        inside = (column >= 0) & (column < self.nx) & (row >= 0) & (row < self.ny)
        return np.where(inside, row * self.nx + column, -1)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "layer_id": self.layer_id,
                "nx": self.nx, "ny": self.ny, "dx": self.dx, "dy": self.dy}


Layer = CylindricalLayer | CartesianLayer


def layer_from_dict(data: dict[str, Any]) -> Layer:
    """Inverse of ``Layer.to_dict``."""
    kind = data.get("kind")
    if kind == "cylindrical":
        return CylindricalLayer(int(data["layer_id"]), tuple(float(e) for e in data["r_edges"]),
                                int(data["n_alpha"]))
    if kind == "cartesian":
        return CartesianLayer(int(data["layer_id"]), int(data["nx"]), int(data["ny"]),
                              float(data["dx"]), float(data["dy"]))
    raise GeometryError(f"unknown layer kind {kind!r}")


@dataclass(frozen=True)
class Geometry:
    """The readout of one calorimeter: its layers in order and how voxels are flattened.

    Attributes:
        name: registry name (``calochallenge-2``) or a free label for parsed files.
        layers: readout layers in depth order; layers without voxels are not listed.
        particle: the particle the binning was made for, if the source says so.
        description: one line for listings.
        threshold_mev: the evaluation threshold in MeV that the field applies to data of
            this geometry (1 MeV for CaloChallenge dataset 1, 15.15 keV for 2 and 3, half a
            MIP = 75 keV for the ILD ECAL); 0: none. Where it is also the readout threshold
            (datasets 2 and 3, ILD) the reference detector reads it from here.

    Only the binning counts in comparisons: two geometries with equal layers compare equal
    whatever their names.
    """

    name: str = field(compare=False)
    layers: tuple[Layer, ...]
    particle: str | None = field(default=None, compare=False)
    description: str = field(default="", compare=False)
    threshold_mev: float = field(default=0.0, compare=False)

    def __post_init__(self) -> None:
        if not self.layers:
            raise GeometryError(f"geometry {self.name!r} has no layers with voxels")

    # --- sizes and slices -------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @cached_property
    def layer_sizes(self) -> tuple[int, ...]:
        return tuple(layer.n_voxels for layer in self.layers)

    @property
    def n_voxels(self) -> int:
        return sum(self.layer_sizes)

    @cached_property
    def layer_offsets(self) -> np.ndarray:
        """Start index of each layer in the flat vector, ``(n_layers + 1,)`` ending in n_voxels."""
        return np.concatenate([[0], np.cumsum(self.layer_sizes)]).astype(np.int64)

    @property
    def layer_slices(self) -> list[slice]:
        """Slice of each layer in the flat voxel vector."""
        offsets = self.layer_offsets
        return [slice(int(offsets[i]), int(offsets[i + 1])) for i in range(self.n_layers)]

    @property
    def is_cylindrical(self) -> bool:
        return all(isinstance(layer, CylindricalLayer) for layer in self.layers)

    @property
    def uniform_layer_image(self) -> tuple[str, tuple[int, int]] | None:
        """(kind, image shape) shared by every layer (``"cartesian"``, ``(ny, nx)`` or
        ``"cylindrical"``, ``(n_alpha, n_radial)``), or None when the layers differ: what
        the image-based families (convflow, wgan) need."""
        images = {(layer.kind, layer.shape) for layer in self.layers}
        return next(iter(images)) if len(images) == 1 else None

    # --- coordinates --------------------------------------------------------------------
    @cached_property
    def voxel_centres(self) -> np.ndarray:
        """(x, y) centre of every voxel in mm, ``(n_voxels, 2)``."""
        return np.concatenate([layer.voxel_centres() for layer in self.layers], axis=0)

    @cached_property
    def voxel_radii(self) -> np.ndarray:
        """Radial centre of every voxel in mm, ``(n_voxels,)``."""
        return np.concatenate([layer.voxel_radii() for layer in self.layers])

    # --- operations on showers ----------------------------------------------------------
    def check_voxels(self, n_voxels: int) -> None:
        if n_voxels != self.n_voxels:
            raise GeometryError(
                f"showers have {n_voxels} voxels but geometry {self.name!r} has {self.n_voxels}"
            )

    def layer_energies(self, showers: np.ndarray, dtype: Any = None) -> np.ndarray:
        """Energy per layer, ``(N, n_layers)``, from flat showers ``(N, n_voxels)`` (MeV),
        summed in ``dtype`` (default: the showers' dtype) without copying the showers."""
        self.check_voxels(showers.shape[-1])
        return np.add.reduceat(showers, self.layer_offsets[:-1], axis=-1, dtype=dtype)

    def split_layers(self, showers: np.ndarray) -> list[np.ndarray]:
        """Views of each layer as images ``(N, *layer.shape)`` of flat showers ``(N, n_voxels)``."""
        self.check_voxels(showers.shape[-1])
        lead = showers.shape[:-1]
        return [showers[..., s].reshape(*lead, *layer.shape)
                for s, layer in zip(self.layer_slices, self.layers)]

    # --- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable description, saved with models and run directories."""
        return {"name": self.name, "particle": self.particle, "description": self.description,
                "threshold_mev": self.threshold_mev,
                "layers": [layer.to_dict() for layer in self.layers]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Geometry:
        return cls(name=str(data["name"]), layers=tuple(layer_from_dict(d) for d in data["layers"]),
                   particle=data.get("particle"), description=data.get("description", ""),
                   threshold_mev=float(data.get("threshold_mev", 0.0)))

    def to_xml(self, pid: int = 0) -> str:
        """CaloChallenge binning XML text for a cylindrical geometry (for the official tools)."""
        if not self.is_cylindrical:
            raise GeometryError(f"geometry {self.name!r} is not cylindrical: no CaloChallenge XML")
        lines = ["<Bins>", f'   <Bin pid="{pid}" name="{self.particle or self.name}">']
        for layer in self.layers:
            assert isinstance(layer, CylindricalLayer)
            edges = ",".join(f"{e:g}" for e in layer.r_edges)
            lines.append(f'      <Layer id="{layer.layer_id}" r_edges="{edges}" '
                         f'n_bin_alpha="{layer.n_alpha}" />')
        lines += ["   </Bin>", "</Bins>", ""]
        return "\n".join(lines)


# --- CaloChallenge binning XML ------------------------------------------------------------
def parse_binning_xml(path: str | os.PathLike[str], particle: str | None = None,
                      name: str | None = None) -> Geometry:
    """Read a CaloChallenge binning XML file into a :class:`Geometry`.

    Layers with ``r_edges="0"`` carry no voxels and are dropped, as the official tools do.
    If the file has several ``<Bin>`` entries, ``particle`` selects one by its ``name``.
    """
    path = os.fspath(path)
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        raise GeometryError(f"{path}: no such file") from None
    except (ET.ParseError, OSError) as exc:
        raise GeometryError(f"{path}: not a readable XML file ({exc})") from None
    bins = root.findall("Bin") if root.tag == "Bins" else []
    if not bins:
        raise GeometryError(f"{path}: no <Bins><Bin> element: not a CaloChallenge binning file")
    if particle is not None:
        bins = [b for b in bins if b.get("name") == particle]
        if not bins:
            raise GeometryError(f"{path}: no <Bin> with name {particle!r}")
    if len(bins) > 1:
        names = [b.get("name") for b in bins]
        raise GeometryError(f"{path}: several <Bin> entries {names}; choose one by particle")
    bin_ = bins[0]
    layers: list[Layer] = []
    for element in bin_.findall("Layer"):
        try:
            layer_id = int(element.attrib["id"])
            edges = tuple(float(v) for v in element.attrib["r_edges"].split(","))
            n_alpha = int(element.attrib.get("n_bin_alpha", "1"))
        except (KeyError, ValueError) as exc:
            raise GeometryError(f"{path}: malformed <Layer> element ({exc})") from None
        if len(edges) < 2:
            continue  # r_edges="0": a layer with no voxels
        try:
            layers.append(CylindricalLayer(layer_id, edges, n_alpha))
        except GeometryError as exc:
            raise GeometryError(f"{path}: {exc}") from None
    label = name or os.path.splitext(os.path.basename(path))[0]
    try:
        parsed = Geometry(label, tuple(layers), particle=bin_.get("name"),
                          description=f"parsed from {os.path.basename(path)}")
    except GeometryError as exc:
        raise GeometryError(f"{path}: {exc}") from None
    # The XML carries no threshold; the binning of a built-in geometry keeps its threshold
    # so that `evaluate --xml` applies the same cut as `--geometry NAME`.
    for builtin_name in _BUILTIN:
        builtin = get_geometry(builtin_name)
        if builtin == parsed:
            return replace(parsed, threshold_mev=builtin.threshold_mev)
    return parsed


# --- built-in geometries ----------------------------------------------------------------
def _uniform_edges(step_mm: float, n_bins: int) -> tuple[float, ...]:
    # Rounded to 4 decimals so the values equal the decimal strings of the official XML.
    return tuple(round(step_mm * k, 4) for k in range(n_bins + 1))


def _calochallenge_1_photons() -> Geometry:
    layers = (
        CylindricalLayer(0, (0, 5, 10, 30, 50, 100, 200, 400, 600), 1),
        CylindricalLayer(1, (0, 2, 4, 6, 8, 10, 12, 15, 20, 30, 40, 50, 70, 90, 120, 150, 200),
                         10),
        CylindricalLayer(2, (0, 2, 5, 10, 15, 20, 25, 30, 40, 50, 60, 80, 100, 130, 160, 200,
                             250, 300, 350, 400), 10),
        CylindricalLayer(3, (0, 50, 100, 200, 400, 600), 1),
        CylindricalLayer(12, (0, 100, 200, 400, 1000, 2000), 1),
    )
    return Geometry("calochallenge-1-photons", _floats(layers), particle="photon",
                    description="CaloChallenge 2022 dataset 1 photons (ATLAS, 5 layers)",
                    threshold_mev=1.0)


def _calochallenge_1_pions() -> Geometry:
    hadronic_edges = (0, 10, 20, 30, 50, 80, 100, 130, 160, 200, 250, 300, 350, 400)
    layers = (
        CylindricalLayer(0, (0, 5, 10, 30, 50, 100, 200, 400, 600), 1),
        CylindricalLayer(1, (0, 1, 4, 7, 10, 15, 30, 50, 90, 150, 200), 10),
        CylindricalLayer(2, (0, 5, 10, 20, 30, 50, 80, 130, 200, 300, 400), 10),
        CylindricalLayer(3, (0, 50, 100, 200, 400, 600), 1),
        CylindricalLayer(12, hadronic_edges + (1000, 2000), 10),
        CylindricalLayer(13, hadronic_edges + (600, 1000, 2000), 10),
        CylindricalLayer(14, (0, 50, 100, 150, 200, 250, 300, 400, 600, 1000, 2000), 1),
    )
    return Geometry("calochallenge-1-pions", _floats(layers), particle="pion",
                    description="CaloChallenge 2022 dataset 1 pions (ATLAS, 7 layers)",
                    threshold_mev=1.0)


def _calochallenge_2() -> Geometry:
    edges = _uniform_edges(4.65, 9)
    layers = tuple(CylindricalLayer(i, edges, 16) for i in range(45))
    return Geometry("calochallenge-2", layers, particle="electron",
                    description="CaloChallenge 2022 dataset 2 (Si-W, 45 x 16 x 9)",
                    threshold_mev=0.01515)


def _calochallenge_3() -> Geometry:
    edges = _uniform_edges(2.325, 18)
    layers = tuple(CylindricalLayer(i, edges, 50) for i in range(45))
    return Geometry("calochallenge-3", layers, particle="electron",
                    description="CaloChallenge 2022 dataset 3 (Si-W, 45 x 50 x 18)",
                    threshold_mev=0.01515)


def _calogan() -> Geometry:
    layers = (
        CartesianLayer(0, nx=96, ny=3, dx=5.0, dy=160.0),
        CartesianLayer(1, nx=12, ny=12, dx=40.0, dy=40.0),
        CartesianLayer(2, nx=6, ny=12, dx=80.0, dy=40.0),
    )
    return Geometry("calogan", layers, particle=None,
                    description="CaloGAN Pb/LAr calorimeter (3x96 + 12x12 + 12x6)")


def _ild_ecal() -> Geometry:
    layers = tuple(CartesianLayer(i, nx=30, ny=30, dx=5.0, dy=5.0) for i in range(30))
    # Published cells are visible silicon energies; the threshold is half a MIP (0.15 MeV).
    return Geometry("ild-ecal", layers, particle="photon",
                    description="ILD ECAL Si-W, 30 layers of 30x30 cells of 5 mm",
                    threshold_mev=0.075)


def _lhcb_ecal() -> Geometry:
    layers = (CartesianLayer(0, nx=30, ny=30, dx=20.0, dy=20.0),)
    return Geometry("lhcb-ecal", layers, particle="electron",
                    description="LHCb-like shashlik ECAL, one readout layer of 30x30 cells of 2 cm")


HEPEMSHOW_RADIAL_EDGES_MM = (0.0, 2.5, 5.0, 10.0, 15.0, 22.5, 30.0, 45.0, 67.5, 100.0, 150.0)


def _hepemshow_pbwo4_lar() -> Geometry:
    layers = tuple(CylindricalLayer(i, HEPEMSHOW_RADIAL_EDGES_MM, 16) for i in range(50))
    # Voxels hold visible argon energy with no threshold (down to 1e-8 MeV); 10 keV, about a
    # hundredth of a MIP, is the evaluation cut (it removes ~1 % of hits, 1e-5 of the energy).
    return Geometry("hepemshow-pbwo4-lar", layers, particle="electron",
                    description="HepEmShow on G4HepEm: 50 x (2.3 mm PbWO4 + 5.7 mm LAr), "
                                "50 x 16 x 10", threshold_mev=0.01)


def _floats(layers: tuple[CylindricalLayer, ...]) -> tuple[CylindricalLayer, ...]:
    return tuple(CylindricalLayer(layer.layer_id, tuple(float(e) for e in layer.r_edges),
                                  layer.n_alpha) for layer in layers)


_BUILTIN: dict[str, Callable[[], Geometry]] = {
    "calochallenge-1-photons": _calochallenge_1_photons,
    "calochallenge-1-pions": _calochallenge_1_pions,
    "calochallenge-2": _calochallenge_2,
    "calochallenge-3": _calochallenge_3,
    "calogan": _calogan,
    "ild-ecal": _ild_ecal,
    "lhcb-ecal": _lhcb_ecal,
    "hepemshow-pbwo4-lar": _hepemshow_pbwo4_lar,
}
_CACHE: dict[str, Geometry] = {}


# The CaloChallenge 2022 datasets by their official tag (evaluate.py's ``--dataset``).
CALOCHALLENGE_DATASETS: dict[str, str] = {
    "1-photons": "calochallenge-1-photons",
    "1-pions": "calochallenge-1-pions",
    "2": "calochallenge-2",
    "3": "calochallenge-3",
}


def calochallenge_dataset(geometry: Geometry) -> str | None:
    """The official dataset tag (``"1-photons"``, ``"1-pions"``, ``"2"``, ``"3"``) whose
    binning ``geometry`` has, whatever its name (built-in or parsed from an XML), else None."""
    for tag, name in CALOCHALLENGE_DATASETS.items():
        if geometry == get_geometry(name):
            return tag
    return None


def available_geometries() -> list[str]:
    """Names of the built-in geometries."""
    return list(_BUILTIN)


def get_geometry(name: str) -> Geometry:
    """The built-in geometry called ``name``."""
    if name not in _BUILTIN:
        raise GeometryError(
            f"unknown geometry {name!r}; built-in geometries: {', '.join(_BUILTIN)}"
        )
    if name not in _CACHE:
        _CACHE[name] = _BUILTIN[name]()
    return _CACHE[name]


def resolve_geometry(name: str | None = None, xml: str | os.PathLike[str] | None = None,
                     particle: str | None = None) -> Geometry:
    """A geometry from a built-in name or a binning XML file (exactly one of them)."""
    if (name is None) == (xml is None):
        raise GeometryError("give exactly one of a geometry name or a binning XML file")
    if xml is not None:
        return parse_binning_xml(xml, particle=particle)
    assert name is not None
    return get_geometry(name)
