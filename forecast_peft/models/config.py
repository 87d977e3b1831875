"""Typed model configuration (mirrors conf/model/forecast_mae.yaml)."""

from __future__ import annotations

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
