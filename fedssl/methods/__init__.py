"""The method registry: name -> class (every method written once, run by either engine), and the one list of
method names: config validation asks it (``fedssl.config.method_rules``) for the names and each method's rules."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedssl.config import RunConfig, check, register_method_rules
from fedssl.methods.base import Method, MethodContext
from fedssl.methods.centralized import Centralized
from fedssl.methods.fedavg import FedAvgSSL, FedBYOL, FedMoCo, FedMoCoV3, FedSimCLR
from fedssl.methods.fedmae import FedMAE
from fedssl.methods.layerwise import LWFedSSL, ProgFedSSL
from fedssl.methods.mocosfl import MocoSFL

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (FedMoCo, FedMoCoV3, FedSimCLR, FedBYOL, Centralized, MocoSFL, LWFedSSL, ProgFedSSL,
                            FedMAE)
}
METHOD_NAMES = tuple(METHODS)


def build_method(ctx: MethodContext) -> Method:
    return METHODS[ctx.cfg.method](ctx)


class Registry:
    """The methods' rules as config validation asks for them (``fedssl.config.MethodRules``)."""

    names = METHOD_NAMES

    def default_model(self, method: str) -> Mapping[str, Any]:
        return METHODS[method].default_model

    def validate(self, cfg: RunConfig) -> None:
        method = METHODS[cfg.method]
        if not method.calibrates:
            calibrating = ", ".join(name for name, cls in METHODS.items() if cls.calibrates)
            check(cfg.calibration.aux_fraction == 0, "calibration.aux_fraction",
                  f"only {calibrating} calibrate on the server; set it to 0")
            check(cfg.alignment.weight == 0, "alignment.weight", f"only {calibrating} align; set it to 0")
        if cfg.flower.secagg and not issubclass(method, FedAvgSSL):
            how = "pools all data in one place" if method.pooled_data else "exchanges activations every step"
            check(False, "flower.secagg", f"SecAgg+ sums one upload per client and round but {cfg.method} {how}; "
                  "set it to false")
        method.validate(cfg)


register_method_rules(Registry())
