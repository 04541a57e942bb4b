"""The method registry: name -> class (every method written once, run by either engine)."""

from __future__ import annotations

from fedssl.config import METHOD_NAMES
from fedssl.methods.base import Method, MethodContext
from fedssl.methods.centralized import Centralized
from fedssl.methods.fedavg import FedBYOL, FedMoCo, FedMoCoV3, FedSimCLR
from fedssl.methods.fedmae import FedMAE
from fedssl.methods.layerwise import LWFedSSL, ProgFedSSL
from fedssl.methods.mocosfl import MocoSFL

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (FedMoCo, FedMoCoV3, FedSimCLR, FedBYOL, Centralized, MocoSFL, LWFedSSL, ProgFedSSL,
                            FedMAE)
}
assert set(METHODS) == set(METHOD_NAMES), "config.METHOD_NAMES and the registry must agree"


def build_method(ctx: MethodContext) -> Method:
    return METHODS[ctx.cfg.method](ctx)
