"""The math of retention as pure functions on tensors: no modules, no configs.

Layout: q, k (B, H, T, Dk); v (B, H, T, Dv); state S (B, H, Dk, Dv), z (B, H, Dk), offset (B,).
Beside it, the language model's loss without its logits (:func:`linear_cross_entropy`).
"""

from .cross_entropy import linear_cross_entropy
from .decay import SCHEDULES, decay_sum, gamma_schedule, log_gamma
from .decay2d import log_decay_1d, manhattan_log_decay, rmt_log_gamma
from .masa import decomposed_manhattan_attention, manhattan_attention
from .retention import BACKENDS, CHUNK_SIZE, MODES, check_chunk_size, decode_step, retention
from .rotary import ROTARY_ANGLES, ROTARY_LAYOUTS, apply_rotary, rotary_angles, rotary_phase
from .state import RetentionState, document_positions

__all__ = [
    "BACKENDS",
    "CHUNK_SIZE",
    "MODES",
    "ROTARY_ANGLES",
    "ROTARY_LAYOUTS",
    "SCHEDULES",
    "RetentionState",
    "apply_rotary",
    "check_chunk_size",
    "decay_sum",
    "decode_step",
    "decomposed_manhattan_attention",
    "document_positions",
    "gamma_schedule",
    "linear_cross_entropy",
    "log_decay_1d",
    "log_gamma",
    "manhattan_attention",
    "manhattan_log_decay",
    "retention",
    "rmt_log_gamma",
    "rotary_angles",
    "rotary_phase",
]
