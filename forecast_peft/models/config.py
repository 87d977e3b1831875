"""Typed model configuration (mirrors conf/model/forecast_mae.yaml)."""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field

from forecast_peft.constants import NUM_MODES


@dataclass
class AgentConfig:
    widths: list[int] = field(default_factory=lambda: [32, 64, 128])
    depths: list[int] = field(default_factory=lambda: [2, 2, 2])
    heads: list[int] = field(default_factory=lambda: [2, 4, 8])
    kernels: list[int] = field(default_factory=lambda: [3, 3, 5])
    mlp_ratio: float = 3.0


@dataclass
class LaneConfig:
    hidden: list[int] = field(default_factory=lambda: [128, 256])
    out_hidden: int = 256


@dataclass
class MAEConfig:
    actor_mask_ratio: float = 0.5
    lane_mask_ratio: float = 0.5
    loss_weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 0.35])  # future, history, lane


@dataclass
class PEFTConfig:
    num_prompts: int = 50
    adapter_rank: int = 64


@dataclass
class ModelConfig:
    embed_dim: int = 128
    encoder_depth: int = 4
    decoder_depth: int = 4
    num_heads: int = 8
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path: float = 0.2
    agent: AgentConfig = field(default_factory=AgentConfig)
    lane: LaneConfig = field(default_factory=LaneConfig)
    mae: MAEConfig = field(default_factory=MAEConfig)
    peft: PEFTConfig = field(default_factory=PEFTConfig)
    num_modes: int = NUM_MODES
    reg_weight: float = 10.0  # smooth-L1 weight of the winning mode in the forecasting loss

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        d = dict(d)
        sub = {"agent": AgentConfig, "lane": LaneConfig, "mae": MAEConfig, "peft": PEFTConfig}
        for key, typ in sub.items():
            if key in d:
                d[key] = typ(**dict(d[key]))
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self) -> None:
        """Raise ConfigError (one line) when the sizes do not fit together."""
        from forecast_peft.errors import ConfigError

        a = self.agent
        for name in ("embed_dim", "encoder_depth", "decoder_depth", "num_heads", "num_modes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        d, h = self.embed_dim, self.num_heads
        if h >= 1 and d % h:
            raise ConfigError(f"model.embed_dim ({d}) must be a multiple of model.num_heads ({h})")
        if not 0 <= self.drop_path < 1:
            raise ConfigError(f"model.drop_path must be in [0, 1), got {self.drop_path}")
        levels = {len(a.widths), len(a.depths), len(a.heads), len(a.kernels)}
        if len(levels) != 1 or not a.widths:
            raise ConfigError("model.agent.widths, depths, heads and kernels must have one entry per level each")
        if a.widths[-1] != self.embed_dim:
            raise ConfigError(f"model.agent.widths must end at model.embed_dim ({self.embed_dim}), got {a.widths}")
        if any(w2 != 2 * w1 for w1, w2 in zip(a.widths, a.widths[1:])):
            raise ConfigError(f"model.agent.widths must double from level to level, got {a.widths}")
        if any(min(x) < 1 for x in (a.widths, a.depths, a.heads, a.kernels)):
            raise ConfigError("model.agent widths, depths, heads and kernels must be >= 1")
        if any(w % h for w, h in zip(a.widths, a.heads)):
            raise ConfigError(f"model.agent.widths {a.widths} must be multiples of model.agent.heads {a.heads}")
        if len(self.lane.hidden) != 2:
            raise ConfigError(f"model.lane.hidden must have two entries, got {self.lane.hidden}")
        if len(self.mae.loss_weights) != 3:
            raise ConfigError("model.mae.loss_weights must have three entries (future, history, lane)")
        for name in ("actor_mask_ratio", "lane_mask_ratio"):
            if not 0 <= getattr(self.mae, name) < 1:
                raise ConfigError(f"model.mae.{name} must be in [0, 1), got {getattr(self.mae, name)}")
        if self.peft.num_prompts < 1 or self.peft.adapter_rank < 1:
            raise ConfigError("model.peft.num_prompts and model.peft.adapter_rank must be >= 1")


# Backbone sizes that must agree between a pre-trained checkpoint and the model it is loaded
# into; the PEFT sizes (prompts, adapter rank) and the number of modes belong to tuning alone.
BACKBONE_FIELDS = (
    "embed_dim",
    "encoder_depth",
    "decoder_depth",
    "num_heads",
    "mlp_ratio",
    "qkv_bias",
    "agent",
    "lane",
)


def backbone_diff(theirs: dict, ours: dict) -> list[str]:
    """The backbone sizes that differ between two ``ModelConfig.to_dict()``, as 'name theirs vs ours'."""
    return [f"{k} {theirs[k]} vs {ours[k]}" for k in BACKBONE_FIELDS if theirs[k] != ours[k]]


def shipped_model(sizes: dict) -> str | None:
    """The conf/model/<name>.yaml (tiny, small, forecast_mae) with these backbone sizes, if any."""
    return next((name for name, shipped in _shipped_sizes().items() if not backbone_diff(sizes, shipped)), None)


@functools.cache
def _shipped_sizes() -> dict[str, dict]:
    from omegaconf import OmegaConf

    from forecast_peft.config import group_option, group_options

    return {
        name: ModelConfig.from_dict(OmegaConf.to_container(group_option("model", name))).to_dict()
        for name in group_options("model")
    }
