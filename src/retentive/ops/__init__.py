"""The math of retention as pure functions on tensors: no modules, no configs.

Layout: q, k (B, H, T, Dk); v (B, H, T, Dv); state S (B, H, Dk, Dv), z (B, H, Dk), offset (B,).
"""

from .decay import SCHEDULES, decay_sum, gamma_schedule, log_gamma
from .retention import BACKENDS, MODES, retention
from .rotary import apply_rotary, rotary_angles, rotary_phase
from .state import RetentionState

__all__ = [
    "BACKENDS",
    "MODES",
    "SCHEDULES",
    "RetentionState",
    "apply_rotary",
    "decay_sum",
    "gamma_schedule",
    "log_gamma",
    "retention",
    "rotary_angles",
    "rotary_phase",
]
