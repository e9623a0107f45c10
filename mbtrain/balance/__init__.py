"""Loss balancers: how per-task losses become gradients, kept apart from the model architectures.

Importing this package registers every balancer (balance/registry.py), in the order --help lists them.
"""

# the order of registration, which --help and the docs' table follow:
# isort: off
from mbtrain.balance.plain import PlainSum
from mbtrain.balance.metabalance import MetaBalance
from mbtrain.balance.multibalance import MultiBalance
from mbtrain.balance.pcgrad import PCGrad
from mbtrain.balance.gradnorm import GradNorm
from mbtrain.balance.uncertainty import Uncertainty
from mbtrain.balance.dwa import DWA
from mbtrain.balance.famo import FAMO
from mbtrain.balance.mgda import MGDA
from mbtrain.balance.cagrad import CAGrad
from mbtrain.balance.nash_mtl import NashMTL
from mbtrain.balance.imtl import IMTLG
from mbtrain.balance.imtl_l import IMTLL
from mbtrain.balance.aligned_mtl import AlignedMTL
from mbtrain.balance.rlw import RLW
from mbtrain.balance.db_mtl import DBMTL
from mbtrain.balance.gradvac import GradVac

# isort: on
from mbtrain.balance.base import Balancer
from mbtrain.balance.registry import BALANCERS, Setup, build_balancer, register

__all__ = ["BALANCERS", "DBMTL", "DWA", "FAMO", "IMTLG", "IMTLL", "MGDA", "RLW", "AlignedMTL", "Balancer", "CAGrad",
           "GradNorm", "GradVac", "MetaBalance", "MultiBalance", "NashMTL", "PCGrad", "PlainSum", "Setup",
           "Uncertainty", "build_balancer", "register"]
