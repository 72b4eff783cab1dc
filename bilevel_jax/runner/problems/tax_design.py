"""`problem.name: tax_design` and `tax_design_tabular`: CB-RL's tax-design economy (SPEC 7.2,
`bilevel_jax.envs.tax_design`).

`tax_design` is the continuous household economy as a simulator problem (model-free
estimators: `hpgd` with a learning follower such as `soft_dqn`, `zero_order`; the model-free
`pbrl`); `tax_design_tabular` its exact tabular twin on `num_asset_bins` asset bins (every
estimator, `exact` included), which also gets the simulator twin `simulator_tax_design_tabular`
(the model-free methods against the twin's exact hypergradient). The leader's `w` `[4]` is the
income tax and the 3 VAT rates as `2 sigmoid(w)`, starting at 0.3. With
`algorithm.track_objective: true`, `tax_design` reports the exact welfare `F(w)` of its
`reference_bins`-bin twin (an approximation of the continuous economy's: `tax_design_tabular`'s
docstring says how close).
"""

from __future__ import annotations

from bilevel_jax.runner.fields import Field
from bilevel_jax.runner.problems.registry import register_problem

_COMMON = {
    "discount": Field("float", 0.9, low=0, high=1, high_open=True, doc="household discount"),
    "leader_discount": Field("float", 0.9, low=0, high=1, high_open=True, traced=True,
                             doc="government (welfare) discount"),
    "temperature": Field("float", 0.1, low=0, low_open=True, traced=True,
                         doc="household entropy temperature lam (the reference: 0.1, 0.2, 0.3)"),
    "dtype": Field("str", "float32", choices=("float32", "float64"),
                   doc="float64 turns on jax_enable_x64 for the run"),
}

TABULAR_FIELDS = {
    "num_asset_bins": Field("int", 41, low=2,
                            doc="asset bins of the twin over [-100, 100] (odd: one centred on 0)"),
    **_COMMON,
}


def tax_rate_metrics(w) -> dict:
    """The income tax and the VAT rate of each good, `2 sigmoid(w)`, as per-iteration metrics."""
    from bilevel_jax.envs.tax_design import tax_rates  # noqa: PLC0415 - gymnax

    tau, vat = tax_rates(w)
    return {"income_tax": tau, **{f"vat_{g + 1}": vat[g] for g in range(vat.shape[0])}}


def _dtype(section: dict):
    import jax.numpy as jnp

    return jnp.float64 if section["dtype"] == "float64" else jnp.float32


def build_tax_design(section: dict):
    from bilevel_jax.envs.tax_design import tax_design_problem  # noqa: PLC0415 - gymnax

    return tax_design_problem(temperature=section["temperature"], discount=section["discount"],
                              leader_discount=section["leader_discount"],
                              reference_bins=section["reference_bins"], dtype=_dtype(section))


def build_tax_design_tabular(section: dict):
    from bilevel_jax.envs.tax_design import tax_design_tabular  # noqa: PLC0415 - gymnax

    return tax_design_tabular(section["num_asset_bins"], temperature=section["temperature"],
                              discount=section["discount"],
                              leader_discount=section["leader_discount"], dtype=_dtype(section))


SIMULATOR_FIELDS = {
    "reference_bins": Field("int", 41, low=2, nullable=True,
                            doc="asset bins of the tabular twin that reports the exact F "
                                "(algorithm.track_objective; null: none)"),
    **_COMMON,
}

register_problem("tax_design", build_tax_design, fields=SIMULATOR_FIELDS, simulator=True,
                 has_reference=lambda section: section["reference_bins"] is not None,
                 leader_metrics=tax_rate_metrics,
                 doc="CB-RL tax design: the household economy as a simulator (SPEC 7.2; "
                     "model-free estimators: hpgd, zero_order; model-free pbrl)")
register_problem("tax_design_tabular", build_tax_design_tabular, fields=TABULAR_FIELDS,
                 leader_metrics=tax_rate_metrics,
                 doc="the exact tabular twin of tax_design (assets on bins; every estimator)")
