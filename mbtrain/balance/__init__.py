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

# isort: on
from mbtrain.balance.base import Balancer
from mbtrain.balance.registry import BALANCERS, Setup, build_balancer, register

__all__ = ["BALANCERS", "DWA", "FAMO", "Balancer", "GradNorm", "MetaBalance", "MultiBalance", "PCGrad",
           "PlainSum", "Setup", "Uncertainty", "build_balancer", "register"]
