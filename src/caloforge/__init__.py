"""caloforge: fast calorimeter shower simulation with generative models.

The importable API mirrors the command line:

>>> import caloforge as cf
>>> geometry = cf.get_geometry("calochallenge-1-photons")
>>> data = cf.read_showers("showers.h5", geometry)          # doctest: +SKIP
>>> data.showers.shape                                        # doctest: +SKIP
(121000, 368)
"""

from ._version import __version__
from .data import ShowerData, ShowerFile, ShowerStream, ShowerWriter, read_showers, write_showers  # noqa: E402
from .errors import CaloforgeError, GeometryError, OptionError, ShowerFileError  # noqa: E402
from .geometry import (  # noqa: E402
    CartesianLayer,
    CylindricalLayer,
    Geometry,
    available_geometries,
    get_geometry,
    parse_binning_xml,
    resolve_geometry,
)

__all__ = [
    "__version__",
    "CaloforgeError", "GeometryError", "OptionError", "ShowerFileError",
    "CartesianLayer", "CylindricalLayer", "Geometry", "available_geometries", "get_geometry",
    "parse_binning_xml", "resolve_geometry",
    "ShowerData", "ShowerFile", "ShowerStream", "ShowerWriter", "read_showers", "write_showers",
]
