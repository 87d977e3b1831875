"""The one scene encoder shared by pre-training and every tuning mode."""

from __future__ import annotations

import torch
from torch import nn

from forecast_peft.constants import CURRENT_STEP, HISTORY_STEPS, NUM_COMBINED_TYPES
from forecast_peft.models.config import ModelConfig
from forecast_peft.models.layers import AgentEncoder, Block, LanePointNet, Mlp, Packing


def position_features(centers: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """[..., 2] centres (m) and [...] headings (rad) -> [..., 4] = [cx, cy, cos, sin]."""
    return torch.cat([centers, torch.cos(angles)[..., None], torch.sin(angles)[..., None]], dim=-1)


def scene_positions(mlp: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """A position embedding ``mlp`` of every actor slot's (centre, heading now) and every lane
    slot's (centre, direction), in one call for both: ([B, N, D], [B, M, D])."""
    actors = position_features(batch["x_centers"], batch["x_angles"][..., CURRENT_STEP])
    lanes = position_features(batch["lane_centers"], batch["lane_angles"])
    return mlp(torch.cat([actors, lanes], dim=1)).split([actors.shape[1], lanes.shape[1]], dim=1)


def history_features(batch: dict) -> torch.Tensor:
    """Per-step agent history input [B, N, 50, 4] = [dx, dy, d-speed, valid]."""
    valid = ~batch["x_padding_mask"][..., :HISTORY_STEPS]
    return torch.cat([batch["x"], batch["x_velocity_diff"][..., None], valid[..., None].to(batch["x"].dtype)], dim=-1)


def encode_rows(encoder: nn.Module, feats: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """Run a per-row encoder over [B, S, ...] rows, only the rows listed in ``index`` (flat indices
    of real actors or lanes) when given; padding rows get zeros. Returns [B, S, D]."""
    b, s = feats.shape[:2]
    if index is None:
        return encoder(feats.reshape(b * s, *feats.shape[2:])).view(b, s, -1)
    rows = Packing(index, b, s)
    return rows.unpack(encoder(rows.pack(feats)))


# The transformer blocks skip padding slots (see ``token_packing``). False runs the padded form,
# which computes the same outputs: benchmarks compare the two (bench_train.py --padded-blocks).
PACK_TOKENS = True


def packs_tokens(batch: dict) -> bool:
    """Whether the transformer blocks skip the padding slots of ``batch``: it carries the indices
    of its real actors and lanes, and ``PACK_TOKENS`` is on."""
    return PACK_TOKENS and batch.get("actor_index") is not None and batch.get("lane_index") is not None


def token_packing(batch: dict, segments: str, rows_per_scene: int = 1, prefix: int = 0) -> Packing | None:
    """The real tokens of a padded token layout built from ``batch``: each scene's sequence is
    ``segments``, a string of ``a`` (its N actor slots) and ``l`` (its M lane slots), e.g.
    ``al`` for the encoder and ``aal`` for the decoder context (histories, futures, lanes),
    repeated over ``rows_per_scene`` rows (row b * K + k) behind ``prefix`` tokens that are
    always real (mode prompts). None without the batch's ``actor_index`` / ``lane_index``, or
    when ``PACK_TOKENS`` is False."""
    if not packs_tokens(batch):
        return None
    actor_index, lane_index = batch["actor_index"], batch["lane_index"]
    n, m = batch["x_key_padding_mask"].shape[1], batch["lane_key_padding_mask"].shape[1]
    rows = batch["x_key_padding_mask"].shape[0] * rows_per_scene
    length = prefix + sum(n if s == "a" else m for s in segments)
    parts, offset = [], prefix
    for s in segments:
        index, width = (actor_index, n) if s == "a" else (lane_index, m)
        parts.append(index // width * (rows_per_scene * length) + offset + index % width)  # row b * K
        offset += width
    first = torch.cat(parts)
    real = (first + torch.arange(rows_per_scene, device=first.device)[:, None] * length).reshape(-1)
    if prefix:
        always = torch.arange(rows, device=first.device)[:, None] * length + torch.arange(prefix, device=first.device)
        real = torch.cat([always.reshape(-1), real])
    return Packing(real.sort().values, rows, length)  # row-major: each row's tokens together


def make_blocks(cfg: ModelConfig, depth: int) -> nn.ModuleList:
    rates = torch.linspace(0, cfg.drop_path, depth).tolist()
    return nn.ModuleList(Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, r) for r in rates)


class SceneEncoder(nn.Module):
    """Actor history tokens and lane tokens, with position and type embeddings, through
    ``encoder_depth`` transformer blocks.

    PEFT may attach ``context_prompts`` (a module holding [depth, P, D] tokens): every block
    attends to its layer's prompts as well, which are dropped after the block (so only their keys
    and values are computed, once per batch; for inference ``peft.fold`` computes them once for
    good, in ``context_kv``).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.embed_dim
        a = cfg.agent
        self.hist_embed = AgentEncoder(4, a.widths, a.depths, a.heads, a.kernels, a.mlp_ratio, cfg.drop_path)
        self.lane_embed = LanePointNet(3, cfg.lane.hidden, cfg.lane.out_hidden, d)
        self.pos_embed = Mlp(4, d, d)
        self.actor_type_embed = nn.Parameter(torch.zeros(NUM_COMBINED_TYPES, d))
        self.lane_type_embed = nn.Parameter(torch.zeros(d))
        self.blocks = make_blocks(cfg, cfg.encoder_depth)
        self.norm = nn.LayerNorm(d)
        self.context_prompts: nn.Module | None = None
        # for inference, ``peft.fold`` puts the prompts' keys and values [depth, P, 2D] here instead
        self.register_buffer("context_kv", None, persistent=False)
        nn.init.trunc_normal_(self.actor_type_embed, std=0.02)
        nn.init.trunc_normal_(self.lane_type_embed, std=0.02)

    def embed_history(self, batch: dict, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Actor tokens [B, N, D] from the history, of the actors at flat indices ``rows`` (by
        default the real ones; zeros in the other slots)."""
        feats = history_features(batch).transpose(-1, -2)  # [B, N, 4, 50]
        return encode_rows(self.hist_embed, feats, batch.get("actor_index") if rows is None else rows)

    def embed_lanes(self, batch: dict, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Lane tokens [B, M, D] from points relative to the lane centre, of the lanes at flat
        indices ``rows`` (by default the real ones; zeros in the other slots)."""
        rel = batch["lane_positions"] - batch["lane_centers"][..., None, :]
        valid = (~batch["lane_padding_mask"])[..., None].to(rel.dtype)
        feats = torch.cat([rel, valid], dim=-1)  # [B, M, 20, 3]
        return encode_rows(self.lane_embed, feats, batch.get("lane_index") if rows is None else rows)

    def positions(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The position embeddings of the actor slots [B, N, D] and of the lane slots [B, M, D]."""
        return scene_positions(self.pos_embed, batch)

    def actor_type(self, batch: dict) -> torch.Tensor:
        # one-hot product instead of indexing: its backward is a GEMM, not a contended scatter-add;
        # built by comparison because F.one_hot checks its input's range with a host read-back
        types = torch.arange(NUM_COMBINED_TYPES, device=self.actor_type_embed.device)
        one_hot = (batch["x_attr"][..., 2, None].long() == types).to(self.actor_type_embed.dtype)
        return one_hot @ self.actor_type_embed

    def run_blocks(
        self,
        actors: torch.Tensor,
        lanes: torch.Tensor,
        attend_actors: torch.Tensor,
        attend_lanes: torch.Tensor,
        packing: Packing | None = None,
    ) -> torch.Tensor:
        """Transformer over [actors, lanes] (with each layer's prompts attended to); returns the
        normalised [B, N + M, D]. ``packing`` (of that layout): the per-token work runs on the
        real tokens only, and the padding slots of the output are zeros."""
        x = torch.cat([actors, lanes], dim=1)
        attend = torch.cat([attend_actors, attend_lanes], dim=1)
        prompts = None if self.context_prompts is None else self.context_prompts.tokens  # [depth, P, D]
        if packing is not None:
            x = packing.pack(x)
        for i, block in enumerate(self.blocks):
            # a layer's prompts are dropped after the layer, so they are keys and values only
            memory = None if prompts is None else prompts[i]
            memory_kv = None if self.context_kv is None else self.context_kv[i]
            x = block(x, attend, memory=memory, packing=packing, memory_kv=memory_kv)
        x = self.norm(x)
        return x if packing is None else packing.unpack(x)

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode a whole scene: ([B, N, D] actor tokens, [B, M, D] lane tokens)."""
        pos_a, pos_l = self.positions(batch)
        actors = self.embed_history(batch) + self.actor_type(batch) + pos_a
        lanes = self.embed_lanes(batch) + self.lane_type_embed + pos_l
        n = actors.shape[1]
        attend_actors, attend_lanes = ~batch["x_key_padding_mask"], ~batch["lane_key_padding_mask"]
        x = self.run_blocks(actors, lanes, attend_actors, attend_lanes, token_packing(batch, "al"))
        return x[:, :n], x[:, n:]
