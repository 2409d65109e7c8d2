"""The tiny convflow cases the convflow test files share: geometries, a tiny
configuration, a training sample and a model trained on it (each test file makes them its
module-scoped fixtures)."""

from __future__ import annotations

from caloforge.geometry import CartesianLayer, CylindricalLayer, Geometry
from caloforge.models.flows.convflow import ConvL2LFlow

from conftest import random_showers, tiny_config

# four Cartesian layers of 4 x 4 cells; three cylindrical layers of 4 radial x 6 angular bins
CARTESIAN = Geometry("tiny-4x4x4", tuple(CartesianLayer(i, nx=4, ny=4, dx=10.0, dy=10.0)
                                         for i in range(4)), threshold_mev=0.01)
CYLINDER = Geometry("tiny-cyl", tuple(CylindricalLayer(i, r_edges=(0.0, 5.0, 10.0, 20.0, 40.0),
                                                       n_alpha=6) for i in range(3)),
                    threshold_mev=0.01)
# three Cartesian layers of 8 x 8 cells (a core, a halo and an outer ring of 2 x 2 blocks)
SIDE = 8
CORES = Geometry("cores-8x8", tuple(CartesianLayer(i, nx=SIDE, ny=SIDE, dx=5.0, dy=5.0)
                                    for i in range(3)), threshold_mev=0.5)


def tiny(epochs: int = 1, **options):
    return tiny_config(ConvL2LFlow, epochs, **options)


def training_showers():
    """240 random showers on :data:`CARTESIAN`."""
    return random_showers(CARTESIAN, 240, seed=2)


def trained_model(showers, run_dir: str) -> tuple[ConvL2LFlow, str]:
    """A tiny model trained 2 epochs on ``showers`` into ``run_dir``."""
    model = ConvL2LFlow(CARTESIAN, tiny(2))
    model.fit(showers, run_dir)
    return model, run_dir
