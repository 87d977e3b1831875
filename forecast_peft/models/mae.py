"""Forecast-MAE pre-training: complementary agent masking, lane masking, reconstruction."""

from __future__ import annotations

import torch
from torch import nn

from forecast_peft.constants import FUTURE_STEPS, HISTORY_STEPS, LANE_POINTS
from forecast_peft.models.config import MAEConfig, ModelConfig
from forecast_peft.models.encoder import (
    SceneEncoder,
    encode_rows,
    make_blocks,
    packs_tokens,
    scene_positions,
    token_packing,
)
from forecast_peft.models.layers import AgentEncoder, Mlp, Packing, head_output


class MAEDecoder(nn.Module):
    """The pre-training decoder, re-used by Forecast-PEFT/FT: input projection, its own position
    embedding, transformer blocks, final norm and the future mask token."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.embed_dim
        self.decoder_embed = nn.Linear(d, d)
        self.pos_embed = Mlp(4, d, d)
        self.blocks = make_blocks(cfg, cfg.decoder_depth)
        self.norm = nn.LayerNorm(d)
        self.future_mask_token = nn.Parameter(torch.zeros(d))
        nn.init.trunc_normal_(self.future_mask_token, std=0.02)

    def positions(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's position embeddings of the actor slots [B, N, D] and the lane slots [B, M, D]."""
        return scene_positions(self.pos_embed, batch)

    def forward(
        self,
        tokens: torch.Tensor,
        attend: torch.Tensor,
        queries: tuple[int, ...] | None = None,
        start: int = 0,
        packing: Packing | None = None,
    ) -> torch.Tensor:
        """tokens [B, L, D] -> [B, L, D]; with ``queries`` (token positions) the last block computes
        only those tokens (their values are the same) and [B, Q, D] is returned. ``start``: the
        first block to run (the ones before it ran already). ``packing``: tokens are the packed
        real tokens [T, D] of that padded layout, and so is the output (unless ``queries``)."""
        for block in self.blocks[start:-1]:
            tokens = block(tokens, attend, packing=packing)
        return self.norm(self.blocks[-1](tokens, attend, queries, packing=packing))

    def forward_pairs(
        self,
        prefix: torch.Tensor,
        ctx: torch.Tensor,
        attend: torch.Tensor,
        queries: tuple[int, ...] | None = None,
        packing: Packing | None = None,
        prefix_qkv: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``forward`` of every (context, prefix) pair, cat[prefix[k], ctx[b]] as row b * K + k:
        prefix [K, P, D], ctx [B, L, D], attend [B * K, P + L] -> [B * K, P + L, D] (or
        [B * K, Q, D]). The first block's per-token work runs once per prefix and per context;
        with ``packing`` (of the [B * K, P + L] layout) the rest runs on the real tokens only.
        ``prefix_qkv``: the first block's ``prefix_projection`` of ``prefix``, computed before."""
        first, rest = self.blocks[0], self.blocks[1:]
        if not rest:
            return self.norm(first.forward_pairs(prefix, ctx, attend, queries, packing, prefix_qkv))
        out = first.forward_pairs(prefix, ctx, attend, packing=packing, prefix_qkv=prefix_qkv)
        return self(out, attend, queries, 1, packing)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` (broadcast) is True; 0 when nothing is masked. No sync."""
    mask = mask.expand_as(values).to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def future_features(batch: dict) -> torch.Tensor:
    """Future input of the MAE future tokens [B, N, 60, 3] = [x, y relative to now, valid]."""
    valid = ~batch["x_padding_mask"][..., HISTORY_STEPS:]
    return torch.cat([batch["y"], valid[..., None].to(batch["y"].dtype)], dim=-1)


MAE_MASKS = "mae_masks"  # the batch key of masks sampled before the batch moved to the device


def _rows(mask: torch.Tensor) -> torch.Tensor:
    """Flat indices of the True entries of ``mask``."""
    return mask.reshape(-1).nonzero().squeeze(1)


def sample_masks(batch: dict, mae: MAEConfig, pin: bool = False) -> dict[str, torch.Tensor]:
    """Random masks for a batch, vectorised, on the batch's device. Per scene, ``floor((1 -
    actor_mask_ratio) * F)`` of the F agents that have a future show their future instead of
    their history; ``floor((1 - lane_mask_ratio) * L)`` of the L real lanes stay visible, in the
    first slots of ``keep_ids`` [B, K]. Also the flat indices the model packs its work by: the
    actors that show their history (``history_rows``) and their future (``future_rows``), the
    visible lanes (``visible_lane_rows``, into [B, M]), and the real tokens of the encoder's
    [B, N + K] layout of actors then visible lanes (``encoder_index``).

    Their sizes depend on the random draw, so finding them reads the masks: sampled on the host
    before the batch moves to a GPU (``MAEModule.on_before_batch_transfer``) that costs nothing;
    on a GPU batch it makes the host wait for the device. ``pin``: return them in pinned memory,
    so that their copy to the GPU does not wait for it either (from pageable memory it may)."""
    actor_valid = ~batch["x_key_padding_mask"]  # [B, N]
    # all(-1) of the future's padding mask, as a byte minimum: four times faster on the CPU
    no_future = batch["x_padding_mask"][..., HISTORY_STEPS:].view(torch.uint8).amin(-1).bool()
    has_future = actor_valid & ~no_future
    noise = torch.rand(has_future.shape, device=has_future.device).masked_fill(~has_future, 2.0)
    order = noise.argsort(-1)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
    )
    keep = (has_future.sum(-1) * (1 - mae.actor_mask_ratio)).floor()
    show_future = has_future & (rank < keep[:, None])
    lane_valid = ~batch["lane_key_padding_mask"]  # [B, M]
    m = lane_valid.shape[1]
    k = max(1, int(m * (1 - mae.lane_mask_ratio)))
    lane_noise = torch.rand(lane_valid.shape, device=lane_valid.device).masked_fill(~lane_valid, 2.0)
    keep_ids = lane_noise.argsort(-1)[:, :k]  # [B, K] visible slots first
    keep_lanes = (lane_valid.sum(-1) * (1 - mae.lane_mask_ratio)).floor()
    kept_valid = torch.arange(k, device=keep_ids.device)[None] < keep_lanes[:, None]  # [B, K]
    lane_shown = torch.zeros_like(lane_valid).scatter(1, keep_ids, kept_valid)
    masks = {
        "actor_valid": actor_valid,
        "has_future": has_future,
        "show_future": show_future,
        "lane_valid": lane_valid,
        "keep_ids": keep_ids,
        "kept_valid": kept_valid,
        "lane_shown": lane_shown,
        "history_rows": _rows(actor_valid & ~show_future),
        "future_rows": _rows(show_future),
        "visible_lane_rows": _rows(lane_shown),
        "encoder_index": _rows(torch.cat([actor_valid, kept_valid], dim=1)),
    }
    return {key: value.pin_memory() for key, value in masks.items()} if pin else masks


class MAEModel(nn.Module):
    """Masked autoencoder over a scene. Per scene, half of the agents that have a future show
    their future token and hide their history, the others show their history (complementary
    masking); half of the lanes are hidden. The decoder reconstructs what was hidden."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.embed_dim
        a = cfg.agent
        self.cfg = cfg
        self.encoder = SceneEncoder(cfg)
        self.future_embed = AgentEncoder(3, a.widths, a.depths, a.heads, a.kernels, a.mlp_ratio, cfg.drop_path)
        self.decoder = MAEDecoder(cfg)
        self.history_mask_token = nn.Parameter(torch.zeros(d))
        self.lane_mask_token = nn.Parameter(torch.zeros(d))
        self.future_pred = nn.Linear(d, FUTURE_STEPS * 2)
        self.history_pred = nn.Linear(d, HISTORY_STEPS * 2)
        self.lane_pred = nn.Linear(d, LANE_POINTS * 2)
        # target-parameter pre-training attaches the forecaster's mode prompts here
        self.mode_prompts: nn.Module | None = None
        nn.init.trunc_normal_(self.history_mask_token, std=0.02)
        nn.init.trunc_normal_(self.lane_mask_token, std=0.02)

    def masks(self, batch: dict) -> dict[str, torch.Tensor]:
        """The batch's masks: those ``sample_masks`` put in it on the host (``MAE_MASKS``), or
        fresh ones sampled on its device (on a GPU that waits for the device: see sample_masks)."""
        masks = batch.get(MAE_MASKS)
        return sample_masks(batch, self.cfg.mae) if masks is None else masks

    def actor_tokens(self, batch: dict, mk: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, N, D]: the future embedding of each actor that shows its future, the history
        embedding of each other real actor, zeros in padding slots. Each encoder runs on its own
        actors only (half the work of embedding every actor twice and choosing)."""
        fut = encode_rows(self.future_embed, future_features(batch).transpose(-1, -2), mk["future_rows"])
        return self.encoder.embed_history(batch, mk["history_rows"]) + fut

    def visible_lane_tokens(self, batch: dict, mk: dict[str, torch.Tensor], pos_l: torch.Tensor) -> torch.Tensor:
        """[B, K, D]: the encoder's lane tokens (``pos_l``: their position embeddings, [B, M, D])
        in the slots of ``keep_ids`` (past each scene's
        visible lanes, the slots hold no real lane). Only the visible lanes are embedded, as the
        encoder sees no other, so the lane PointNet's batch statistics come from them (a random
        half of the real lanes)."""
        enc = self.encoder
        lanes = enc.embed_lanes(batch, mk["visible_lane_rows"]) + enc.lane_type_embed + pos_l
        return lanes.gather(1, mk["keep_ids"][..., None].expand(-1, -1, lanes.shape[-1]))

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        enc, dec = self.encoder, self.decoder
        mk = self.masks(batch)
        b, n = mk["actor_valid"].shape
        pos_a, pos_l = enc.positions(batch)
        actors = self.actor_tokens(batch, mk) + enc.actor_type(batch) + pos_a
        keep_ids = mk["keep_ids"]
        packing = None
        if packs_tokens(batch):  # the encoder blocks skip the padding slots
            packing = Packing(mk["encoder_index"], b, n + keep_ids.shape[1])
        lanes = self.visible_lane_tokens(batch, mk, pos_l)
        x = enc.run_blocks(actors, lanes, mk["actor_valid"], mk["kept_valid"], packing)
        z = dec.decoder_embed(x)
        z_act, z_lane = z[:, :n], z[:, n:]
        m, d = mk["lane_valid"].shape[1], z.shape[-1]
        lane_tokens = torch.zeros(b, m, d, dtype=z.dtype, device=z.device).scatter(
            1, keep_ids[..., None].expand(-1, -1, d), z_lane
        )
        lane_tokens = torch.where(mk["lane_shown"][..., None], lane_tokens, self.lane_mask_token.to(z.dtype))
        pos_a, pos_l = dec.positions(batch)
        show = mk["show_future"][..., None]
        hist_tokens = torch.where(show, self.history_mask_token.to(z.dtype), z_act) + pos_a
        fut_tokens = torch.where(show, z_act, dec.future_mask_token.to(z.dtype)) + pos_a
        tokens = torch.cat([hist_tokens, fut_tokens, lane_tokens + pos_l], dim=1)
        attend = torch.cat([mk["actor_valid"], mk["actor_valid"], mk["lane_valid"]], dim=1)
        p = 0
        if self.mode_prompts is not None:  # one random mode's prompts per scene
            prompts = self.mode_prompts.tokens  # [K, P, D]
            pick = torch.randint(prompts.shape[0], (b,), device=z.device)
            p = prompts.shape[1]
            tokens = torch.cat([prompts[pick].to(z.dtype), tokens], dim=1)
            attend = torch.cat([attend.new_ones(b, p), attend], dim=1)
        packing = token_packing(batch, "aal", prefix=p)  # the decoder's per-token work skips padding
        if packing is None:
            out = dec(tokens, attend)[:, p:]
        else:
            out = packing.unpack(dec(packing.pack(tokens), attend, packing=packing))[:, p:]
        hist_hat = head_output(self.history_pred, out[:, :n]).view(b, n, HISTORY_STEPS, 2)
        fut_hat = head_output(self.future_pred, out[:, n : 2 * n]).view(b, n, FUTURE_STEPS, 2)
        lane_hat = head_output(self.lane_pred, out[:, 2 * n :]).view(b, m, LANE_POINTS, 2)

        hist_target = batch["x_positions"] - batch["x_centers"][..., None, :]
        hist_mask = mk["show_future"][..., None, None] & ~batch["x_padding_mask"][..., :HISTORY_STEPS, None]
        fut_mask = (mk["has_future"] & ~mk["show_future"])[..., None, None] & ~batch["x_padding_mask"][
            ..., HISTORY_STEPS:, None
        ]
        lane_target = batch["lane_positions"] - batch["lane_centers"][..., None, :]
        lane_mask = (mk["lane_valid"] & ~mk["lane_shown"])[..., None, None] & ~batch["lane_padding_mask"][..., None]
        losses = {
            "future": masked_mean((fut_hat - batch["y"]).abs(), fut_mask),
            "history": masked_mean((hist_hat - hist_target).abs(), hist_mask),
            "lane": masked_mean((lane_hat - lane_target) ** 2, lane_mask),
        }
        w = self.cfg.mae.loss_weights
        losses["loss"] = w[0] * losses["future"] + w[1] * losses["history"] + w[2] * losses["lane"]
        return losses
