"""The sampler registry: every sampler under its A1111 label and ComfyUI name.

A sampler is a pure function (see :mod:`emaki.sampling.samplers`); this module only names them,
records the A1111 default schedule of each and which options each accepts, and resolves the names
users type, including A1111's older combined labels such as ``"DPM++ 2M Karras"``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from emaki.errors import InvalidRequestError
from emaki.sampling import dpm_solvers as dpm
from emaki.sampling import samplers as k
from emaki.sampling.schedules import SCHEDULES, get_schedule

SamplerFn = Callable[..., Tensor]

_CHURN = frozenset({"s_churn", "s_tmin", "s_tmax", "s_noise"})
_ANCESTRAL = frozenset({"eta", "s_noise"})


@dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler.

    ``order`` is the convergence order of the deterministic sampler on the probability-flow ODE
    (None for samplers that are only stochastic); the analytic conformance tests check it.
    """

    label: str  #: A1111 name, written to infotext ("DPM++ 2M")
    name: str  #: ComfyUI name ("dpmpp_2m")
    fn: SamplerFn
    default_schedule: str  #: A1111 1.10's default schedule for this sampler
    stochastic: bool
    order: int | None
    options: frozenset[str] = field(default_factory=frozenset)
    aliases: tuple[str, ...] = ()
    #: Draws noise over overlapping intervals, so it needs one Brownian path per image
    #: (:class:`~emaki.sampling.brownian.BrownianNoise`) rather than fresh draws per step.
    brownian: bool = False

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        unknown = set(kwargs) - self.options - {"cond", "noise", "callback"}
        if unknown:
            accepted = ", ".join(sorted(self.options)) or "none"
            raise InvalidRequestError(
                f"sampler {self.label!r} does not take option(s) {', '.join(sorted(unknown))}; "
                f"accepted: {accepted}"
            )
        return self.fn(*args, **kwargs)


SAMPLERS: tuple[SamplerSpec, ...] = (
    SamplerSpec("Euler", "euler", k.sample_euler, "uniform", False, 1, _CHURN),
    SamplerSpec("Euler a", "euler_ancestral", k.sample_euler_ancestral, "uniform", True, None,
                _ANCESTRAL, ("k_euler_ancestral",)),
    SamplerSpec("Heun", "heun", k.sample_heun, "uniform", False, 2, _CHURN),
    SamplerSpec("DPM2", "dpm_2", k.sample_dpm_2, "karras", False, 2, _CHURN),
    SamplerSpec("DPM2 a", "dpm_2_ancestral", k.sample_dpm_2_ancestral, "karras", True, None,
                _ANCESTRAL),
    # 4th-order Adams-Bashforth, but its first steps (Euler, AB2, AB3) cost a little: measured
    # 3.4-3.5 over 16-128 Karras steps (2 asymptotically, from the Euler start).
    SamplerSpec("LMS", "lms", k.sample_lms, "uniform", False, 3, frozenset({"order"})),
    SamplerSpec("DPM++ 2M", "dpmpp_2m", dpm.sample_dpmpp_2m, "karras", False, 2),
    SamplerSpec("DPM++ 2M SDE", "dpmpp_2m_sde", dpm.sample_dpmpp_2m_sde, "exponential", True,
                None, frozenset({"eta", "s_noise", "solver_type"}), brownian=True),
    SamplerSpec("DPM++ SDE", "dpmpp_sde", dpm.sample_dpmpp_sde, "karras", True, None,
                frozenset({"eta", "s_noise", "r"}), brownian=True),
    SamplerSpec("DPM++ 2S a", "dpmpp_2s_ancestral", dpm.sample_dpmpp_2s_ancestral, "karras",
                True, None, _ANCESTRAL),
    SamplerSpec("DPM++ 3M SDE", "dpmpp_3m_sde", dpm.sample_dpmpp_3m_sde, "exponential", True,
                None, frozenset({"eta", "s_noise"}), brownian=True),
    SamplerSpec("DDIM", "ddim", k.sample_ddim, "ddim_uniform", False, 1, frozenset({"eta"})),
    # Fixed equal-step Adams-Bashforth weights: order 4 only where sigma is linear in the step
    # index; 2 on any real schedule (measured 2.2-2.4 on Karras steps).
    SamplerSpec("PLMS", "plms", k.sample_plms, "ddim_uniform", False, 2, frozenset(),
                ("pndm",)),
    SamplerSpec("UniPC", "uni_pc", dpm.sample_unipc, "uniform", False, 2,
                frozenset({"order", "variant"}), ("uni_pc_bh2", "unipc")),
    SamplerSpec("DDPM", "ddpm", k.sample_ddpm, "uniform", True, None),
    SamplerSpec("LCM", "lcm", k.sample_lcm, "sgm_uniform", True, None),
)  # fmt: skip


def _key(name: str) -> str:
    return " ".join(name.strip().lower().replace("_", " ").split())


def _index() -> dict[str, SamplerSpec]:
    index: dict[str, SamplerSpec] = {}
    for spec in SAMPLERS:
        for n in (spec.label, spec.name, *spec.aliases):
            index[_key(n)] = spec
    return index


def resolve_sampler(name: str) -> tuple[SamplerSpec, str | None]:
    """Find a sampler by A1111 label, ComfyUI name or alias (case-insensitive).

    Returns the spec and a schedule name when the label carries one, as A1111's pre-1.9 labels
    do (``"DPM++ 2M Karras"`` -> DPM++ 2M with the karras schedule); otherwise None.
    """
    index = _index()
    key = _key(name)
    if key in index:
        return index[key], None
    for sched in SCHEDULES:
        suffix = " " + _key(sched.label)
        if key.endswith(suffix) and key[: -len(suffix)] in index:
            return index[key[: -len(suffix)]], get_schedule(sched.name).name
    accepted = ", ".join(spec.label for spec in SAMPLERS)
    raise InvalidRequestError(f"unknown sampler {name!r}; accepted: {accepted}")


def get_sampler(name: str) -> SamplerSpec:
    """The sampler spec for a name (ignoring any schedule suffix in the name)."""
    return resolve_sampler(name)[0]
